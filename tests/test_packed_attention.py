"""The fused packed-T5 attention (attention_impl="pallas") against the XLA reference, on CPU.

The Pallas kernels run in interpret mode here, so these tests check the kernels' arithmetic
(forward and all gradients: q, k, v and the relative-position bias), the model wiring, the
sharding wrapper and the memory claim; that the same kernels lower to Triton is checked by
lowering them for CUDA. Whether Triton compiles them well, and how fast they run, only a GPU can
say (bench/gpu_check.sh).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ul2lab.models import layers, packed_attention
from ul2lab.models.config import T5Config, preset
from ul2lab.models.network import Transformer, abstract_params, init_params
from ul2lab.train import memory, partitioning

BATCH, HEADS, HEAD_DIM = 5, 2, 12  # head_dim 12: the kernel pads it to 16 and back


def packed_ids(lengths_and_segments, rng):
    """[len(rows), length] ids: row r holds `segments` contiguous segments (ids 1..n) of random
    lengths, then `padding` zeros. lengths_and_segments: (length, [(segments, padding), ...])."""
    length, rows = lengths_and_segments
    out = np.zeros((len(rows), length), np.int32)
    for r, (segments, padding) in enumerate(rows):
        used = length - padding
        cuts = np.sort(rng.choice(np.arange(1, used), segments - 1, replace=False))
        out[r, :used] = 1 + np.searchsorted(cuts, np.arange(used), side="right")
    return out


# rows with 1 to 5 segments, some padded (a padding query attends nothing: the reference's
# uniform row); odd lengths that fill no tile
ROWS = [(1, 0), (2, 3), (3, 0), (4, 5), (5, 1)]
CASES = {
    # name: (q_len, k_len, causal, with_bias)
    "encoder": (37, 37, False, True),
    "decoder": (23, 23, True, True),
    "cross": (23, 37, False, False),  # T5's cross attention has no relative bias
}


def case_inputs(name, dtype=jnp.float32, seed=0):
    q_len, k_len, causal, with_bias = CASES[name]
    rng = np.random.RandomState(seed)
    q_ids = packed_ids((q_len, ROWS), rng)
    # cross attention: the encoder row has its own segment lengths; in rows 1 and 3 the decoder's
    # last segment has no encoder counterpart, so those valid queries see no key at all
    k_ids = q_ids if q_len == k_len else packed_ids((k_len, [(max(s - r % 2, 1), p) for r, (s, p)
                                                             in enumerate(ROWS)]), rng)
    normal = lambda *shape: jnp.asarray(rng.randn(*shape), jnp.float32)  # noqa: E731
    # query scaled as T5's init does (1/sqrt(head_dim) folded in), so softmaxes are not one-hot
    arrays = [normal(BATCH, q_len, HEADS, HEAD_DIM) / np.sqrt(HEAD_DIM), normal(BATCH, k_len, HEADS, HEAD_DIM),
              normal(BATCH, k_len, HEADS, HEAD_DIM), normal(HEADS, q_len + k_len - 1) if with_bias else None]
    cotangent = normal(BATCH, q_len, HEADS, HEAD_DIM)
    arrays = [None if x is None else x.astype(dtype) for x in arrays]
    mask = layers.SegmentMask(jnp.asarray(q_ids), jnp.asarray(k_ids), causal=causal)
    return arrays, mask, cotangent


def fused(q, k, v, bias, mask):
    return packed_attention.packed_attention(q, k, v, bias, mask.query_ids, mask.key_ids, causal=mask.causal)


def reference(q, k, v, bias, mask):
    dense_bias = None if bias is None else layers.offset_bias_to_dense(bias, q.shape[1], k.shape[1])
    return layers.dot_product_attention(q, k, v, mask.dense(), dense_bias, dtype=q.dtype, float32_logits=False)


def output_and_grads(attention, arrays, mask, cotangent):
    """[output, dq, dk, dv(, dbias)] of sum(attention(...) * cotangent), all float32."""
    differentiable = [x for x in arrays if x is not None]

    def loss(*xs):
        xs = list(xs) + [None] * (4 - len(xs))
        return jnp.sum(attention(*xs, mask).astype(jnp.float32) * cotangent)

    out = attention(*arrays, mask)
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(differentiable)))))(*differentiable)
    return [np.asarray(x, np.float32) for x in (out,) + tuple(grads)]


def max_rel_err(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


NAMES = ["output", "dquery", "dkey", "dvalue", "doffset_bias"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_reference_float32(case):
    arrays, mask, cotangent = case_inputs(case)
    got = output_and_grads(fused, arrays, mask, cotangent)
    want = output_and_grads(reference, arrays, mask, cotangent)
    assert len(got) == (5 if CASES[case][3] else 4)
    errors = {name: max_rel_err(g, w) for name, g, w in zip(NAMES, got, want)}
    assert max(errors.values()) <= 1e-5, errors
    # the cases really contain what they claim: fully masked (uniform) query rows, several segments
    dense = np.asarray(mask.dense())[:, 0]
    assert (~dense.any(-1)).any() and len(np.unique(np.asarray(mask.query_ids))) == 6


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_bfloat16_is_as_accurate_as_reference_bfloat16(case):
    """bf16 inputs: each path's error against float32 math on the same (bf16-rounded) inputs.

    bf16 attention differs from float32 by its own rounding (about 2^-9 per stored value, more
    where gradients sum bf16 products): XLA's bf16 path is itself 3e-3 to 1e-2 off here, so the
    two bf16 paths also differ from each other by about that much, and the kernel is held to
    adding at most 2e-3 to XLA's own error, output and every gradient."""
    arrays, mask, cotangent = case_inputs(case, seed=1)
    rounded = [None if x is None else x.astype(jnp.bfloat16) for x in arrays]
    truth = output_and_grads(reference, [None if x is None else x.astype(jnp.float32) for x in rounded],
                             mask, cotangent)
    fused_err = [max_rel_err(g, w) for g, w in zip(output_and_grads(fused, rounded, mask, cotangent), truth)]
    xla_err = [max_rel_err(g, w) for g, w in zip(output_and_grads(reference, rounded, mask, cotangent), truth)]
    assert len(fused_err) == (5 if CASES[case][3] else 4)
    for name, f, x in zip(NAMES, fused_err, xla_err):
        assert f <= x + 2e-3, (case, name, f, x)
    assert 0 < min(fused_err)  # really computed in bf16


