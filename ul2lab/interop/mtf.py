"""Mesh TensorFlow T5 checkpoints (the original T5 and T5.1.1 releases) as t5x-named arrays.

    arrays, step = mtf.open_checkpoint("/models/t5.1.1.base")   # {t5x name: LazyArray}, global_step

Variable names as the T5 releases write them (facts from t5x/checkpoint_importer.py, which maps them
the same way) and their t5x names; every kernel is already in t5x's 2-D layout:

    shared/embedding                                       token_embedder/embedding
    {encoder,decoder}/block_<i>/layer_000/SelfAttention/   .../layers_<i>/{attention,self_attention}/
        {q,k,v,o}                                              {query,key,value,out}/kernel
    decoder/block_<i>/layer_001/EncDecAttention/{q,k,v,o}  decoder/layers_<i>/encoder_decoder_attention/...
    .../block_000/layer_000/SelfAttention/relative_attention_bias   <stack>/relpos_bias/rel_embedding
    .../block_<i>/layer_<j>/DenseReluDense/{wi,wi_0,wi_1,wo}/kernel  .../layers_<i>/mlp/<same>/kernel
    .../block_<i>/layer_<j>/{layer,rms}_norm/scale         .../layers_<i>/pre_*_layer_norm/scale
    {encoder,decoder}/{final_layer,rms}_norm/scale         encoder/encoder_norm, decoder/decoder_norm
    decoder/logits/kernel                                  decoder/logits_dense/kernel (T5.1.1's own head)

Adafactor slots (`*_slot_vr`, `*_slot_vc`, `*_slot_v`) and `global_step` are not parameters.
TensorFlow is imported only here, and only when a checkpoint is read.
"""
import os
import re
from typing import Dict, Optional, Tuple

import numpy as np

from ul2lab.errors import UserError
from ul2lab.train.checkpoints import LazyArray

OPERATIVE_GIN = "operative_config.gin"
_SLOT = re.compile(r".*_slot_(vr|vc|v|m)$")
_NORMS = {"encoder": ("pre_attention_layer_norm", "pre_mlp_layer_norm"),
          "decoder": ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm", "pre_mlp_layer_norm")}
_ATTENTION = {("encoder", "SelfAttention"): "attention", ("decoder", "SelfAttention"): "self_attention",
              ("decoder", "EncDecAttention"): "encoder_decoder_attention"}
_MATRIX = {"q": "query", "k": "key", "v": "value", "o": "out"}


class MtfFormatError(UserError, ValueError):
    """A path that is not a readable Mesh TensorFlow T5 checkpoint."""


def t5x_name(name: str) -> Optional[str]:
    """The t5x parameter name of a Mesh TF T5 variable (None for what is not a parameter)."""
    if name == "global_step" or _SLOT.match(name):
        return None
    if name == "shared/embedding":
        return "token_embedder/embedding"
    m = re.fullmatch(r"(encoder|decoder)/block_(\d+)/layer_(\d+)/(SelfAttention|EncDecAttention)/([qkvo])", name)
    if m:
        stack, block, _, kind, matrix = m.groups()
        if (stack, kind) in _ATTENTION:
            return f"{stack}/layers_{int(block)}/{_ATTENTION[stack, kind]}/{_MATRIX[matrix]}/kernel"
    m = re.fullmatch(r"(encoder|decoder)/block_(\d+)/layer_000/SelfAttention/relative_attention_bias", name)
    if m:  # T5 shares block 0's table across the stack; other blocks' tables would be per-layer ones
        stack, block = m.groups()
        return f"{stack}/relpos_bias/rel_embedding" if int(block) == 0 else \
            f"{stack}/layers_{int(block)}/relpos_bias/rel_embedding"
    m = re.fullmatch(r"(encoder|decoder)/block_(\d+)/layer_\d+/DenseReluDense/(wi|wo|wi_\d+)/kernel", name)
    if m:
        stack, block, matrix = m.groups()
        return f"{stack}/layers_{int(block)}/mlp/{matrix}/kernel"
    m = re.fullmatch(r"(encoder|decoder)/block_(\d+)/layer_(\d+)/(?:layer|rms)_norm/scale", name)
    if m:
        stack, block, layer = m.groups()
        if int(layer) < len(_NORMS[stack]):
            return f"{stack}/layers_{int(block)}/{_NORMS[stack][int(layer)]}/scale"
    m = re.fullmatch(r"(encoder|decoder)/(?:final_layer|rms)_norm/scale", name)
    if m:
        return f"{m.group(1)}/{m.group(1)}_norm/scale"
    if name == "decoder/logits/kernel":
        return "decoder/logits_dense/kernel"
    return ""  # a variable of something else


def checkpoint_prefix(path: str) -> str:
    """The checkpoint prefix (…/model.ckpt-<step>) `path` means: the prefix itself or its folder (latest)."""
    if "://" in path:
        raise MtfFormatError(f"{path}: remote paths are not read directly; copy the checkpoint first "
                             f"(gsutil -m cp -r {path} .) and pass the local folder")
    if os.path.isfile(path + ".index"):
        return path
    if not os.path.isdir(path):
        raise MtfFormatError(f"{path} does not exist; pass the folder of a Mesh TensorFlow T5 checkpoint "
                             "(with its `checkpoint` file and model.ckpt-<step>.index/.data files)")
    tf = _tensorflow()
    prefix = tf.train.latest_checkpoint(path)
    if prefix is None:
        indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
        if not indexes:
            hint = (" (it looks like a t5x checkpoint: use `ul2lab import-t5x`)"
                    if any(f.startswith("checkpoint_") for f in os.listdir(path)) else "")
            raise MtfFormatError(f"{path} is not a TensorFlow checkpoint: no model.ckpt-<step>.index file{hint}")
        steps = [(int(m.group(1)) if m else -1, f) for f in indexes for m in [re.search(r"-(\d+)\.index$", f)]]
        prefix = os.path.join(path, max(steps)[1][:-len(".index")])
    return prefix


def open_checkpoint(path: str) -> Tuple[Dict[str, LazyArray], int, str]:
    """({t5x name: float32 LazyArray}, global_step, checkpoint prefix) of a Mesh TF T5 checkpoint."""
    prefix = checkpoint_prefix(path)
    tf = _tensorflow()
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
    except Exception as e:  # noqa: BLE001  TensorFlow's words on what it could not read
        raise MtfFormatError(f"{prefix} is not a readable TensorFlow checkpoint "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:240]}); copy it again") from None
    arrays: Dict[str, LazyArray] = {}
    unknown = []
    for name, shape in sorted(shapes.items()):
        target = t5x_name(name)
        if target is None:
            continue
        if not target:
            unknown.append(name)
            continue
        arrays[target] = LazyArray(tuple(shape), np.float32, lambda name=name: _read(reader, prefix, name))
    if unknown:
        raise MtfFormatError(f"{prefix} has variables that are not Mesh TensorFlow T5 parameters: "
                             f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} (another architecture?)")
    step = int(reader.get_tensor("global_step")) if "global_step" in shapes else 0
    return arrays, step, prefix


def _read(reader, prefix: str, name: str) -> np.ndarray:
    try:
        value = reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001  a damaged or missing .data shard
        raise MtfFormatError(f"{prefix}: variable {name} cannot be read ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}); the checkpoint is incomplete or damaged") from None
    return np.asarray(value).astype(np.float32)


def _tensorflow():
    import tensorflow as tf  # the data extra; only Mesh TF import needs it here
    return tf
