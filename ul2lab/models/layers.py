"""T5 building blocks with t5x's parameter names and logical axis names.

Every parameter is created float32 and boxed with its logical axes
(`nn.with_logical_partitioning`), so `ul2lab.train.partitioning` can map them onto a
mesh; computation runs in the module's `dtype` (bfloat16 by default).
Activations carry `nn.with_logical_constraint` annotations, which are no-ops
unless a mesh and logical axis rules are in context.
"""
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct
from jax import lax

from ul2lab.models import packed_attention

Dtype = Any
Initializer = Callable[..., jax.Array]

# jax.nn.dot_product_attention backend behind attention_impl="cudnn". Tests set it to
# "xla" to run that exact code path on CPU; users never need to touch it.
FUSED_ATTENTION_BACKEND = "cudnn"

# large negative logit for masked keys: a fully masked (padding) query row then
# becomes a harmless uniform softmax instead of NaN (the fused kernel uses the same value)
_MASKED_LOGIT = packed_attention.MASKED_LOGIT


def _kernel_init(in_axis, out_axis, scale=1.0) -> Initializer:
    # t5x: variance_scaling(1.0, 'fan_in', 'truncated_normal') over the flattened kernel
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


class LayerNorm(nn.Module):
    """T5's RMS norm: no mean subtraction, no bias, computed in float32."""
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    use_scale: bool = True

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, jnp.float32)
        y = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                               (x.shape[-1],), jnp.float32)
            y = y * scale
        return y.astype(self.dtype)


class DenseGeneral(nn.Module):
    """Bias-free dense over `axis` of the input, kernel shaped in_dims + features."""
    features: Tuple[int, ...]
    kernel_axes: Tuple[str, ...]
    axis: Tuple[int, ...] = (-1,)
    kernel_init: Optional[Initializer] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        axis = tuple(a % x.ndim for a in self.axis)
        in_shape = tuple(x.shape[a] for a in axis)
        n_in = len(in_shape)
        init = self.kernel_init or _kernel_init(tuple(range(n_in)),
                                                tuple(range(n_in, n_in + len(self.features))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            in_shape + tuple(self.features), jnp.float32)
        x = jnp.asarray(x, self.dtype)
        kernel = jnp.asarray(kernel, self.dtype)
        return lax.dot_general(x, kernel, ((axis, tuple(range(n_in))), ((), ())))


class Embed(nn.Module):
    """Token embedding (vocab, embed), std 1.0 as t5x; `attend` gives tied logits."""
    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, query):
        return jnp.dot(jnp.asarray(query, self.dtype), jnp.asarray(self.embedding, self.dtype).T)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """T5's bucketing of (memory - query) positions; numpy float32 to match T5/HF bit for bit.

    Half the buckets are exact offsets, the rest log-spaced up to max_distance. In
    the bidirectional (encoder) case keys after the query use the upper half.
    """
    relative_position = np.asarray(relative_position)
    bucket = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    with np.errstate(divide="ignore"):  # log(0) only where is_small picks the exact bucket
        log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
    fraction = log_ratio / np.float32(np.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    # truncate before adding max_exact, as T5 does (adding first can round up in float32)
    large = max_exact + np.where(is_small, 0, fraction).astype(relative_position.dtype)
    large = np.minimum(large, num_buckets - 1)
    return bucket + np.where(is_small, distance, large)


class RelativePositionBiases(nn.Module):
    """One (heads, buckets) table per stack, shared by all its layers (t5x's `relpos_bias`).

    Positions are 0..len-1, as t5x: in a packed row each segment is contiguous, so
    within-segment offsets equal those of its own positions, and cross-segment pairs
    are masked anyway. So the bias depends on the offset key - query alone.
    """
    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.rel_embedding = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                                         ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets), jnp.float32)

    def _read(self, relative, bidirectional: bool):
        buckets = relative_position_bucket(relative, bidirectional, self.num_buckets, self.max_distance)
        # one-hot contraction rather than a gather: cheap, and shards over heads cleanly
        onehot = jax.nn.one_hot(buckets, self.num_buckets, dtype=self.dtype)
        return jnp.einsum("hb,...b->h...", jnp.asarray(self.rel_embedding, self.dtype), onehot)

    def __call__(self, qlen: int, klen: int, bidirectional: bool):
        """The (1, heads, q, k) bias of the reference attention (and cuDNN's)."""
        relative = np.arange(klen, dtype=np.int32)[None, :] - np.arange(qlen, dtype=np.int32)[:, None]
        return self._read(relative, bidirectional)[None]

    def offset_bias(self, qlen: int, klen: int, bidirectional: bool):
        """(heads, q + k - 1): the bias of every offset key - query from -(q - 1) to k - 1, the form
        the fused kernel takes (it builds each tile of the (q, k) bias from it)."""
        return self._read(np.arange(-(qlen - 1), klen, dtype=np.int32), bidirectional)


