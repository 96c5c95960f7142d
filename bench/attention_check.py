"""The fused packed-T5 attention (attention_impl="pallas") against the XLA reference, on this machine's
backend: errors of the output and of every gradient, and the time of one forward + backward of each.

    python bench/attention_check.py                     # T5-base shapes: batch 32, 12 heads x 64, 512 / 114
    python bench/attention_check.py --batch 2 --inputs_length 40 --targets_length 12   # a CPU dry run

On a GPU the kernels are compiled by Triton, so this is the check that the compiled kernels compute
what the interpreted ones do in tests/test_packed_attention.py. Prints one JSON object per
(attention, dtype): encoder (bidirectional, relative bias), decoder (causal, relative bias), cross
(no bias). Rows are packed with 1 to 5 segments and some padding, as the tests'.

Errors are max|got - want| / max|want| against float32 XLA math on the same (rounded) inputs, for
the fused path and for XLA in the same dtype (in bfloat16 that second figure is the noise floor
the fused path is held to: at most 2e-3 above it; in float32 both should be <= 1e-5).
Times are medians over --steps calls, after one warm-up call (compile excluded).
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ul2lab.models import layers, packed_attention


def packed_segment_ids(rng, batch: int, length: int) -> np.ndarray:
    """[batch, length]: row r holds 1 + r % 5 contiguous segments (ids from 1), odd rows end in padding."""
    ids = np.zeros((batch, length), np.int32)
    for r in range(batch):
        used = length - (length // 8 if r % 2 else 0)
        segments = min(1 + r % 5, used)
        cuts = np.sort(rng.choice(np.arange(1, used), segments - 1, replace=False))
        ids[r, :used] = 1 + np.searchsorted(cuts, np.arange(used), side="right")
    return ids


def case_arrays(args, case: str, seed: int = 0):
    q_len = args.inputs_length if case == "encoder" else args.targets_length
    k_len = args.targets_length if case == "decoder" else args.inputs_length
    rng = np.random.RandomState(seed)
    q_ids = packed_segment_ids(rng, args.batch, q_len)
    k_ids = q_ids if case != "cross" else packed_segment_ids(rng, args.batch, k_len)
    normal = lambda *shape: jnp.asarray(rng.randn(*shape), jnp.float32)  # noqa: E731
    arrays = [normal(args.batch, q_len, args.heads, args.head_dim) / np.sqrt(args.head_dim),
              normal(args.batch, k_len, args.heads, args.head_dim), normal(args.batch, k_len, args.heads, args.head_dim),
              normal(args.heads, q_len + k_len - 1) if case != "cross" else None]
    mask = layers.SegmentMask(jnp.asarray(q_ids), jnp.asarray(k_ids), causal=case == "decoder")
    return arrays, mask, normal(args.batch, q_len, args.heads, args.head_dim)


def fused(q, k, v, bias, mask):
    return packed_attention.packed_attention(q, k, v, bias, mask.query_ids, mask.key_ids, causal=mask.causal)


def reference(q, k, v, bias, mask):
    dense_bias = None if bias is None else layers.offset_bias_to_dense(bias, q.shape[1], k.shape[1])
    return layers.dot_product_attention(q, k, v, mask.dense(), dense_bias, dtype=q.dtype, float32_logits=False)


def forward_backward(attention, mask, cotangent):
    """jitted (arrays) -> (output, gradients of sum(output * cotangent) in every array)."""
    def loss(*arrays):  # q, k, v and the offset bias where there is one
        out = attention(*(list(arrays) + [None] * (4 - len(arrays))), mask)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    def run(*arrays):
        (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(arrays))), has_aux=True)(*arrays)
        return (out,) + grads
    return jax.jit(run)


def differentiable(arrays, dtype):
    return [x.astype(dtype) for x in arrays if x is not None]


def rel_errors(got, want) -> dict:
    names = ("output", "dquery", "dkey", "dvalue", "doffset_bias")
    return {name: float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32)))
                        / np.max(np.abs(np.asarray(w, np.float32))))
            for name, g, w in zip(names, got, want)}


def median_seconds(run, arrays, steps: int) -> float:
    jax.block_until_ready(run(*arrays))  # compile + warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run(*arrays))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(args, case: str, dtype_name: str) -> dict:
    dtype = jnp.dtype(dtype_name)
    arrays, mask, cotangent = case_arrays(args, case)
    inputs = differentiable(arrays, dtype)
    truth_run = forward_backward(reference, mask, cotangent)
    truth = truth_run(*[x.astype(jnp.float32) for x in inputs])  # float32 math on the rounded inputs
    runs = {"pallas": forward_backward(fused, mask, cotangent),
            "xla": forward_backward(reference, mask, cotangent)}
    result = {"attention": case, "dtype": dtype_name, "platform": jax.devices()[0].platform,
              "device_kind": jax.devices()[0].device_kind, "batch": args.batch, "heads": args.heads,
              "head_dim": args.head_dim, "q_len": cotangent.shape[1], "k_len": arrays[1].shape[1],
              "segments_per_row": sorted({int(ids.max()) for ids in np.asarray(mask.query_ids)})}
    for name, run in runs.items():
        result[f"{name}_rel_err_vs_f32"] = rel_errors(run(*inputs), truth)
        if args.steps:
            result[f"{name}_fwd_bwd_ms"] = round(1e3 * median_seconds(run, inputs, args.steps), 3)
    worst = {name: result["pallas_rel_err_vs_f32"][name] - (result["xla_rel_err_vs_f32"][name]
                                                            if dtype_name == "bfloat16" else 0.0)
             for name in result["pallas_rel_err_vs_f32"]}
    bound = 2e-3 if dtype_name == "bfloat16" else 1e-5
    result["within_bound"] = bool(max(worst.values()) <= bound)
    result["bound"] = f"pallas error <= {'xla bf16 error + ' if dtype_name == 'bfloat16' else ''}{bound:g}"
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=("bfloat16", "float32"))
    parser.add_argument("--cases", nargs="+", default=["encoder", "decoder", "cross"],
                        choices=("encoder", "decoder", "cross"))
    parser.add_argument("--steps", type=int, default=10, help="timed calls per path (0: no timing)")
    args = parser.parse_args(argv)
    if args.batch < 1 or min(args.inputs_length, args.targets_length) < 6:
        parser.error("--batch must be >= 1 and the lengths >= 6 (room for 5 segments)")
    failed = False
    for dtype_name in args.dtypes:
        for case in args.cases:
            result = check(args, case, dtype_name)
            failed |= not result["within_bound"]
            print(json.dumps(result), flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
