"""Fused attention for packed T5 rows: the relative-position bias and the segment mask live in the kernel.

T5's attention logits are `q_i . k_j + bias[head, bucket(j - i)]`, kept only where query i and key j
are in the same segment of a packed row, the key is not padding, and (decoder) j <= i. The reference
(`layers.dot_product_attention`) builds a (1, heads, q, k) bias and a (batch, 1, q, k) mask;
`jax.nn.dot_product_attention(implementation="cudnn")` folds the mask into the bias, so the cuDNN
path reads and writes a (batch, heads, q, k) tensor (about 0.8 GB per T5-base encoder layer at
batch 128) that holds 32 learned numbers per head and a block-diagonal mask.

What JAX 0.10 ships, and why it is not enough here:
  - pallas.ops.gpu.attention.mha: one segment_ids array shared by queries and keys (no cross
    attention), no bias, lengths a multiple of the block;
  - pallas.ops.tpu.flash_attention: segment ids, but the bias (`ab`) is a materialized
    (batch, heads, q, k) array; splash attention: segment ids and masks, no additive bias;
  - jax.nn.dot_product_attention: (batch, heads, q, k) bias as above.

So this module is one Pallas kernel family (forward; backward as FlashAttention-2's dk/dv and dq
kernels, plus one that sums dlogits over the batch for the bias gradient). It takes:
  - `offset_bias` [heads, q_len + k_len - 1]: the bias for every relative offset j - i, i.e. the
    (heads, buckets) table read through the bucket function once per offset (by the caller,
    `RelativePositionBiases.offset_bias`, with the reference's own numpy bucket function, so the
    buckets agree bit for bit); each (block_q, block_k) tile of the bias is gathered from it
    inside the kernel, and its gradient comes back per offset, which autodiff folds into the table;
  - segment ids [batch, q_len], [batch, k_len]: int32, equal ids attend, 0 = padding (never a key).

It computes exactly the reference's function, fully masked rows included: a query that may attend
no key (a padding row) gets the uniform average of all k_len values, as the reference's finite
masked logit gives. Lengths are padded up to whole blocks (the extra keys get -inf, the extra
queries are cut off) and head_dim up to a power of two >= 16 (zeros), as Triton wants.

Platforms: on GPU the kernels lower through Pallas' Triton backend; on CPU they run in Pallas'
interpret mode (how the tests check them against the reference). TPU (Mosaic) is not covered:
the in-kernel gather of the bias tile does not lower there.
"""
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# logit of a masked (query, key) pair, as the reference: a fully masked row becomes a uniform
# softmax over the real keys instead of NaN (block padding keys get -inf and drop out entirely)
MASKED_LOGIT = -1e10


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two). Forward tiles are (q, k); the backward kernels use the bwd pair.

    The defaults follow the Triton flash-attention kernels' usual choices for head_dim 64 (a
    larger query tile forward, 64 x 64 backward); they are unmeasured on this kernel:
    bench/train_throughput.py --pallas_block_sizes tries others on a GPU.
    """
    q: int = 128
    k: int = 64
    q_bwd: int = 64
    k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("q", "k", "q_bwd", "k_bwd"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"BlockSizes.{name}={size}: tiles must be powers of two >= 16 (Triton)")


# What the model uses; bench/train_throughput.py replaces it to try other tiles on a GPU.
DEFAULT_BLOCK_SIZES = BlockSizes()


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static shapes of one call after padding (hashable: a nondiff argument of the custom_vjp)."""
    q_len: int          # real lengths
    k_len: int
    q_padded: int       # multiples of every query / key tile below
    k_padded: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    causal: bool
    interpret: bool
    num_warps: int
    num_stages: int

    @classmethod
    def build(cls, q_len, k_len, causal, sizes: BlockSizes, interpret):
        # short sequences take one tile (at least 16, Triton's smallest dot)
        cap_q, cap_k = max(16, _next_power_of_two(q_len)), max(16, _next_power_of_two(k_len))
        bq, bq_bwd = min(sizes.q, cap_q), min(sizes.q_bwd, cap_q)
        bk, bk_bwd = min(sizes.k, cap_k), min(sizes.k_bwd, cap_k)
        return cls(q_len, k_len, _round_up(q_len, max(bq, bq_bwd)), _round_up(k_len, max(bk, bk_bwd)),
                   bq, bk, bq_bwd, bk_bwd, causal, interpret, sizes.num_warps, sizes.num_stages)

    @property
    def bias_len(self) -> int:
        # offsets j - i of the padded tiles span -(q_padded - 1) .. k_padded - 1
        return self.q_padded + self.k_padded - 1

    def compiler_params(self):
        return None if self.interpret else plgpu.CompilerParams(num_warps=self.num_warps,
                                                                 num_stages=self.num_stages)


