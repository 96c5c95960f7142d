"""Hugging Face T5 interop: read and write `transformers` T5 directories as t5x-named params.

    config, params = ul2lab.interop.hf.load(hf_dir)            # HF T5 / mT5 dir -> (T5Config, params)
    ul2lab.interop.hf.save(config, params, out_dir, vocab_path)  # -> config.json, model.safetensors, ...

One table (`_tensor_map`) names every tensor on both sides; the few layouts that
differ (HF's Linear is (out, in); t5x splits attention kernels per head; HF keeps
the relative-position table as (buckets, heads)) are the `_Layout` entries.
Weights are read with the safetensors numpy API; torch is imported only for
`pytorch_model.bin` directories and transformers only to write tokenizer files.
"""
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from flax import traverse_util

from ul2lab.errors import UserError
from ul2lab.files import atomic_path, atomic_write_json, stop_if_interrupted
from ul2lab.models import network
from ul2lab.models.config import T5Config
from ul2lab.models.special_ids import DECODER_START_ID, EOS_ID, PAD_ID

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
SPM_FILE = "spiece.model"            # the name HF's T5 tokenizer gives its SentencePiece model
SUPPORTED_MODEL_TYPES = ("t5", "mt5")
# HF writes these copies of shared.weight (or an unused table) in some checkpoints; they carry nothing new
_REDUNDANT = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

# HF feed_forward_proj <-> t5x mlp_activations. HF's "gated-gelu" is the tanh approximation
# (gelu_new), which is what flax's nn.gelu computes by default; HF's plain "gelu" is the exact erf
# form, which t5x cannot express, so it is not listed.
_ACTIVATIONS = {
    "gated-gelu": ("gelu", "linear"),
    "gated-silu": ("silu", "linear"),
    "gated-relu": ("relu", "linear"),
    "relu": ("relu",),
    "silu": ("silu",),
    "gelu_new": ("gelu",),
}


class HFFormatError(UserError, ValueError):
    """An HF directory (or export target) that is not a T5 model this module can convert."""


# ----------------------------------------------------------------------------- tensor layouts

@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one tensor's HF array becomes the t5x array and back."""
    to_t5x: Callable[[np.ndarray, T5Config], np.ndarray]
    to_hf: Callable[[np.ndarray, T5Config], np.ndarray]


_SAME = _Layout(lambda w, c: w, lambda w, c: w)
# nn.Linear stores (out, in); a t5x DenseGeneral kernel is (in, out). Also the relpos table.
_TRANSPOSED = _Layout(lambda w, c: w.T, lambda w, c: w.T)
# q/k/v: (heads*head_dim, embed) -> (embed, heads, head_dim); HF's rows are head-major like t5x's
_HEADS_OUT = _Layout(lambda w, c: w.T.reshape(c.emb_dim, c.num_heads, c.head_dim),
                     lambda w, c: w.reshape(c.emb_dim, -1).T)
# o: (embed, heads*head_dim) -> (heads, head_dim, embed)
_HEADS_IN = _Layout(lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.emb_dim),
                    lambda w, c: w.reshape(-1, c.emb_dim).T)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    hf_name: str
    path: str                 # t5x parameter path, "/"-joined
    hf_shape: Tuple[int, ...]
    layout: _Layout


def _mlp_names(config: T5Config) -> List[str]:
    # t5x's MlpBlock: one input projection is "wi", several are "wi_0", "wi_1", ...
    n = len(config.mlp_activations)
    return ["wi"] if n == 1 else [f"wi_{i}" for i in range(n)]


