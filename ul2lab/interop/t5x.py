"""t5x parameters <-> ul2lab parameters, and the model config a t5x checkpoint's arrays imply.

ul2lab's network uses t5x's parameter names, so each t5x parameter maps to the ul2lab parameter of
the same path. The layouts that differ:

  attention kernels  t5x's examples/t5 network and flaxformer store query/key/value kernels 2-D as
                     (embed, heads*kv) and out as (heads*kv, embed); ul2lab keeps (embed, heads, kv) and
                     (heads, kv, embed). The map is a C-order reshape, the one t5x's DenseGeneral makes
                     when it runs; 3-D kernels (scalable_t5) map unchanged.
  scanned stacks     t5x / flaxformer scan_layers store a stack's layers stacked under
                     <stack>/<stack>/... with the layer axis at param_scan_axis (1 by default); ul2lab's
                     scan_layers stacks them under <stack>/layers/... on axis 0. A scanned checkpoint
                     imports as a scan_layers model.

What the arrays say (dims, layers, heads from the relative-position table, gated MLP from wi_0/wi_1,
tied or untied head from decoder/logits_dense, a decoder norm without scale) is taken from them; the
activations, dropout and max distance come from a preset or a gin file, and a contradiction between the
two is an error naming both.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np
from flax import traverse_util

from ul2lab.errors import UserError
from ul2lab.models import network
from ul2lab.models.config import T5Config
from ul2lab.train.checkpoints import LazyArray

STACKS = ("encoder", "decoder")
# what the arrays determine: compared with a preset or gin file, which must agree
ARRAY_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
                "num_decoder_layers", "relative_attention_num_buckets", "logits_via_embedding",
                "decoder_norm_use_scale")
T5X_SCAN_AXIS = 1  # t5x's and flaxformer's default param_scan_axis
_OTHER_FACTOR = {"v_row": "v_col", "v_col": "v_row"}


class T5xModelError(UserError, ValueError):
    """A t5x checkpoint whose parameters are not those of a T5 encoder-decoder ul2lab can run."""


# ----------------------------------------------------------------------------- the config

def infer_config(arrays: Mapping[str, LazyArray], where: str, declared: Optional[Mapping[str, Any]] = None,
                 declared_by: str = "", default_activations: Optional[Dict[int, Tuple[str, ...]]] = None
                 ) -> T5Config:
    """The T5Config of t5x-named params (no `target/` prefix): shapes from the arrays, the rest from
    `declared` (a preset's or gin file's fields, named `declared_by` in errors). default_activations
    ({number of wi kernels: activations}) stands in when nothing declares the activations."""
    declared = dict(declared or {})
    found = _array_fields(arrays, where)
    scanned = found.pop("scan_layers")
    wrong = []
    for field in ARRAY_FIELDS:
        if field in declared and declared[field] != found[field]:
            wrong.append(f"{field} {found[field]!r} in the checkpoint, {declared[field]!r} in {declared_by}")
    count = found.pop("num_activations")
    activations = declared.get("mlp_activations")
    if activations is not None and len(activations) != count:
        wrong.append(f"{count} MLP input kernel(s) in the checkpoint ({_wi_names(count)}), mlp_activations "
                     f"{tuple(activations)} in {declared_by}")
    if wrong:
        raise T5xModelError(f"{where} is another model than {declared_by} says: {'; '.join(wrong)}; pass the "
                            "run's own config (--gin_file its config.gin) or the preset of this shape")
    if activations is None:
        activations = (default_activations or {}).get(count)
        if activations is None:
            raise T5xModelError(f"{where}: the arrays do not say the MLP activation ({_wi_names(count)}); pass "
                                "--model PRESET (e.g. t5_1_1_base for gated-GELU, ul2_20b for gated-SiLU) or "
                                "--gin_file with the run's config.gin")
    known = {f for f in T5Config.__dataclass_fields__}
    fields = {k: v for k, v in declared.items() if k in known}
    fields.update(found, mlp_activations=tuple(activations), scan_layers=scanned)
    fields.setdefault("dtype", "bfloat16")
    try:
        return T5Config(**fields)
    except (TypeError, ValueError) as e:
        raise T5xModelError(f"{where}: {declared_by or 'the checkpoint'} gives a model ul2lab cannot build: "
                            f"{e}") from None


def _wi_names(count: int) -> str:
    return "mlp/wi" if count == 1 else "mlp/" + ", ".join(f"wi_{i}" for i in range(count))


def _array_fields(arrays: Mapping[str, LazyArray], where: str) -> Dict[str, Any]:
    def need(name: str, what: str) -> LazyArray:
        if name not in arrays:
            raise T5xModelError(f"{where} has no parameter {name} ({what}); ul2lab imports T5 encoder-decoders "
                                f"({_architecture_hint(arrays)})")
        return arrays[name]

    if not any(n.startswith("encoder/") for n in arrays) and any(n.startswith("decoder/") for n in arrays):
        raise T5xModelError(f"{where} is a decoder-only model (no encoder/ parameters, t5x's DecoderOnlyModel); "
                            "ul2lab trains T5 encoder-decoders")
    vocab, emb = need("token_embedder/embedding", "the shared token embedding").shape
    per_layer = sorted(n for n in arrays if re.match(r"(encoder|decoder)/(layers_\d+|encoder|decoder)/relpos_bias/", n))
    if per_layer:
        raise T5xModelError(f"{where} has a relative position table per layer ({per_layer[0]}, as scalable_t5 and "
                            "umT5 do); ul2lab's network shares one table per stack, as T5 and t5x's examples/t5")
    heads, buckets = need("encoder/relpos_bias/rel_embedding", "the encoder's relative position table").shape
    decoder_table = need("decoder/relpos_bias/rel_embedding", "the decoder's relative position table").shape
    if decoder_table != (heads, buckets):
        raise T5xModelError(f"{where}: the encoder's relative position table is {(heads, buckets)} but the "
                            f"decoder's is {decoder_table}; ul2lab needs the same heads and buckets in both")
    fields: Dict[str, Any] = {"vocab_size": vocab, "emb_dim": emb, "num_heads": heads,
                              "relative_attention_num_buckets": buckets}
    scanned = {stack: any(n.startswith(f"{stack}/{stack}/") for n in arrays) for stack in STACKS}
    if scanned["encoder"] != scanned["decoder"]:
        raise T5xModelError(f"{where} scans one stack and not the other; ul2lab scans both or neither")
    fields["scan_layers"] = scanned["encoder"]
    for stack in STACKS:
        fields[f"num_{stack}_layers"] = _num_layers(arrays, stack, emb, where, scanned[stack])
    first = "encoder/encoder" if scanned["encoder"] else "encoder/layers_0"
    query = need(f"{first}/attention/query/kernel", "the first encoder layer's query kernel").shape
    if scanned["encoder"]:
        query = _drop_axis(query, _scan_axis(arrays, "encoder", emb))
    joined = int(np.prod(query[1:]))
    if len(query) == 3 and query[1] != heads or joined % heads:
        raise T5xModelError(f"{where}: {first}/attention/query/kernel is {query}, which does not split into the "
                            f"{heads} heads of the relative position table")
    fields["head_dim"] = joined // heads
    wi = sorted(n for n in arrays if re.fullmatch(rf"{first}/mlp/wi(_\d+)?/kernel", n))
    if not wi:
        raise T5xModelError(f"{where} has no {first}/mlp/wi kernel; ul2lab's MLP is t5x's MlpBlock")
    mlp_shape = arrays[wi[0]].shape
    fields["mlp_dim"] = int(mlp_shape[-1])
    fields["num_activations"] = len(wi)
    fields["logits_via_embedding"] = "decoder/logits_dense/kernel" not in arrays
    fields["decoder_norm_use_scale"] = "decoder/decoder_norm/scale" in arrays
    return fields


def _architecture_hint(arrays: Mapping[str, LazyArray]) -> str:
    tops = sorted({"/".join(n.split("/")[:2]) for n in arrays})
    return f"this checkpoint has {', '.join(tops[:6])}{' ...' if len(tops) > 6 else ''}"


def _num_layers(arrays, stack: str, emb: int, where: str, scanned: bool) -> int:
    if scanned:
        norm = arrays.get(f"{stack}/{stack}/pre_mlp_layer_norm/scale")
        if norm is None or len(norm.shape) != 2:
            raise T5xModelError(f"{where} has a scanned {stack} without {stack}/{stack}/pre_mlp_layer_norm/scale "
                                "(embed, layers)")
        return int(norm.shape[_scan_axis(arrays, stack, emb)])
    layers = sorted({int(m.group(1)) for n in arrays for m in [re.match(rf"{stack}/layers_(\d+)/", n)] if m})
    if not layers:
        raise T5xModelError(f"{where} has no {stack} layers ({stack}/layers_0/...); ul2lab imports T5 "
                            f"encoder-decoders ({_architecture_hint(arrays)})")
    missing = sorted(set(range(layers[-1] + 1)) - set(layers))
    if missing:
        raise T5xModelError(f"{where} lacks {stack} layer(s) {', '.join(f'{stack}/layers_{i}' for i in missing)} "
                            f"(it has layers_{layers[0]} ... layers_{layers[-1]}); the checkpoint is incomplete")
    return layers[-1] + 1


def _scan_axis(arrays, stack: str, emb: int) -> int:
    """The layer axis of a scanned stack: the axis of a norm scale (embed, layers) that is not embed."""
    shape = arrays[f"{stack}/{stack}/pre_mlp_layer_norm/scale"].shape
    if shape[0] == emb and shape[1] != emb:
        return 1
    if shape[1] == emb and shape[0] != emb:
        return 0
    return T5X_SCAN_AXIS


def _drop_axis(shape: tuple, axis: int) -> tuple:
    return tuple(d for i, d in enumerate(shape) if i != axis)


# ----------------------------------------------------------------------------- the parameter map

def _kernel_2d(path: str, shape: tuple) -> Optional[tuple]:
    """t5x's 2-D form of a ul2lab 3-D attention kernel (None for every other parameter)."""
    if len(shape) != 3 or not path.endswith("/kernel"):
        return None
    if path.endswith("/out/kernel"):
        return (shape[0] * shape[1], shape[2])
    return (shape[0], shape[1] * shape[2])


