"""Training throughput of the trainer's jitted step on synthetic packed batches; prints one JSON object.

    python bench/train_throughput.py --model t5_1_1_base --batch_size 128 --attention_impl pallas \
        --remat_policy dots_with_no_batch_dims_saveable --steps 20 --peer hf --peer_compile

The knobs to measure on a GPU, each a flag: --attention_impl (xla | pallas: the packed-T5 fused
kernel | cudnn), --remat_policy, --scan_layers, --batch_size, --xla_flags (the trainer's recommended
flags from ul2lab.train.xla_flags, or none) and --pallas_block_sizes (the fused kernel's tiles).
The JSON also says how many (batch, heads, q, k)-shaped arrays the compiled step holds
("attention_sized_arrays"): 0 on the pallas path. --compile_only stops after compiling (no device
memory is allocated, so it runs at full size on a CPU too) and reports that count and XLA's memory
analysis of the step:

    python bench/train_throughput.py --model t5_1_1_base --batch_size 128 --attention_impl pallas \
        --scan_layers --compile_only

What is timed is exactly what `ul2lab.train.loop.train` runs: the TrainState laid out by
`trainer.state_layout`, the step from `train_step.build_train_step` with the trainer's shardings
(`memory.abstract_train_step`), traced under the same logical axis rules. Only the data differs: full-length random tokens, two packed examples per row (segment
ids 1 and 2), generated on the devices with the batch sharding before the timed loop, so no
host->device copy or host round trip sits inside it. Each timed step is waited for (the median
step time is over single steps); seq/s and tokens/s come from the median.

--peer hf runs Hugging Face T5ForConditionalGeneration of the same shape (same batch, lengths,
vocabulary; unpacked rows: HF has no segment ids) on the same device kind in this process, with
torch bf16 autocast (when --dtype is bfloat16), fused AdamW on CUDA, and torch.compile with
--peer_compile. It runs first and frees its memory, because JAX's allocator keeps what it takes.

Imports only jax/flax/optax/orbax/numpy (torch and transformers only for --peer hf).
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

# With a peer in the same process JAX must not grab 75% of the GPU up front.
if any(a == "--peer" or a.startswith("--peer=") for a in sys.argv):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ul2lab.train import flops, memory, optimizers, partitioning, xla_flags  # noqa: E402
from ul2lab.train import state as state_lib  # noqa: E402
from ul2lab.models import packed_attention  # noqa: E402
from ul2lab.models.config import ATTENTION_IMPLS, PRESETS, preset  # noqa: E402


def parse_mesh(text: str) -> dict:
    """'data=1,fsdp=-1,model=1' -> {'data': 1, 'fsdp': -1, 'model': 1}."""
    sizes = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in partitioning.MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise SystemExit(f"--mesh {text!r}: write sizes as data=N,fsdp=N,model=N (one may be -1)")
        sizes[name.strip()] = int(value)
    return sizes


def model_config(args):
    overrides = {k: v for k, v in (("dtype", args.dtype), ("attention_impl", args.attention_impl),
                                   ("remat_policy", args.remat_policy), ("scan_layers", args.scan_layers))
                 if v is not None}
    return preset(args.model, **overrides)


def parse_block_sizes(text: str) -> packed_attention.BlockSizes:
    """'q,k,q_bwd,k_bwd[,num_warps[,num_stages]]' -> BlockSizes, e.g. '128,64,64,64'."""
    fields = [f.name for f in dataclasses.fields(packed_attention.BlockSizes)]
    try:
        values = [int(v) for v in text.split(",")]
        if not 4 <= len(values) <= len(fields):
            raise ValueError(f"{len(values)} numbers")
        return packed_attention.BlockSizes(**dict(zip(fields, values)))
    except ValueError as error:
        raise SystemExit(f"--pallas_block_sizes {text!r}: {error}; write q,k,q_bwd,k_bwd[,num_warps[,num_stages]]"
                         " as powers of two, e.g. 128,64,64,64")


def rules_for(mesh_shape: dict, rules_name) -> str:
    if rules_name:
        return rules_name
    return "fsdp" if mesh_shape.get("fsdp", 1) != 1 else "standard"


def synthetic_batch(key, batch_size: int, inputs_length: int, targets_length: int, vocab_size: int):
    """Full-length rows packed with two examples each, laid out as seqio's EncDecFeatureConverter."""
    enc_key, dec_key = jax.random.split(key)

    def packed(length):
        first = length // 2
        segment = jnp.where(jnp.arange(length) < first, 1, 2).astype(jnp.int32)
        position = jnp.where(segment == 1, jnp.arange(length), jnp.arange(length) - first)
        return (jnp.broadcast_to(segment, (batch_size, length)),
                jnp.broadcast_to(position.astype(jnp.int32), (batch_size, length)))

    enc_segments, enc_positions = packed(inputs_length)
    dec_segments, dec_positions = packed(targets_length)
    targets = jax.random.randint(dec_key, (batch_size, targets_length), 2, vocab_size, jnp.int32)
    shifted = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
    return {
        "encoder_input_tokens": jax.random.randint(enc_key, (batch_size, inputs_length), 2, vocab_size,
                                                   jnp.int32),
        "encoder_segment_ids": enc_segments, "encoder_positions": enc_positions,
        "decoder_target_tokens": targets,
        "decoder_input_tokens": jnp.where(dec_positions == 0, 0, shifted),  # BOS = 0 per example
        "decoder_segment_ids": dec_segments, "decoder_positions": dec_positions,
        "decoder_loss_weights": jnp.ones_like(targets),
    }


