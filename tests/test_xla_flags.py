"""Per-platform XLA flags: they exist in this jaxlib, apply only on GPU/TPU, and never override the user."""
import os
import subprocess
import sys

import pytest

from ul2lab.train import xla_flags


def test_gpu_flags_exist_in_this_xla():
    # XLA parses every flag in XLA_FLAGS at start-up on any platform and aborts on an unknown one
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.recommended("gpu")["XLA_FLAGS"])
    ok = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "3.0", ok.stderr[-2000:]
    env["XLA_FLAGS"] += " --xla_gpu_no_such_flag=true"  # the check above would catch a stale flag
    bad = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(3).sum()"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr


@pytest.mark.parametrize("environ, platform", [
    ({"JAX_PLATFORMS": "cuda"}, "gpu"), ({"JAX_PLATFORMS": "tpu"}, "tpu"),
    ({"JAX_PLATFORMS": "cpu"}, "cpu"), ({}, "cpu"),
])
def test_detect_platform_from_the_environment(environ, platform):
    assert xla_flags.detect_platform(environ) == platform


def test_gpu_flags_are_set_only_where_the_user_set_none():
    env = {"JAX_PLATFORMS": "cuda"}
    applied = xla_flags.apply(environ=env)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
    assert applied == {"XLA_FLAGS": env["XLA_FLAGS"]}
    mine = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert xla_flags.apply(environ=mine) == {} and mine["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    empty = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": ""}  # "no flags, please"
    assert xla_flags.apply(environ=empty) == {} and empty["XLA_FLAGS"] == ""


def test_tpu_flags_go_to_libtpu_and_cpu_gets_none():
    env = {"JAX_PLATFORMS": "tpu"}
    assert set(xla_flags.apply(environ=env)) == {"LIBTPU_INIT_ARGS"} and "XLA_FLAGS" not in env
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert xla_flags.apply(environ=cpu) == {} and cpu == {"JAX_PLATFORMS": "cpu"}
    with pytest.raises(ValueError, match="not 'gpu', 'tpu' or 'cpu'"):
        xla_flags.recommended("cuda")