def offset_bias_to_dense(offset_bias, qlen: int, klen: int):
    """(1, heads, q, k) bias from an (heads, q + k - 1) offset bias: what the reference path takes."""
    index = np.arange(klen)[None, :] - np.arange(qlen)[:, None] + (qlen - 1)
    return offset_bias[:, index][None]


@struct.dataclass
class SegmentMask:
    """Who attends whom, as per-position ids instead of a dense (batch, 1, q, k) mask.

    Query i attends key j iff query_ids[i] == key_ids[j] != 0 (and j <= i when causal): ids are
    segment ids on real tokens and 0 on padding. The fused kernel reads this form; `dense()` is the
    reference's mask.
    """
    query_ids: jax.Array  # [batch, q] int32
    key_ids: jax.Array    # [batch, k] int32
    causal: bool = struct.field(pytree_node=False, default=False)

    def dense(self):
        mask = (self.query_ids[:, :, None] == self.key_ids[:, None, :]) & (self.key_ids != 0)[:, None, :]
        if self.causal:
            mask = mask & jnp.tril(jnp.ones(mask.shape[1:], bool))
        return mask[:, None]


def segment_ids_for_mask(valid, segment_ids=None):
    """SegmentMask ids: segment id + 1 on real tokens, 0 on padding.

    The shift keeps the reference's meaning for any segment ids >= 0: seqio numbers segments from
    1 and gives padding 0, but a real token whose segment id is 0 is still a real token there.
    Unpacked rows (no segment ids) are one segment."""
    ids = jnp.zeros(valid.shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return jnp.where(valid, ids + 1, 0)


def dot_product_attention(query, key, value, mask, bias, *, dtype, float32_logits: bool,
                          dropout_rate: float = 0.0, dropout_rng=None, deterministic: bool = True):
    """softmax(q·k + bias) v with NO 1/sqrt(head_dim) scaling: T5 folds it into the query init.

    query [b, q, h, d], key/value [b, k, h, d], mask bool broadcastable to [b, h, q, k],
    bias [1, h, q, k] or None.
    """
    if float32_logits:
        query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(_MASKED_LOGIT, logits.dtype))
    weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(dtype)
    if not deterministic and dropout_rate > 0.0:
        # t5x drops whole query rows of the weights (broadcast over queries)
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                    weights.shape[:2] + (1,) + weights.shape[3:])
        weights = weights * (keep / (1.0 - dropout_rate)).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(dtype))


def fused_attention(query, key, value, mask, bias, *, dtype):
    """The same math through jax.nn.dot_product_attention (cuDNN flash attention on GPU).

    With a mask and a bias it combines them into one (batch, heads, q, k) bias: see
    `packed_attention` for the path that never builds it."""
    if bias is not None:
        bias = bias.astype(dtype)  # cuDNN wants the bias in the compute dtype
    return jax.nn.dot_product_attention(query.astype(dtype), key.astype(dtype), value.astype(dtype),
                                        bias=bias, mask=mask, scale=1.0,
                                        implementation=FUSED_ATTENTION_BACKEND)


def sharded_packed_attention(query, key, value, mask: SegmentMask, offset_bias, *, dtype):
    """`packed_attention.packed_attention` in `dtype`, per device when a mesh is in context.

    A Pallas kernel is opaque to XLA's SPMD partitioner, which would gather its operands whole
    onto every device; under shard_map each device runs it on its own rows and heads, split as
    the logical axis rules split the activations (the offset bias follows 'heads').
    """
    call = functools.partial(packed_attention.packed_attention, causal=mask.causal)
    args = [x.astype(dtype) for x in (query, key, value)] + [mask.query_ids, mask.key_ids]
    if offset_bias is not None:
        args.append(offset_bias.astype(dtype))
    run = lambda q, k, v, q_ids, k_ids, bias=None: call(q, k, v, bias, q_ids, k_ids)  # noqa: E731
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(*args)
    act = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    ids = nn.logical_to_mesh_axes(("batch", "length"))
    specs = (act, act, act, ids, ids) + ((nn.logical_to_mesh_axes(("heads", None)),) if offset_bias is not None
                                         else ())
    # the offset bias is replicated over the batch axes: shard_map sums its per-device gradients
    return jax.shard_map(run, in_specs=specs, out_specs=act, check_vma=False)(*args)