def _dot(a, b, *, trans_a=False, trans_b=False):
    # float32 inputs: full precision (Triton would otherwise use TF32); accumulation is float32
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _masked_scores(q, k, bias_ref, q_ids, k_ids, row0, col0, layout: _Layout):
    """Logits of one (rows, cols) tile with the in-kernel bias and mask, and the mask itself.

    row0/col0: the tile's first query / key position in the padded row.
    """
    rows = row0 + lax.broadcasted_iota(jnp.int32, (q.shape[0], k.shape[0]), 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (q.shape[0], k.shape[0]), 1)
    scores = _dot(q, k, trans_b=True)
    if bias_ref is not None:  # the bias tile is a Toeplitz slice of the per-offset vector: gathered, never stored
        scores = scores + bias_ref[cols - rows + (layout.q_padded - 1)].astype(jnp.float32)
    mask = (q_ids[:, None] == k_ids[None, :]) & (k_ids != 0)[None, :]
    if layout.causal:
        mask = mask & (cols <= rows)
    scores = jnp.where(mask, scores, MASKED_LOGIT)
    if layout.k_padded != layout.k_len:  # keys added to fill the last tile do not exist
        scores = jnp.where(cols < layout.k_len, scores, -jnp.inf)
    return scores, mask


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, q_ids_ref, k_ids_ref, o_ref, max_ref, log_sum_ref, *,
                    layout: _Layout):
    block_q, block_k = layout.block_q, layout.block_k
    row0 = pl.program_id(2) * block_q
    q, q_ids = q_ref[...], q_ids_ref[...]

    def body(step, carry):
        acc, row_max, row_sum = carry
        col0 = pl.multiple_of(step * block_k, block_k)
        keys = pl.ds(col0, block_k)
        scores, _ = _masked_scores(q, k_ref[keys, :], bias_ref, q_ids, k_ids_ref[keys], row0, col0, layout)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        correction = jnp.exp(row_max - new_max)
        probs = jnp.exp(scores - new_max[:, None])
        v = v_ref[keys, :]
        acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v)
        return acc, new_max, row_sum * correction + jnp.sum(probs, axis=1)

    init = (jnp.zeros((block_q, q.shape[1]), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, row_max, row_sum = lax.fori_loop(0, layout.k_padded // block_k, body, init)
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    # kept apart, not as one logsumexp: in a fully masked row row_max is MASKED_LOGIT and
    # MASKED_LOGIT + log(row_sum) rounds back to MASKED_LOGIT in float32
    max_ref[...] = row_max
    log_sum_ref[...] = jnp.log(row_sum)


def _dscores(q, k, v, do, stats, delta, bias_ref, q_ids, k_ids, row0, col0, layout):
    """Recomputed probabilities and dlogits of one tile (FlashAttention-2's backward).

    stats: the forward's (row_max, log_sum) of these rows."""
    scores, mask = _masked_scores(q, k, bias_ref, q_ids, k_ids, row0, col0, layout)
    row_max, log_sum = stats
    probs = jnp.exp((scores - row_max[:, None]) - log_sum[:, None])
    dprobs = _dot(do, v, trans_b=True)
    # masked logits are constants in the reference: no gradient reaches q, k or the bias there
    return probs, jnp.where(mask, probs * (dprobs - delta[:, None]), 0.0)


def _dkdv_kernel(q_ref, k_ref, v_ref, bias_ref, q_ids_ref, k_ids_ref, do_ref, max_ref, log_sum_ref, delta_ref,
                 dk_ref, dv_ref, *, layout: _Layout):
    block_q, block_k = layout.block_q_bwd, layout.block_k_bwd
    col0 = pl.program_id(2) * block_k
    k, v, k_ids = k_ref[...], v_ref[...], k_ids_ref[...]

    def body(step, carry):
        dk, dv = carry
        row0 = pl.multiple_of(step * block_q, block_q)
        rows = pl.ds(row0, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        probs, dscores = _dscores(q, k, v, do, (max_ref[rows], log_sum_ref[rows]), delta_ref[rows], bias_ref,
                                  q_ids_ref[rows], k_ids, row0, col0, layout)
        dv = dv + _dot(probs.astype(do.dtype), do, trans_a=True)
        dk = dk + _dot(dscores.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros((block_k, k.shape[1]), jnp.float32)
    dk, dv = lax.fori_loop(0, layout.q_padded // block_q, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, bias_ref, q_ids_ref, k_ids_ref, do_ref, max_ref, log_sum_ref, delta_ref,
               dq_ref, *, layout: _Layout):
    block_q, block_k = layout.block_q_bwd, layout.block_k_bwd
    row0 = pl.program_id(2) * block_q
    q, do, delta, q_ids = q_ref[...], do_ref[...], delta_ref[...], q_ids_ref[...]
    stats = (max_ref[...], log_sum_ref[...])

    def body(step, dq):
        col0 = pl.multiple_of(step * block_k, block_k)
        keys = pl.ds(col0, block_k)
        k = k_ref[keys, :]
        _, dscores = _dscores(q, k, v_ref[keys, :], do, stats, delta, bias_ref, q_ids, k_ids_ref[keys],
                              row0, col0, layout)
        return dq + _dot(dscores.astype(k.dtype), k)

    dq = lax.fori_loop(0, layout.k_padded // block_k, body, jnp.zeros((block_q, q.shape[1]), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dbias_kernel(q_ref, k_ref, v_ref, bias_ref, q_ids_ref, k_ids_ref, do_ref, max_ref, log_sum_ref, delta_ref,
                  dbias_ref, *, layout: _Layout):
    """dlogits of one (head, query tile, key tile), summed over the batch: the bias gradient.

    The bias is shared by the whole batch, so its gradient needs no per-row (batch, heads, q, k)
    array: each program walks the batch and keeps one tile.
    """
    row0, col0 = pl.program_id(1) * layout.block_q_bwd, pl.program_id(2) * layout.block_k_bwd

    def body(row, acc):
        _, dscores = _dscores(q_ref[row], k_ref[row], v_ref[row], do_ref[row], (max_ref[row], log_sum_ref[row]),
                              delta_ref[row], bias_ref, q_ids_ref[row], k_ids_ref[row], row0, col0, layout)
        return acc + dscores

    dbias_ref[...] = lax.fori_loop(0, q_ref.shape[0], body, jnp.zeros(dbias_ref.shape, jnp.float32))


def _pallas_call(kernel, layout: _Layout, grid, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(functools.partial(kernel, layout=layout), grid=grid, in_specs=in_specs,
                          out_specs=out_specs, out_shape=out_shape, interpret=layout.interpret,
                          compiler_params=layout.compiler_params(), name=name)


def _bias_spec(offset_bias, index_map):
    return None if offset_bias is None else pl.BlockSpec((None, offset_bias.shape[1]), index_map)


def _forward(q, k, v, offset_bias, q_ids, k_ids, layout: _Layout):
    batch, _, heads, head_dim = q.shape
    bq, lq, lk = layout.block_q, layout.q_padded, layout.k_padded
    row_block = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    key_rows = pl.BlockSpec((None, lk, None, head_dim), lambda b, h, i: (b, 0, h, 0))
    return _pallas_call(
        _forward_kernel, layout, grid=(batch, heads, lq // bq),
        in_specs=[row_block, key_rows, key_rows,
                  _bias_spec(offset_bias, lambda b, h, i: (h, 0)),
                  pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                  pl.BlockSpec((None, lk), lambda b, h, i: (b, 0))],
        out_specs=[row_block] + [pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))] * 2,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)]
        + [jax.ShapeDtypeStruct((batch, heads, lq), jnp.float32)] * 2,
        name="t5_packed_attention_fwd")(q, k, v, offset_bias, q_ids, k_ids)


def _backward(q, k, v, offset_bias, q_ids, k_ids, out, row_max, log_sum, do, layout: _Layout):
    batch, _, heads, head_dim = q.shape
    bq, bk, lq, lk = layout.block_q_bwd, layout.block_k_bwd, layout.q_padded, layout.k_padded
    # FlashAttention-2's D_i = rowsum(dO_i * O_i), [batch, heads, q]
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    operands = (q, k, v, offset_bias, q_ids, k_ids, do, row_max, log_sum, delta)

    def specs(q_rows, k_rows, query_tiled: bool):
        """BlockSpecs of `operands` for programs (batch row, head, tile) that take q_rows queries and
        k_rows keys: the tiled side is indexed by the program's tile, the other side is whole."""
        qi = (lambda b, h, i: i) if query_tiled else (lambda b, h, i: 0)
        ki = (lambda b, h, i: 0) if query_tiled else (lambda b, h, i: i)
        q_block = pl.BlockSpec((None, q_rows, None, head_dim), lambda b, h, i: (b, qi(b, h, i), h, 0))
        k_block = pl.BlockSpec((None, k_rows, None, head_dim), lambda b, h, i: (b, ki(b, h, i), h, 0))
        per_query = pl.BlockSpec((None, None, q_rows), lambda b, h, i: (b, h, qi(b, h, i)))
        return [q_block, k_block, k_block, _bias_spec(offset_bias, lambda b, h, i: (h, 0)),
                pl.BlockSpec((None, q_rows), lambda b, h, i: (b, qi(b, h, i))),
                pl.BlockSpec((None, k_rows), lambda b, h, i: (b, ki(b, h, i))),
                q_block, per_query, per_query, per_query]

    dkdv_specs = specs(lq, bk, query_tiled=False)
    dk, dv = _pallas_call(
        _dkdv_kernel, layout, grid=(batch, heads, lk // bk), in_specs=dkdv_specs,
        out_specs=[dkdv_specs[1], dkdv_specs[2]],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="t5_packed_attention_dkdv")(*operands)
    dq_specs = specs(bq, lk, query_tiled=True)
    dq = _pallas_call(
        _dq_kernel, layout, grid=(batch, heads, lq // bq), in_specs=dq_specs, out_specs=dq_specs[0],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="t5_packed_attention_dq")(*operands)
    if offset_bias is None:
        return dq, dk, dv, None
    # programs (head, query tile, key tile), each over the whole batch
    q_all = pl.BlockSpec((batch, bq, None, head_dim), lambda h, i, j: (0, i, h, 0))
    k_all = pl.BlockSpec((batch, bk, None, head_dim), lambda h, i, j: (0, j, h, 0))
    per_query_all = pl.BlockSpec((batch, None, bq), lambda h, i, j: (0, h, i))
    dbias = _pallas_call(
        _dbias_kernel, layout, grid=(heads, lq // bq, lk // bk),
        in_specs=[q_all, k_all, k_all, _bias_spec(offset_bias, lambda h, i, j: (h, 0)),
                  pl.BlockSpec((batch, bq), lambda h, i, j: (0, i)),
                  pl.BlockSpec((batch, bk), lambda h, i, j: (0, j)), q_all] + [per_query_all] * 3,
        out_specs=pl.BlockSpec((None, bq, bk), lambda h, i, j: (h, i, j)),
        out_shape=jax.ShapeDtypeStruct((heads, lq, lk), jnp.float32),
        name="t5_packed_attention_dbias")(*operands)
    # [heads, q, k] -> per offset j - i (the layout the bias came in)
    offsets = (np.arange(lk)[None, :] - np.arange(lq)[:, None] + (lq - 1)).ravel()
    doffset = jax.ops.segment_sum(dbias.reshape(heads, -1).T, offsets, num_segments=layout.bias_len).T
    return dq, dk, dv, doffset.astype(offset_bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, offset_bias, q_ids, k_ids, layout: _Layout):
    return _forward(q, k, v, offset_bias, q_ids, k_ids, layout)[0]


def _attention_fwd(q, k, v, offset_bias, q_ids, k_ids, layout):
    out, row_max, log_sum = _forward(q, k, v, offset_bias, q_ids, k_ids, layout)
    return out, (q, k, v, offset_bias, q_ids, k_ids, out, row_max, log_sum)


def _attention_bwd(layout, residuals, do):
    dq, dk, dv, doffset = _backward(*residuals, do, layout)
    return dq, dk, dv, doffset, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def packed_attention(query, key, value, offset_bias, query_segment_ids, key_segment_ids, *, causal: bool,
                     block_sizes: Optional[BlockSizes] = None, interpret: Optional[bool] = None):
    """softmax(q.k + bias, masked) v for packed T5 rows, with no (batch, heads, q, k) array.

    query [b, q, h, d], key/value [b, k, h, d] (one dtype; no 1/sqrt(d) scaling, as T5);
    offset_bias [h, q + k - 1] or None: the bias of key j for query i is offset_bias[:, j - i + q - 1];
    query_segment_ids [b, q], key_segment_ids [b, k]: int, equal ids attend, 0 = padding;
    causal: also require j <= i (decoder self-attention).
    interpret: run the kernels in Pallas' interpret mode (default: when the backend is the CPU).
    Differentiable in query, key, value and offset_bias.
    """
    batch, q_len, heads, head_dim = query.shape
    k_len = key.shape[1]
    if key.shape != (batch, k_len, heads, head_dim) or value.shape != key.shape:
        raise ValueError(f"packed_attention: query {query.shape}, key {key.shape} and value {value.shape} "
                         "must be [batch, length, heads, head_dim] with the same batch, heads and head_dim")
    if offset_bias is not None and offset_bias.shape != (heads, q_len + k_len - 1):
        raise ValueError(f"packed_attention: offset_bias {offset_bias.shape} must be (heads, q_len + k_len - 1)"
                         f" = {(heads, q_len + k_len - 1)}")
    if query_segment_ids.shape != (batch, q_len) or key_segment_ids.shape != (batch, k_len):
        raise ValueError(f"packed_attention: segment ids {query_segment_ids.shape} / {key_segment_ids.shape} "
                         f"must be {(batch, q_len)} / {(batch, k_len)}")
    if causal and q_len != k_len:
        raise ValueError(f"packed_attention: causal attention needs q_len == k_len, got {q_len} and {k_len}")
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if not interpret and backend == "tpu":  # (interpret=False on a CPU: lowering for CUDA, as the tests do)
        raise ValueError(f"attention_impl='pallas' runs on NVIDIA GPUs (Triton) and, interpreted, on CPUs; this "
                         f"backend is {backend!r}: use attention_impl='xla'")
    layout = _Layout.build(q_len, k_len, causal, block_sizes or DEFAULT_BLOCK_SIZES, interpret)
    padded_dim = max(16, _next_power_of_two(head_dim))

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, padded_dim - head_dim)))

    def pad_ids(ids, length):
        return jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, length - ids.shape[1])))

    # offset o sits at o + q_padded - 1; the padded tiles reach offsets outside the real range
    bias = None if offset_bias is None else jnp.pad(
        offset_bias, ((0, 0), (layout.q_padded - q_len, layout.k_padded - k_len)))
    out = _attention(pad(query, layout.q_padded), pad(key, layout.k_padded), pad(value, layout.k_padded), bias,
                     pad_ids(query_segment_ids, layout.q_padded), pad_ids(key_segment_ids, layout.k_padded),
                     layout)
    return out[:, :q_len, :, :head_dim]