def _tensor_map(config: T5Config, logits_dense: bool) -> List[_Tensor]:
    """Every tensor of an HF T5ForConditionalGeneration, paired with its t5x parameter."""
    c = config
    joined = c.num_heads * c.head_dim

    def dense(hf_prefix, hf, t5x_prefix, t5x, hf_shape, layout):
        return _Tensor(f"{hf_prefix}.{hf}.weight", f"{t5x_prefix}/{t5x}/kernel", hf_shape, layout)

    def attention(hf_prefix, t5x_prefix):
        return ([dense(hf_prefix, h, t5x_prefix, t, (joined, c.emb_dim), _HEADS_OUT)
                 for h, t in (("q", "query"), ("k", "key"), ("v", "value"))] +
                [dense(hf_prefix, "o", t5x_prefix, "out", (c.emb_dim, joined), _HEADS_IN)])

    def mlp(hf_prefix, t5x_prefix):
        return ([dense(hf_prefix, w, t5x_prefix, w, (c.mlp_dim, c.emb_dim), _TRANSPOSED)
                 for w in _mlp_names(c)] +
                [dense(hf_prefix, "wo", t5x_prefix, "wo", (c.emb_dim, c.mlp_dim), _TRANSPOSED)])

    def norm(hf_name, t5x_prefix):
        return [_Tensor(hf_name, f"{t5x_prefix}/scale", (c.emb_dim,), _SAME)]

    def relpos(hf_name, stack):
        return [_Tensor(hf_name, f"{stack}/relpos_bias/rel_embedding",
                        (c.relative_attention_num_buckets, c.num_heads), _TRANSPOSED)]

    tensors = [_Tensor("shared.weight", "token_embedder/embedding", (c.vocab_size, c.emb_dim), _SAME)]
    tensors += relpos("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder")
    for i in range(c.num_encoder_layers):
        hf, t5x = f"encoder.block.{i}.layer", f"encoder/layers_{i}"
        tensors += norm(f"{hf}.0.layer_norm.weight", f"{t5x}/pre_attention_layer_norm")
        tensors += attention(f"{hf}.0.SelfAttention", f"{t5x}/attention")
        tensors += norm(f"{hf}.1.layer_norm.weight", f"{t5x}/pre_mlp_layer_norm")
        tensors += mlp(f"{hf}.1.DenseReluDense", f"{t5x}/mlp")
    tensors += norm("encoder.final_layer_norm.weight", "encoder/encoder_norm")
    tensors += relpos("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "decoder")
    for i in range(c.num_decoder_layers):
        hf, t5x = f"decoder.block.{i}.layer", f"decoder/layers_{i}"
        tensors += norm(f"{hf}.0.layer_norm.weight", f"{t5x}/pre_self_attention_layer_norm")
        tensors += attention(f"{hf}.0.SelfAttention", f"{t5x}/self_attention")
        tensors += norm(f"{hf}.1.layer_norm.weight", f"{t5x}/pre_cross_attention_layer_norm")
        tensors += attention(f"{hf}.1.EncDecAttention", f"{t5x}/encoder_decoder_attention")
        tensors += norm(f"{hf}.2.layer_norm.weight", f"{t5x}/pre_mlp_layer_norm")
        tensors += mlp(f"{hf}.2.DenseReluDense", f"{t5x}/mlp")
    tensors += norm("decoder.final_layer_norm.weight", "decoder/decoder_norm")
    if logits_dense:
        tensors.append(_Tensor("lm_head.weight", "decoder/logits_dense/kernel",
                               (c.vocab_size, c.emb_dim), _TRANSPOSED))
    return tensors


# ----------------------------------------------------------------------------- config

def _config_from_hf(hf: dict, where: str) -> Tuple[T5Config, bool]:
    """(T5Config, whether HF scales decoder outputs by d_model**-0.5 before the LM head)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFFormatError(f"{where} holds a {model_type!r} model, not a T5-family one; import-hf converts "
                            f"model_type {' or '.join(SUPPORTED_MODEL_TYPES)} (T5, T5.1.1, Flan-T5, mT5, "
                            "UL2)")
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers") if k not in hf]
    if missing:
        raise HFFormatError(f"{where}/config.json lacks {missing}; write it with transformers' "
                            "T5Config.save_pretrained")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _ACTIVATIONS:
        raise HFFormatError(f"{where} has feed_forward_proj {proj!r}, which ul2lab's network does not "
                            f"implement; supported: {sorted(_ACTIVATIONS)}")
    # transformers' rule: T5 1.0 (tied) scales the decoder output before the LM head, T5.1.1
    # (untied) does not; transformers>=5 writes the flag itself, older versions only
    # tie_word_embeddings. Its mT5 (like every official mT5 checkpoint) never scales.
    if model_type == "mt5":
        scale = False
    else:
        scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    config = T5Config(
        vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"],
        num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], mlp_activations=_ACTIVATIONS[proj],
        dropout_rate=hf.get("dropout_rate", 0.1), logits_via_embedding=bool(scale),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), dtype="float32")
    return config, bool(scale)


def _config_to_hf(config: T5Config) -> dict:
    proj = {v: k for k, v in _ACTIVATIONS.items()}.get(tuple(config.mlp_activations))
    if proj is None:
        raise HFFormatError(f"mlp_activations {config.mlp_activations} have no Hugging Face T5 equivalent; "
                            f"exportable: {sorted(map(list, _ACTIVATIONS.values()))}")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "feed_forward_proj": proj,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "dropout_rate": config.dropout_rate,
        # tied <=> T5 1.0's scaled logits; read by every transformers version
        "tie_word_embeddings": config.logits_via_embedding,
        "scale_decoder_outputs": config.logits_via_embedding,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "dtype": "float32",
    }


# ----------------------------------------------------------------------------- reading weights

class _WeightReader:
    """name -> float32 numpy array, from whichever weight files an HF directory holds."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._torch_cache: Dict[str, Dict[str, np.ndarray]] = {}  # the one .bin file last read
        self.files = self._weight_files()  # name -> file

    def _weight_files(self) -> Dict[str, str]:
        for index in (SAFE_INDEX, TORCH_INDEX):
            path = os.path.join(self.hf_dir, index)
            if os.path.exists(path):
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
                missing = sorted({f for f in weight_map.values()
                                  if not os.path.exists(os.path.join(self.hf_dir, f))})
                if missing:
                    raise HFFormatError(f"{path} lists weight shards that are not in {self.hf_dir}: "
                                        f"{missing[:3]}; download the complete model")
                return {name: os.path.join(self.hf_dir, f) for name, f in weight_map.items()}
        for single in (SAFE_WEIGHTS, TORCH_WEIGHTS):
            path = os.path.join(self.hf_dir, single)
            if os.path.exists(path):
                return {name: path for name in self._names_in(path)}
        raise HFFormatError(f"{self.hf_dir} has no weights: expected {SAFE_WEIGHTS} (or {TORCH_WEIGHTS}, "
                            "or a sharded index); download the model files, not only its config")

    def _names_in(self, path: str) -> List[str]:
        try:
            if path.endswith(".safetensors"):
                safe_open = _hf_package("safetensors").safe_open
                with safe_open(path, framework="np") as f:
                    return list(f.keys())
            return list(self._torch_file(path))
        except Exception as e:  # the reader's own message says what is wrong with the bytes
            raise HFFormatError(f"{path} is not a readable weights file ({type(e).__name__}: "
                                f"{' '.join(str(e).split())}); download it again") from e

    def _torch_file(self, path: str) -> Dict[str, np.ndarray]:
        if path not in self._torch_cache:
            import torch  # only for pytorch_model.bin directories
            state = torch.load(path, map_location="cpu", weights_only=True)
            self._torch_cache = {path: {k: v.float().numpy() for k, v in state.items()}}
        return self._torch_cache[path]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> np.ndarray:
        path = self.files[name]
        if not path.endswith(".safetensors"):
            return self._torch_file(path)[name]
        safe_open = _hf_package("safetensors").safe_open
        with safe_open(path, framework="np") as f:
            if f.get_slice(name).get_dtype() != "BF16":
                return np.asarray(f.get_tensor(name), np.float32)
        # numpy has no bfloat16; the flax reader returns a jax array that converts exactly
        with safe_open(path, framework="flax") as f:
            return np.asarray(f.get_tensor(name), np.float32)


# ----------------------------------------------------------------------------- load / save

def load(hf_dir: str, scan_layers: bool = False) -> Tuple[T5Config, dict]:
    """(config, float32 t5x-named params) of a Hugging Face T5 / mT5 directory.

    scan_layers=True gives a scan_layers config with each stack's layers stacked (`layers`).
    """
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise HFFormatError(f"{hf_dir} is not a directory; pass the folder that holds the HF model's "
                            "config.json and model.safetensors")
    if not os.path.exists(config_path):
        raise HFFormatError(f"{hf_dir} has no config.json; pass the folder of a saved Hugging Face model "
                            "(what save_pretrained writes)")
    with open(config_path) as f:
        config, scale = _config_from_hf(json.load(f), hf_dir)
    weights = _WeightReader(hf_dir)

    # An LM head that is absent or equal to the embedding is the embedding; if HF does not scale
    # its input (T5.1.1 saved by transformers>=5, which always ties), it becomes an untied
    # logits_dense initialised from the embedding -- the same function.
    def read(name):
        if name not in weights:
            raise HFFormatError(f"{hf_dir} lacks weight {name!r} that its config.json implies "
                                f"({config.num_encoder_layers} encoder / {config.num_decoder_layers} decoder "
                                "layers); is it a complete T5ForConditionalGeneration (not an encoder-only "
                                "model)?")
        return weights[name]

    lm_head = weights["lm_head.weight"] if "lm_head.weight" in weights else None
    if scale and lm_head is not None and not np.array_equal(lm_head, read("shared.weight")):
        raise HFFormatError(f"{hf_dir} has an lm_head different from its embedding but scales logits like a "
                            "tied T5 1.0 model (tie_word_embeddings true); ul2lab cannot express that "
                            "combination -- set tie_word_embeddings false in config.json if it is T5.1.1")

    flat, expected = {}, set()
    for t in _tensor_map(config, logits_dense=not scale):
        expected.add(t.hf_name)
        name = "shared.weight" if (t.hf_name == "lm_head.weight" and lm_head is None) else t.hf_name
        w = read(name)
        if tuple(w.shape) != t.hf_shape:
            raise HFFormatError(f"{hf_dir}: weight {name!r} has shape {tuple(w.shape)} but config.json "
                                f"implies {t.hf_shape}; config.json and the weights are of different models")
        flat[t.path] = np.ascontiguousarray(t.layout.to_t5x(w, config), np.float32)
    unexpected = sorted(set(weights.files) - expected - set(_REDUNDANT) - {"lm_head.weight"})
    if unexpected:
        raise HFFormatError(f"{hf_dir} has weights a T5ForConditionalGeneration does not: {unexpected[:3]}"
                            f"{' ...' if len(unexpected) > 3 else ''}; is it another architecture?")
    params = traverse_util.unflatten_dict(flat, sep="/")
    if scan_layers:
        return config.replace(scan_layers=True), network.stack_layers(params)
    return config, params


def _export_plan(config: T5Config, params: dict) -> List[Tuple[_Tensor, Optional[np.ndarray]]]:
    """Each HF tensor with its t5x param (None: write ones), every shape checked before any writing."""
    if network.is_stacked(params):  # a scan_layers model: HF numbers its layers like layers_<i>
        params = network.unstack_layers(params)
    flat = traverse_util.flatten_dict(params, sep="/")
    plan = []
    for t in _tensor_map(config, logits_dense=not config.logits_via_embedding):
        if t.path == "decoder/decoder_norm/scale" and not config.decoder_norm_use_scale:
            plan.append((t, None))  # UL2-20B's unscaled decoder norm == a scale of ones
            continue
        if t.path not in flat:
            raise HFFormatError(f"params have no {t.path!r}, which the config implies; are these params of "
                                "this config?")
        # np.empty touches no memory and every layout is a view, so this costs nothing
        expected = t.layout.to_t5x(np.empty(t.hf_shape, np.float32), config).shape
        if np.shape(flat[t.path]) != expected:
            raise HFFormatError(f"param {t.path!r} has shape {np.shape(flat[t.path])} but the config implies "
                                f"{expected}; are these params of this config?")
        plan.append((t, flat[t.path]))
    return plan


def _to_hf(t: _Tensor, param: Optional[np.ndarray], config: T5Config) -> np.ndarray:
    if param is None:
        return np.ones(t.hf_shape, np.float32)
    return np.ascontiguousarray(t.layout.to_hf(np.asarray(param, np.float32), config))


# every file `save` writes (and an older save or save_pretrained may have written): what --overwrite replaces
_EXPORT_FILES = ("config.json", "generation_config.json", SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX,
                 SPM_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def is_export_file(name: str) -> bool:
    """Whether `name` in a folder is a file of an HF model export (weights, shards, configs, tokenizer)."""
    return name in _EXPORT_FILES or re.fullmatch(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)", name) is not None


def holds_hf_model(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f))
               for f in ("config.json", SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX))


