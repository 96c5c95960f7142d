"""Launch a test script as two local jax.distributed hosts (gloo CPU collectives), as a 2-host pod.

Each host runs `script --coordinator_address A --num_processes 2 --process_id I --out OUT *args`
with 2 CPU devices and writes its report to OUT.I.json; `launch` returns the two reports (host 0
first) and the two hosts' printed output, or fails the test with a host's last output; `start` and
`finish` let a test signal or kill a host in between.
"""
import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(script: str, out, args, cache_dir):
    """Starts the two hosts (host 0 first) and returns their processes, output piped.
    cache_dir: a persistent compilation cache the hosts share (a restarted pair finds the first
    pair's programs there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")]))
    address = f"localhost:{free_port()}"
    return [subprocess.Popen(
        [sys.executable, script, "--coordinator_address", address, "--num_processes", "2", "--process_id", str(i),
         "--out", str(out), *[str(a) for a in args]],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def finish(procs, timeout: float):
    """The two hosts' printed output, once both ended (killed if they outlive `timeout` seconds)."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs


def launch(script: str, out, args, cache_dir, timeout: float):
    """Runs the two hosts to their end; both must succeed."""
    procs = start(script, out, args, cache_dir)
    outputs = finish(procs, timeout)
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, f"host exited with {p.returncode}:\n{text[-4000:]}"
    reports = []
    for i in range(2):
        with open(f"{out}.{i}.json") as f:
            reports.append(json.load(f))
    return reports, outputs