def run_ours(args, model) -> dict:
    mesh_shape = parse_mesh(args.mesh)
    rules_name = rules_for(mesh_shape, args.rules)
    try:
        setup, abstract_batch = memory.abstract_train_step(model, args.optimizer, args.batch_size,
                                                           args.inputs_length, args.targets_length, mesh_shape,
                                                           rules_name)
    except ValueError as error:  # mesh sizes vs devices, batch vs data-parallel size
        raise SystemExit(f"train_throughput.py: {error}")
    mesh, batch_sharding = setup.mesh, setup.batch_sharding
    init = state_lib.new_state_fn(model, 0, setup.optimizer, setup.state_shardings)
    start = time.perf_counter()
    compiled = memory.compile_step(setup, abstract_batch)
    compile_s = time.perf_counter() - start
    # per device: the batch splits over the data axes, heads over 'model'
    local_batch = setup.batch_sharding.shard_shape((args.batch_size, args.inputs_length))[0]
    attention_sized = memory.attention_sized_arrays(
        memory.array_shapes(compiled), local_batch, model.num_heads // mesh.shape["model"], args.inputs_length,
        args.targets_length)
    compiled_facts = {
        "mesh": dict(mesh.shape), "logical_axis_rules": rules_name, "optimizer": args.optimizer,
        "dtype": model.dtype, "attention_impl": model.attention_impl, "remat_policy": model.remat_policy,
        "scan_layers": model.scan_layers, "compile_s": round(compile_s, 3),
        "attention_sized_arrays": len(attention_sized), "attention_sized_shapes": [list(s) for s in attention_sized[:4]],
    }
    analysis = memory.memory_analysis_dict(compiled)
    compiled_peak = (analysis.get("argument_size_in_bytes", 0) + analysis.get("output_size_in_bytes", 0)
                     - analysis.get("alias_size_in_bytes", 0) + analysis.get("temp_size_in_bytes", 0))
    compiled_peak_source = "compiled.memory_analysis (per device: arguments + outputs - aliased + temp)"
    if args.compile_only:
        return {**compiled_facts, "peak_memory_bytes": compiled_peak, "memory_source": compiled_peak_source,
                "memory_analysis": analysis}
    make_batch = jax.jit(synthetic_batch, static_argnums=(1, 2, 3, 4), out_shardings=batch_sharding)
    # a few distinct batches, already on the devices: the timed loop only launches steps
    batches = [make_batch(jax.random.PRNGKey(i), args.batch_size, args.inputs_length,
                          args.targets_length, model.vocab_size) for i in range(args.num_batches)]
    state = init()
    jax.block_until_ready((state, batches))

    losses, times = [], []
    for i in range(args.warmup_steps + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(state)
        if i >= args.warmup_steps:
            times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    losses = [float(x) for x in jax.device_get(losses)]

    step_time = statistics.median(times)
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        peak_memory, memory_source = int(stats["peak_bytes_in_use"]), "device.memory_stats"
    else:
        peak_memory, memory_source = compiled_peak, compiled_peak_source
    step_flops = flops.train_flops_per_step(model, args.batch_size, args.inputs_length, args.targets_length)
    peak = flops.peak_flops_per_device(device.device_kind, override=args.peak_flops)
    return {
        **compiled_facts,
        "step_time_median_s": step_time, "step_time_mean_s": statistics.mean(times),
        "seq_per_s": args.batch_size / step_time,
        "tokens_per_s": args.batch_size * (args.inputs_length + args.targets_length) / step_time,
        "tflops_per_s_per_device": step_flops / step_time / mesh.size / 1e12,
        "mfu": flops.mfu(step_flops, step_time, mesh.size, peak),
        "peak_memory_bytes": peak_memory, "memory_source": memory_source,
        "memory_analysis": analysis,
        "loss_first": losses[0], "loss_last": losses[-1],
    }


def run_hf_peer(args, model) -> dict:
    """HF T5ForConditionalGeneration of the same shape, trained on random tokens of the same shape."""
    import torch
    import transformers

    from ul2lab.interop import hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {k: v for k, v in hf._config_to_hf(model).items() if k not in ("architectures", "dtype")}
    settings.update(use_cache=False, dropout_rate=0.0)
    torch.manual_seed(0)
    net = transformers.T5ForConditionalGeneration(transformers.T5Config(**settings)).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device == "cuda")
    forward = torch.compile(net) if args.peer_compile else net
    bf16 = model.dtype == "bfloat16"
    generator = torch.Generator(device=device).manual_seed(0)

    def tokens(length):
        return torch.randint(2, model.vocab_size, (args.batch_size, length), device=device,
                             generator=generator)

    batches = [(tokens(args.inputs_length), tokens(args.targets_length)) for _ in range(args.num_batches)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times, first_step_s = [], [], None
    for i in range(args.warmup_steps + args.steps):
        input_ids, labels = batches[i % len(batches)]
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        first_step_s = elapsed if first_step_s is None else first_step_s
        if i >= args.warmup_steps:
            times.append(elapsed)
        losses.append(loss.detach())
    losses = [float(x) for x in losses]
    step_time = statistics.median(times)
    step_flops = flops.train_flops_per_step(model, args.batch_size, args.inputs_length, args.targets_length)
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result = {
        "device": kind, "torch": torch.__version__, "transformers": transformers.__version__,
        "attn_implementation": net.config._attn_implementation, "compiled": bool(args.peer_compile),
        "autocast_bf16": bf16, "optimizer": "AdamW" + (" (fused)" if device == "cuda" else ""),
        "first_step_s": round(first_step_s, 3),
        "step_time_median_s": step_time, "seq_per_s": args.batch_size / step_time,
        "tokens_per_s": args.batch_size * (args.inputs_length + args.targets_length) / step_time,
        "mfu": flops.mfu(step_flops, step_time, 1,
                         flops.peak_flops_per_device(kind, override=args.peak_flops)),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    del net, forward, optimizer, batches, loss
    _free_torch_memory()
    return result


def _free_torch_memory():
    """Hand the peer's cached GPU memory back before JAX allocates (JAX keeps what it takes)."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="ul2lab.models preset")
    parser.add_argument("--batch_size", type=int, default=8, help="global batch (packed rows) per step")
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--mesh", default="data=-1,fsdp=1,model=1", help="e.g. data=1,fsdp=-1,model=1")
    parser.add_argument("--rules", choices=("standard", "fsdp"), default=None,
                        help="logical axis rules (default: fsdp when the fsdp mesh axis is > 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup_steps", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--num_batches", type=int, default=2, help="distinct synthetic batches cycled")
    parser.add_argument("--optimizer", default="adafactor", choices=sorted(optimizers.OPTIMIZERS))
    parser.add_argument("--attention_impl", choices=ATTENTION_IMPLS, default=None,
                        help="xla (reference) | pallas (packed-T5 fused kernel) | cudnn (default: the preset's)")
    parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=None,
                        help="scan over layers (default: the preset's)")
    parser.add_argument("--pallas_block_sizes", default=None,
                        help="tiles of the pallas kernel: q,k,q_bwd,k_bwd[,num_warps[,num_stages]]")
    parser.add_argument("--xla_flags", choices=("recommended", "none"), default="recommended",
                        help="the trainer's recommended XLA flags for this platform (ul2lab.train.xla_flags; "
                             "flags already in the environment win), or none")
    parser.add_argument("--remat_policy", default=None,
                        help="none | full | a jax.checkpoint_policies name (default: the preset's)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="compute dtype (default: the preset's; params stay float32)")
    parser.add_argument("--peak_flops", type=float, default=None,
                        help="peak FLOP/s per device for MFU (default: ul2lab.train.flops table)")
    parser.add_argument("--peer", choices=("hf",), default=None, help="also run HF transformers T5")
    parser.add_argument("--peer_compile", action="store_true", help="torch.compile the HF model")
    parser.add_argument("--skip_ours", action="store_true", help="run only the peer")
    parser.add_argument("--compile_only", action="store_true",
                        help="compile our step from shapes and report its memory analysis and attention-sized "
                             "arrays; run nothing (works on CPU at full size)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.num_batches < 1:
        parser.error("--steps and --num_batches must be >= 1 and --warmup_steps >= 0")
    try:
        model = model_config(args)
    except ValueError as error:
        parser.error(str(error))
    applied_flags = xla_flags.apply() if args.xla_flags == "recommended" else {}  # before JAX starts its backend
    if args.pallas_block_sizes:
        packed_attention.DEFAULT_BLOCK_SIZES = parse_block_sizes(args.pallas_block_sizes)

    device = jax.devices()[0]
    if model.attention_impl == "cudnn" and device.platform != "gpu":
        parser.error(f"--attention_impl cudnn needs an NVIDIA GPU, but this run's devices are "
                     f"{device.platform}; use --attention_impl xla")
    result = {"device_kind": device.device_kind, "platform": device.platform,
              "num_devices": jax.device_count(), "jax": jax.__version__, "preset": args.model,
              "xla_flags": args.xla_flags, "xla_flags_applied": applied_flags,
              "pallas_block_sizes": dataclasses.asdict(packed_attention.DEFAULT_BLOCK_SIZES),
              "batch_size": args.batch_size, "inputs_length": args.inputs_length,
              "targets_length": args.targets_length, "steps": args.steps,
              "train_flops_per_step": flops.train_flops_per_step(model, args.batch_size, args.inputs_length,
                                                                 args.targets_length)}
    if args.peer == "hf":
        try:
            result["hf"] = run_hf_peer(args, model)
        except Exception as error:  # e.g. out of memory at this batch: still measure ours
            result["hf"] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        _free_torch_memory()  # outside `except`: the traceback no longer pins the peer's tensors
    if not args.skip_ours:
        result.update(run_ours(args, model))
    if "seq_per_s" in result.get("hf", {}) and "seq_per_s" in result:
        result["ratio_ours_over_hf"] = result["seq_per_s"] / result["hf"]["seq_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
