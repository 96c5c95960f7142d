"""The model a gin file describes, read by syntax alone: t5x's saved `config.gin`, Mesh TensorFlow's
`operative_config.gin`, or one of ul2lab's model gin files.

    fields = model_gin.read("/t5x_run/config.gin")   # {"mlp_activations": ("gelu", "linear"), ...}

Checkpoint conversion needs a few facts the arrays do not carry (the MLP activations, dropout,
the relative-position max distance). Those files bind configurables of t5x, Mesh TensorFlow or
ul2lab, none of which need be importable here, so the statements are parsed with gin's own parser
(no configurable is registered or called) and only the model's fields are kept:

    t5x / ul2lab   T5Config.<field> = value    (network.T5Config in t5x; the same field names)
    ul2lab         preset.name = "t5_1_1_base", preset.<field> = value
    Mesh TF        DenseReluDense.activation, d_model, d_ff, d_kv, num_heads, num_layers,
                   dropout_rate, SelfAttention.relative_attention_num_buckets

Later bindings win, `include` is followed (relative to the including file or any folder above
it, as t5x's search path is its repository root), macros (`%NAME`) are resolved.
"""
import os
from typing import Any, Dict, List, Optional, Tuple

from ul2lab.errors import UserError
from ul2lab.models.config import PRESETS, T5Config

_T5CONFIG_FIELDS = {f for f in T5Config.__dataclass_fields__}
# Mesh TensorFlow's T5 gin: its macros and configurable parameters -> T5Config fields
_MTF_MACROS = {"d_model": ("emb_dim",), "d_ff": ("mlp_dim",), "d_kv": ("head_dim",), "num_heads": ("num_heads",),
               "num_layers": ("num_encoder_layers", "num_decoder_layers"), "dropout_rate": ("dropout_rate",)}
_MTF_BINDINGS = {"DenseReluDense.activation": "mlp_activations",
                 "SelfAttention.relative_attention_num_buckets": "relative_attention_num_buckets",
                 "encoder/make_layer_stack.num_layers": "num_encoder_layers",
                 "decoder/make_layer_stack.num_layers": "num_decoder_layers"}


class GinFileError(UserError, ValueError):
    """A gin file that cannot be read or names an unknown model."""


class _Reference:
    def __init__(self, name: str):
        self.name = name


class _Macro:
    def __init__(self, name: str):
        self.name = name


def read(path: str) -> Dict[str, Any]:
    """The T5Config fields `path` binds (a preset named by `preset.name` expanded first)."""
    bindings = _bindings(path, [])
    macros = {selector: value for (selector, arg), value in bindings.items() if arg == ""}

    def resolve(value, seen=()):
        if isinstance(value, _Macro):
            if value.name in seen or value.name not in macros:
                return None  # gin.REQUIRED or an unset macro: the file does not say
            return resolve(macros[value.name], seen + (value.name,))
        if isinstance(value, (list, tuple)):
            return type(value)(resolve(v, seen) for v in value)
        return value

    fields: Dict[str, Any] = {}
    mtf: Dict[str, Any] = {}
    preset_name = None
    for (selector, arg), value in bindings.items():
        value = resolve(value)
        if value is None or isinstance(value, _Reference):
            continue
        scope, _, configurable = selector.rpartition("/")
        configurable = configurable.rsplit(".", 1)[-1]  # network.T5Config -> T5Config
        if configurable == "preset" and arg == "name":
            preset_name = value
        elif configurable in ("T5Config", "preset") and arg in _T5CONFIG_FIELDS:
            fields[arg] = value
        elif not arg and selector in _MTF_MACROS:
            for field in _MTF_MACROS[selector]:
                mtf.setdefault(field, value)
        else:
            for key in (f"{configurable}.{arg}", f"{scope}/{configurable}.{arg}"):
                if key in _MTF_BINDINGS:
                    mtf[_MTF_BINDINGS[key]] = value
    fields = {**mtf, **fields}
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise GinFileError(f"{path}: preset.name = {preset_name!r} is not a ul2lab preset; "
                               f"choose one of {sorted(PRESETS)}")
        fields = {**PRESETS[preset_name].to_dict(), **fields}
    if isinstance(fields.get("mlp_activations"), (str, list, tuple)):
        activations = fields["mlp_activations"]
        fields["mlp_activations"] = (activations,) if isinstance(activations, str) else tuple(activations)
    return fields


def vocabulary(path: str) -> Tuple[Optional[str], Optional[int]]:
    """(sentencepiece_model_file, extra_ids) that `path` binds for seqio.SentencePieceVocabulary (t5x's
    `VOCABULARY = @seqio.SentencePieceVocabulary()`), each None where the file does not say."""
    bindings = _bindings(path, [])
    macros = {selector: value for (selector, arg), value in bindings.items() if arg == ""}
    found: Dict[str, Any] = {}
    for (selector, arg), value in bindings.items():
        if selector.rsplit("/", 1)[-1].rsplit(".", 1)[-1] == "SentencePieceVocabulary":
            for _ in range(len(macros) + 1):  # a value may be a macro naming a macro
                if not isinstance(value, _Macro):
                    break
                value = macros.get(value.name)
            found[arg] = value
    model_file, extra_ids = found.get("sentencepiece_model_file"), found.get("extra_ids")
    return (model_file if isinstance(model_file, str) else None,
            extra_ids if isinstance(extra_ids, int) and not isinstance(extra_ids, bool) else None)


def _bindings(path: str, stack: List[str]) -> Dict[tuple, Any]:
    """{(selector, arg name): value} in file order, includes expanded in place (macros: arg name "")."""
    from gin import config_parser  # gin comes with the data extra; only gin-file users need it

    if not os.path.isfile(path):
        raise GinFileError(f"gin file {path} does not exist; pass the run's saved config.gin (t5x writes it "
                           "into MODEL_DIR) or a ul2lab model gin file such as gin/models/t5_1_1_base.gin")
    if os.path.abspath(path) in stack:
        raise GinFileError(f"gin file {path} includes itself (through {' -> '.join(stack)})")

    class Delegate(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_name, evaluate):
            return _Reference(scoped_name)

        def macro(self, name):
            return _Macro(name)

    with open(path, encoding="utf-8") as f:
        text = f.read()
    bindings: Dict[tuple, Any] = {}
    try:
        for statement in config_parser.ConfigParser(text, Delegate()):
            if isinstance(statement, config_parser.BindingStatement):
                selector = f"{statement.scope}/{statement.selector}" if statement.scope else statement.selector
                bindings.pop((selector, statement.arg_name), None)  # a later binding wins and comes later
                bindings[(selector, statement.arg_name)] = statement.value
            elif isinstance(statement, config_parser.IncludeStatement):
                bindings.update(_bindings(_find_include(statement.filename, path), stack + [os.path.abspath(path)]))
    except (SyntaxError, ValueError) as e:
        if isinstance(e, GinFileError):
            raise
        raise GinFileError(f"gin file {path} cannot be parsed: {' '.join(str(e).split())[:300]}") from None
    return bindings


def _find_include(name: str, including: str) -> str:
    folder = os.path.dirname(os.path.abspath(including))
    while True:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            raise GinFileError(f"{including} includes {name!r}, which is not beside it nor under any folder "
                               "above it; pass the run's saved config.gin (every include already expanded)")
        folder = parent