class MultiHeadDotProductAttention(nn.Module):
    """t5x's attention: query/key/value kernels (embed, heads, kv), out kernel (heads, kv, embed).

    `mask` is a dense bool (batch, 1, q, k) mask with `bias` (1, heads, q, k) or None (the
    reference and cuDNN paths), or a SegmentMask with `bias` an (heads, q + k - 1) offset bias
    or None (attention_impl="pallas": the fused kernel; the reference path when dropout is on).
    """
    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    float32_logits: bool = False
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, mask, bias=None, *, deterministic: bool = True,
                 decode: bool = False):
        emb_dim = inputs_q.shape[-1]
        qkv_axes = ("embed", "heads", "kv")
        # T5 has no logit scaling, so the query init carries 1/sqrt(head_dim) instead
        dense = functools.partial(DenseGeneral, features=(self.num_heads, self.head_dim),
                                  kernel_axes=qkv_axes, dtype=self.dtype)
        query = dense(kernel_init=_kernel_init(0, (1, 2), scale=1.0 / self.head_dim), name="query")(inputs_q)
        key = dense(name="key")(inputs_kv)
        value = dense(name="value")(inputs_kv)
        act_axes = ("batch", "length", "heads", "kv")
        query = nn.with_logical_constraint(query, act_axes)
        key = nn.with_logical_constraint(key, act_axes)
        value = nn.with_logical_constraint(value, act_axes)

        dropout_active = not deterministic and self.dropout_rate > 0.0
        packed = isinstance(mask, SegmentMask)
        if packed and decode:
            raise ValueError("decode=True takes a dense mask (the key/value cache path), not a SegmentMask")
        if packed and dropout_active:  # the kernel has no attention dropout: the reference path
            if bias is not None:
                bias = offset_bias_to_dense(bias, inputs_q.shape[-2], inputs_kv.shape[-2])
            mask, packed = mask.dense(), False
        if decode:
            key, value, mask, bias = self._update_cache(query, key, value, mask, bias)

        if packed:
            x = sharded_packed_attention(query, key, value, mask, bias, dtype=self.dtype)
        # cuDNN's kernel has no attention dropout and wants full-length queries
        elif self.attention_impl == "cudnn" and not dropout_active and not decode:
            x = fused_attention(query, key, value, mask, bias, dtype=self.dtype)
        else:
            rng = self.make_rng("dropout") if dropout_active else None
            x = dot_product_attention(query, key, value, mask, bias, dtype=self.dtype,
                                      float32_logits=self.float32_logits,
                                      dropout_rate=self.dropout_rate, dropout_rng=rng,
                                      deterministic=deterministic)
        x = nn.with_logical_constraint(x, act_axes)
        out = DenseGeneral(features=(emb_dim,), axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                           dtype=self.dtype, name="out")(x)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def _update_cache(self, query, key, value, mask, bias):
        """Autoregressive step: write this token's key/value at cache_index, attend to the prefix.

        The first call (inside init / eval_shape with the full target length) only
        creates the cache variables, as t5x does.
        """
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return key, value, mask, bias
        batch, length, heads, head_dim = cached_key.value.shape
        if query.shape != (batch, 1, heads, head_dim):
            raise ValueError(f"decode=True takes one token per step: query shape {query.shape}, "
                             f"expected {(batch, 1, heads, head_dim)}")
        i = cache_index.value
        cached_key.value = lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), (0, i, 0, 0))
        cached_value.value = lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype), (0, i, 0, 0))
        cache_index.value = i + 1
        prefix = (jnp.arange(length) <= i)[None, None, None, :]
        mask = prefix if mask is None else jnp.logical_and(mask, prefix)
        if bias is not None:  # the full (length x length) causal bias: take this query's row
            bias = lax.dynamic_slice_in_dim(bias, i, 1, axis=-2)
        return cached_key.value, cached_value.value, mask, bias


_ACTIVATIONS = {"gelu": functools.partial(jax.nn.gelu, approximate=True),  # HF's "gelu_new"
                "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
                "linear": lambda x: x}


class MlpBlock(nn.Module):
    """t5x's MLP: one `wi_<i>` per activation (multiplied together), or `wi` alone, then `wo`."""
    mlp_dim: int
    activations: Sequence[str] = ("gelu", "linear")
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        emb_dim = x.shape[-1]
        h = None
        for i, act in enumerate(self.activations):
            name = f"wi_{i}" if len(self.activations) > 1 else "wi"
            y = _ACTIVATIONS[act](DenseGeneral((self.mlp_dim,), ("embed", "mlp"), dtype=self.dtype,
                                               name=name)(x))
            h = y if h is None else h * y
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
        out = DenseGeneral((emb_dim,), ("mlp", "embed"), dtype=self.dtype, name="wo")(h)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


def make_attention_mask(query_input, key_input, pairwise_fn=jnp.multiply):
    """Bool mask [batch, 1, q, k] from per-position query and key values."""
    mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
    return mask[:, None].astype(bool)


def combine_masks(*masks):
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out