def save(config: T5Config, params: dict, out_dir: str, vocab_path: Optional[str] = None,
         overwrite: bool = False, max_shard_bytes: int = 50 * 2**30, extra_ids: int = 100):
    """Write an HF T5ForConditionalGeneration directory (+ tokenizer files when vocab_path is given).

    Refuses a directory that already holds a model unless overwrite=True; everything is checked
    (config, shapes, vocabulary file) before the first file is written.
    """
    save_file = _hf_package("safetensors.numpy").save_file

    if holds_hf_model(out_dir) and not overwrite:
        raise HFFormatError(f"{out_dir} already holds a Hugging Face model; pass --overwrite to replace it, "
                            "or choose another directory")
    if vocab_path is not None and not os.path.isfile(vocab_path):
        raise HFFormatError(f"vocabulary {vocab_path} does not exist; fix vocab_path in the checkpoint's "
                            "config.json or pass --vocab_path")
    hf_config = _config_to_hf(config)
    plan = _export_plan(config, params)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        if vocab_path is not None:  # converted first: a vocabulary transformers rejects writes nothing
            write_tokenizer(vocab_path, tokenizer_dir, extra_ids)
            with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
                ids = len(json.load(f)["model"]["vocab"])
            if ids > config.vocab_size:
                raise HFFormatError(f"vocabulary {vocab_path} has {ids} ids with its {extra_ids} extra ids, more than "
                                    f"the model's vocab_size {config.vocab_size}; pass the vocabulary it was trained with")
        os.makedirs(out_dir, exist_ok=True)
        for stale in os.listdir(out_dir):  # weights of a previous export must not shadow the new ones
            if stale.startswith(("model-", "pytorch_model")) or stale in (SAFE_WEIGHTS, SAFE_INDEX):
                os.remove(os.path.join(out_dir, stale))
        shards = _shard(plan, max_shard_bytes)
        for filename, shard in shards.items():  # one shard in HF layout in memory at a time
            stop_if_interrupted()  # a held Ctrl-C stops between shards
            with atomic_path(os.path.join(out_dir, filename)) as path:
                save_file({t.hf_name: _to_hf(t, param, config) for t, param in shard}, path,
                          metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": 4 * sum(int(np.prod(t.hf_shape)) for t, _ in plan)},
                     "weight_map": {t.hf_name: f for f, shard in shards.items() for t, _ in shard}}
            atomic_write_json(os.path.join(out_dir, SAFE_INDEX), index)
        atomic_write_json(os.path.join(out_dir, "generation_config.json"),
                          {"decoder_start_token_id": DECODER_START_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
        atomic_write_json(os.path.join(out_dir, "config.json"), hf_config)
        for filename in sorted(os.listdir(tokenizer_dir)):
            shutil.copyfile(os.path.join(tokenizer_dir, filename), os.path.join(out_dir, filename))


def _hf_package(name: str):
    """Import a package of the `hf` extra, or say how to install it."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise HFFormatError(f"Hugging Face interop needs the package {name.split('.')[0]!r}, which is "
                            "not installed; install the extra: pip install -e '.[hf]'") from None


def write_tokenizer(vocab_path: str, out_dir: str, extra_ids: int = 100):
    """spiece.model plus tokenizer.json / tokenizer_config.json that give exactly ul2lab's ids.

    ul2lab tokenizes with seqio.SentencePieceVocabulary(vocab_path, extra_ids): the SentencePiece
    model plus one user-defined piece "▁<extra_id_i>" per sentinel, id (pieces + extra_ids - 1 - i),
    and byte fallback (characters outside the vocabulary become UTF-8 byte pieces, never <unk>).
    transformers' own T5 conversion turns byte fallback off and makes the sentinels special tokens
    matched anywhere, which changes ids (`café 😀` -> <unk>s). So tokenizer.json is built from that
    exact model by transformers' SentencePiece-faithful builder: same normalization, byte fallback,
    sentinels matched where SentencePiece matches them (after a space or at the start). One
    difference remains, the Hugging Face convention: text spelling a control piece ("</s>", "<pad>",
    "<unk>", "<0x41>") is that piece's id, where SentencePiece spells it out.
    """
    transformers = _hf_package("transformers")
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    try:
        with open(vocab_path, "rb") as f:
            proto.ParseFromString(f.read())
        if not proto.pieces:
            raise ValueError("it has no pieces")
    except Exception as e:  # a protobuf decode error says what it could not parse
        raise HFFormatError(f"vocabulary {vocab_path} is not a SentencePiece model ({type(e).__name__}: "
                            f"{' '.join(str(e).split())}); pass the .model file of a SentencePiece vocabulary") from None
    if proto.trainer_spec.model_type != 1:
        raise HFFormatError(f"vocabulary {vocab_path} is a SentencePiece {model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}"
                            " model; the exported tokenizer supports unigram models (what `ul2lab vocab` trains by default)")
    for i in reversed(range(extra_ids)):  # seqio's sentinels, as SentencePieceVocabulary adds them
        proto.pieces.add(piece=f"▁<extra_id_{i}>", score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, [(p.piece, p.score) for p in proto.pieces])
    tokenizer.post_processor = processors.TemplateProcessing(  # EOS after each sequence, as seqio's tasks
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", EOS_ID)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>",
                                                pad_token="<pad>", model_max_length=int(1e30))
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(vocab_path, os.path.join(out_dir, SPM_FILE))
    fast.save_pretrained(out_dir)
    # the generic fast tokenizer, by the name both transformers 4 and 5 load (5 saves its new alias)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    atomic_write_json(config_path, {**tokenizer_config, "tokenizer_class": "PreTrainedTokenizerFast"})


def _shard(plan: list, max_bytes: int) -> Dict[str, list]:
    """Split the plan into files of at most max_bytes (HF's names; one file when it all fits)."""
    groups, size = [[]], 0
    for t, param in plan:
        nbytes = 4 * int(np.prod(t.hf_shape))
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((t, param))
        size += nbytes
    if len(groups) == 1:
        return {SAFE_WEIGHTS: groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}