@pytest.mark.parametrize("q_len, k_len, causal, with_bias, kernels", [
    (512, 512, False, True, 4),   # encoder: forward, dk/dv, dq, bias gradient
    (114, 114, True, True, 4),    # decoder self-attention (114 pads to 128)
    (114, 512, False, False, 3),  # cross attention: no bias, no bias-gradient kernel
])
def test_kernels_lower_to_triton(q_len, k_len, causal, with_bias, kernels):
    """Forward and backward lower through Pallas' Triton backend at T5-base's lengths and head_dim
    (lowering only: the CPU has no GPU to compile or run them)."""
    q = jax.ShapeDtypeStruct((2, q_len, 2, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, k_len, 2, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((2, q_len + k_len - 1), jnp.bfloat16) if with_bias else None
    ids = (jax.ShapeDtypeStruct((2, q_len), jnp.int32), jax.ShapeDtypeStruct((2, k_len), jnp.int32))

    def loss(q, k, v, bias, q_ids, k_ids):
        out = packed_attention.packed_attention(q, k, v, bias, q_ids, k_ids, causal=causal, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
    lowered = jax.jit(jax.grad(loss, argnums=argnums)).trace(q, kv, kv, bias, *ids).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == kernels


def tiny(**overrides) -> T5Config:
    fields = dict(vocab_size=64, emb_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1, head_dim=8,
                  mlp_dim=48, relative_attention_num_buckets=8, relative_attention_max_distance=16, dtype="float32")
    return T5Config(**{**fields, **overrides})


def packed_batch(batch_size=2):
    """Packed rows with padding; from batch_size 4 on, row 3 also has real tokens in segment 0 (not
    seqio's layout, but both paths must still agree on it)."""
    rng = np.random.RandomState(4)
    enc, tgt = rng.randint(2, 64, (batch_size, 19)), rng.randint(2, 64, (batch_size, 11))
    enc[1, 15:], tgt[1, 8:] = 0, 0
    enc_segments = np.array([[1] * 4 + [2] * 8 + [3] * 7, [1] * 6 + [2] * 9 + [0] * 4] * (batch_size // 2))
    dec_segments = np.array([[1] * 3 + [2] * 5 + [3] * 3, [1] * 4 + [2] * 4 + [0] * 3] * (batch_size // 2))
    return {"encoder_input_tokens": enc, "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
            "decoder_target_tokens": tgt, "encoder_segment_ids": enc_segments, "decoder_segment_ids": dec_segments}


def model_loss(config, batch, **kwargs):
    def loss(params):
        logits = Transformer(config).apply(
            {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch["decoder_target_tokens"], encoder_segment_ids=batch["encoder_segment_ids"],
            decoder_segment_ids=batch["decoder_segment_ids"], **kwargs)
        return jnp.sum(jnp.where(batch["decoder_target_tokens"][..., None] > 0, logits, 0.0) ** 2) * 1e-3
    return loss


def max_rel_err_tree(got, want):
    return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(max_rel_err, got, want)))


@pytest.fixture(scope="module")
def model_reference():
    """(config, batch, params, loss, gradients) of the XLA path, computed once for the model tests."""
    config, batch = tiny(), packed_batch(batch_size=4)
    params = init_params(config, jax.random.PRNGKey(0))
    loss, grads = jax.jit(jax.value_and_grad(model_loss(config, batch)))(params)
    return config, batch, params, float(loss), grads


def test_model_pallas_path_equals_xla_path(model_reference):
    """Loss and every parameter's gradient (both stacks' relative-position tables included),
    packed rows with padding; with dropout the pallas config falls back to the reference path
    (the kernel has no attention dropout) and gives the same numbers."""
    config, batch, params, want_loss, want = model_reference
    got_loss, got = jax.jit(jax.value_and_grad(model_loss(config.replace(attention_impl="pallas"), batch)))(params)
    assert abs(float(got_loss) - want_loss) <= 1e-5 * abs(want_loss)
    assert max_rel_err_tree(got, want) <= 1e-5
    assert float(jnp.abs(got["encoder"]["relpos_bias"]["rel_embedding"]).max()) > 0  # the bias is learned

    def with_dropout(c):
        loss = model_loss(c.replace(dropout_rate=0.3), batch, enable_dropout=True,
                          rngs={"dropout": jax.random.PRNGKey(1)})
        return float(jax.jit(loss)(params))
    assert with_dropout(config.replace(attention_impl="pallas")) == with_dropout(config)


def test_sharded_pallas_path_runs_per_device(model_reference):
    """On a data=2 x model=4 mesh the kernel runs per device (shard_map over batch and heads): same
    loss and gradients as one device, and no operand gathered (XLA's partitioner cannot split a
    kernel, and would all-gather its operands onto every device)."""
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    config, batch, params, want_loss, want = model_reference
    rules = partitioning.standard_logical_axis_rules()
    mesh = partitioning.create_mesh(data=2, model=4)
    sharded_params = jax.device_put(params, partitioning.params_shardings(abstract_params(config), mesh, rules))
    sharded_batch = partitioning.host_batch_to_global(batch, mesh, rules)
    step = jax.jit(jax.value_and_grad(lambda p, b: model_loss(config.replace(attention_impl="pallas"), b)(p)))
    with partitioning.axis_rules(mesh, rules):
        compiled = step.lower(sharded_params, sharded_batch).compile()
        got_loss, got = compiled(sharded_params, sharded_batch)
    assert abs(float(got_loss) - want_loss) <= 1e-5 * abs(want_loss)
    assert max_rel_err_tree(got, want) <= 1e-5
    assert "all-gather" not in compiled.as_text()


@pytest.mark.slow  # two full-size compiles: tens of seconds of CPU
def test_t5_base_train_step_has_no_batch_heads_q_k_array():
    """The trainer's T5-base step at batch 128, inputs 512 / targets 114 (bf16), compiled from shapes
    on one CPU device: the XLA path holds (batch, heads, q, k) arrays (logits, probabilities and
    the bias plus mask), the pallas path none, for any of the three attentions, in any dimension
    order, batch and heads merged or not.

    CPU caveat: here the kernels are interpreted (lowered to XLA loops over tiles), so this proves
    the program never forms such an array; on a GPU the kernels are Triton calls whose tiles live
    on chip, and bench/train_throughput.py reports the same check with XLA's memory figures for
    the GPU compile. scan_layers keeps the compile short; no array's per-layer shape changes."""
    batch, heads, inputs, targets = 128, 12, 512, 114

    def shapes(attention_impl):
        model = preset("t5_1_1_base", attention_impl=attention_impl, scan_layers=True)
        assert model.num_heads == heads and model.dtype == "bfloat16"
        setup, abstract_batch = memory.abstract_train_step(model, "adafactor", batch, inputs, targets,
                                                           {"data": 1, "fsdp": 1, "model": 1}, "standard",
                                                           num_devices=1)
        return memory.array_shapes(memory.compile_step(setup, abstract_batch))

    assert memory.attention_sized_arrays(shapes("xla"), batch, heads, inputs, targets)  # found where they are
    fused_shapes = shapes("pallas")
    # the kernel pads 114 up to whole tiles (128): no array of the padded lengths either
    padded_targets = packed_attention._Layout.build(targets, targets, True, packed_attention.DEFAULT_BLOCK_SIZES,
                                                    True).q_padded
    assert padded_targets == 128
    for length in (targets, padded_targets):
        assert memory.attention_sized_arrays(fused_shapes, batch, heads, inputs, length) == []