def expected_params(config: T5Config) -> Dict[str, tuple]:
    """{"/"-joined ul2lab parameter path: shape} of `config`'s network (shapes only, nothing allocated)."""
    shapes = jax.eval_shape(lambda: network.init_params(config, jax.random.PRNGKey(0)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def import_params(arrays: Mapping[str, LazyArray], config: T5Config, where: str
                  ) -> Tuple[Dict[str, LazyArray], Dict[str, str]]:
    """({ul2lab path: LazyArray in ul2lab's layout}, {ul2lab path: the t5x name it came from}); every t5x
    array is used exactly once, or a T5xModelError names the missing or left-over ones."""
    out: Dict[str, LazyArray] = {}
    source_of: Dict[str, str] = {}
    for path, shape in expected_params(config).items():
        source = path
        scan_axis = None
        if config.scan_layers and path.split("/")[1:2] == ["layers"]:
            stack = path.split("/")[0]
            source = f"{stack}/{stack}/" + path.split("/", 2)[2]
            scan_axis = _scan_axis(arrays, stack, config.emb_dim)
        if source not in arrays:
            raise T5xModelError(f"{where} lacks parameter {source} (shape {shape} expected); the checkpoint is "
                                "incomplete or of another architecture")
        out[path] = _to_ul2lab(arrays[source], source, path, shape, scan_axis, where)
        source_of[path] = source
    left = sorted(set(arrays) - set(source_of.values()))
    if left:
        raise T5xModelError(f"{where} has parameters ul2lab's network does not: {', '.join(left[:3])}"
                            f"{' ...' if len(left) > 3 else ''} (another architecture?)")
    return out, source_of


def _to_ul2lab(lazy: LazyArray, source: str, path: str, shape: tuple, scan_axis: Optional[int],
               where: str) -> LazyArray:
    layer_shape = shape[1:] if scan_axis is not None else shape
    flat = _kernel_2d(path, layer_shape)
    stored = lazy.shape if scan_axis is None else _drop_axis(lazy.shape, scan_axis)
    scanned_ok = scan_axis is None or (len(lazy.shape) > scan_axis and lazy.shape[scan_axis] == shape[0])
    if not scanned_ok or stored not in (layer_shape, flat):
        raise T5xModelError(f"{where}: parameter {source} is {lazy.shape}; this model needs "
                            f"{shape if scan_axis is None else layer_shape} per layer"
                            f"{f' or {flat}' if flat else ''}: the checkpoint mixes model shapes")

    def load():
        array = lazy.load()
        if scan_axis is not None:
            array = np.moveaxis(array, scan_axis, 0)
        return np.ascontiguousarray(array.reshape(shape), np.float32)
    return LazyArray(shape, np.float32, load)


def export_params(arrays: Mapping[str, LazyArray]) -> Dict[str, LazyArray]:
    """{t5x name: LazyArray in t5x's layout} of ul2lab params: unrolled layers_<i>, 2-D attention kernels.

    A scanned stack's arrays are read once each: their layers come out one after another, sharing it."""
    out: Dict[str, LazyArray] = {}
    for path, lazy in arrays.items():
        parts = path.split("/")
        if len(parts) > 2 and parts[0] in STACKS and parts[1] == "layers":
            cache: List[Any] = [None]

            def load_stacked(lazy=lazy, cache=cache):
                if cache[0] is None:
                    cache[0] = lazy.load()
                return cache[0]

            for i in range(lazy.shape[0]):
                name = "/".join([parts[0], f"layers_{i}"] + parts[2:])
                last = i == lazy.shape[0] - 1
                out[name] = _to_t5x(name, lazy.shape[1:], lambda i=i, last=last, load=load_stacked, cache=cache:
                                    _layer(load, cache, i, last))
        else:
            out[path] = _to_t5x(path, lazy.shape, lazy.load)
    return out


def _layer(load, cache: list, i: int, last: bool) -> np.ndarray:
    layer = np.array(load()[i])
    if last:
        cache[0] = None  # the stacked array is dropped once its last layer is out
    return layer


def _to_t5x(name: str, shape: tuple, load) -> LazyArray:
    flat = _kernel_2d(name, shape) or shape
    return LazyArray(flat, np.float32, lambda: np.ascontiguousarray(np.asarray(load(), np.float32).reshape(flat)))


# ----------------------------------------------------------------------------- Adafactor state

def import_adafactor_state(arrays: Mapping[str, LazyArray], config: T5Config, step: int, where: str):
    """The state of ul2lab's default Adafactor (t5x's defaults) from t5x's `state/param_states`.

    t5x's Adafactor keeps per parameter v_row/v_col (factored second moments), v (unfactored) and m
    (momentum), unused ones as zeros of shape (1,). For 2-D parameters (every kernel t5x's examples/t5
    network stores) t5x factors by its heuristic (the two largest dimensions, if both >= 128), which is
    optax's rule too, and ul2lab factors attention kernels in their 2-D view: the arrays map one to one.
    Naming: optax (like t5x's heuristic factoring) calls `v_row` the moment averaged over a matrix's
    larger dimension; t5x's logical factor rules (its default gin) call `v_row` the one averaged over
    the non-embed dimension. Where the two differ (an attention kernel with embed > heads * kv, as in
    T5.1.1 small) the shapes differ, and each t5x array goes to the slot of its shape: the factored
    second moment is the same outer product either way.
    Counts become `step`. Anything else (momentum, another factoring, scanned layers) is an error."""
    from ul2lab.train import state as train_state  # the trainer's optimizer, so its state restores

    if config.scan_layers:
        raise T5xModelError(f"{where}: --with_optimizer_state reads unrolled layers (layers_<i>); this checkpoint "
                            "is scanned: import without it (the moments start from zero, as in t5x)")
    abstract_params = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in expected_params(config).items()}
    # a schedule, as the trainer always passes one: its state counts steps too (set to `step` below)
    optimizer = train_state.default_optimizer(learning_rate=lambda count: 0.0)
    abstract = jax.eval_shape(optimizer.init, traverse_util.unflatten_dict(abstract_params, sep="/"))
    problems: List[str] = []

    for name, lazy in arrays.items():
        if name.startswith("state/param_states/") and name.endswith("/m") and lazy.shape != (1,):
            problems.append(f"{name} holds momentum {lazy.shape} (Adafactor beta1); ul2lab's default has none")

    def leaf(path, abstract_leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        field = next((k for k in keys if k in ("count", "v_row", "v_col", "v")), None)
        if field == "count":
            return np.asarray(step, np.int32)
        param = "/".join(str(k) for k in keys if isinstance(k, str) and k not in ("v_row", "v_col", "v"))
        name = f"state/param_states/{param}/{field}"
        shape = tuple(abstract_leaf.shape)
        if field is None or name not in arrays:
            problems.append(f"no {name}")
            return np.zeros(shape, np.float32)
        other = f"state/param_states/{param}/{_OTHER_FACTOR.get(field)}"
        if arrays[name].shape != shape and other in arrays and arrays[other].shape == shape:
            return arrays[other]  # the same moment under t5x's factor rules' name (see above)
        if arrays[name].shape != shape:
            problems.append(f"{name} is {arrays[name].shape}, ul2lab's Adafactor keeps {shape}")
        return arrays[name]

    state = jax.tree_util.tree_map_with_path(leaf, abstract)
    if problems:
        raise T5xModelError(f"{where}: the optimizer state is not t5x's Adafactor for this model ({'; '.join(problems[:3])}"
                            f"{' ...' if len(problems) > 3 else ''}); import without --with_optimizer_state")
    return state
