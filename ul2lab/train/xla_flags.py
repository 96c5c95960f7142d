"""Recommended XLA compiler flags per platform, set before JAX starts its backend.

GPU (NVIDIA), through XLA_FLAGS; every flag exists in jax 0.10's XLA (tests/test_xla_flags.py
parses them, since an unknown flag aborts the process):
  latency hiding scheduler       overlap collectives (FSDP all-gathers, gradient reduce-scatters)
                                 with compute instead of running them back to back
  triton gemm off                matmuls go to cuBLAS(Lt), faster for T5's bf16 shapes
  highest-priority async stream  collectives are not starved by compute kernels
  combine thresholds 128 MiB     fewer, larger collectives (one per layer, not one per tensor)
  pipelined collectives          prefetch the next layer's all-gather inside scanned layers
  while-loop double buffering    the same for scan_layers=True's loop
TPU, through LIBTPU_INIT_ARGS (read by libtpu; XLA_FLAGS is not): the data-parallel all-reduce
  optimization and async collective fusion that maxtext's TPU configs enable.
CPU: nothing (the tests and the demo run as XLA's defaults).

`apply()` sets a variable only where the user has not: whatever is already in XLA_FLAGS or
LIBTPU_INIT_ARGS wins, and an empty value (XLA_FLAGS="") means "no flags, please".
"""
import importlib.util
import os
from typing import Dict, MutableMapping, Optional

GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)

TPU_LIBTPU_INIT_ARGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)

_CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def detect_platform(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """'gpu', 'tpu' or 'cpu': the backend JAX will start, found without starting it."""
    env = os.environ if environ is None else environ
    requested = env.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if requested:
        return {"cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}.get(requested, "cpu")
    if environ is not None:
        return "cpu"  # an explicit environment without JAX_PLATFORMS: look no further
    from ul2lab.train.distributed import _on_cloud_tpu_vm

    if _on_cloud_tpu_vm():
        return "tpu"
    if any(importlib.util.find_spec(p) for p in _CUDA_PLUGINS) and os.path.exists("/dev/nvidiactl"):
        return "gpu"
    return "cpu"


def recommended(platform: str) -> Dict[str, str]:
    """{environment variable: value} of the recommended flags for 'gpu', 'tpu' or 'cpu'."""
    if platform == "gpu":
        return {"XLA_FLAGS": " ".join(GPU_XLA_FLAGS)}
    if platform == "tpu":
        return {"LIBTPU_INIT_ARGS": " ".join(TPU_LIBTPU_INIT_ARGS)}
    if platform == "cpu":
        return {}
    raise ValueError(f"platform {platform!r} is not 'gpu', 'tpu' or 'cpu'")


def apply(platform: Optional[str] = None, environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Set the platform's recommended flags where the user set none; returns what was set.

    Call before anything starts JAX's backend (XLA reads the flags once, at start-up).
    """
    env = os.environ if environ is None else environ
    platform = platform or detect_platform(environ)
    applied = {name: value for name, value in recommended(platform).items() if name not in env}
    if applied and environ is None:
        from jax._src import xla_bridge  # the public API has no "has the backend started?" query

        if xla_bridge.backends_are_initialized():
            raise RuntimeError("ul2lab.train.xla_flags.apply() was called after JAX had started its devices, "
                               "so XLA would ignore the flags; call it at the very start of the program")
    env.update(applied)
    return applied
