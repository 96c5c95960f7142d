"""Multi-host start-up: connect this process to the others with `jax.distributed.initialize`.

Every process of a multi-host run executes the same program and must call `initialize` before
anything asks JAX for devices (jax.devices(), a mesh, a jitted call). Three ways in:

  explicit   --coordinator_address host:port --num_processes N --process_id i (all three, every
             process; process 0 serves the coordinator on that port)
  SLURM      an srun step with SLURM_NTASKS > 1 (one task per GPU or per node): JAX reads the
             coordinator, process count and id from SLURM's variables; each task drives the GPUs
             SLURM gave it (see slurm_local_device_ids)
  TPU pod    a Cloud TPU VM (or GKE TPU pod) with several workers: JAX reads them from the TPU
             environment or the VM's metadata, so `gcloud ... ssh --worker=all` needs no flags

On a single host with none of these, nothing happens. Calling it again is harmless.
"""
import glob
import importlib.util
import os
from typing import Optional, Sequence, Union

# TPU environments that name more than one worker, or several slices (Megascale)
_TPU_WORKER_LISTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def detect_cluster(environ=None) -> Optional[str]:
    """'slurm', 'tpu' or None: the multi-process launcher this process runs under, if any."""
    env = os.environ if environ is None else environ
    slurm_step = all(name in env for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID"))
    if slurm_step and _int_or(env.get("SLURM_NTASKS"), 1) > 1:
        # an srun step of several tasks; one task (salloc + python) is one process: nothing to connect
        return "slurm"
    if any(len(env.get(name, "").split(",")) > 1 for name in _TPU_WORKER_LISTS):
        return "tpu"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or _int_or(env.get("MEGASCALE_NUM_SLICES"), 1) > 1:
        return "tpu"
    if environ is None and _on_cloud_tpu_vm():
        # a TPU VM of a pod slice learns its workers from the VM metadata; JAX asks it (on a
        # single-host TPU VM that gives one process, which is harmless)
        return "tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    # TPU chips appear as /dev/accel* (v2-v4) or /dev/vfio/<n> (v5 and later), next to libtpu
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _int_or(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Union[int, Sequence[int]]] = None) -> Optional[str]:
    """Connect to the other processes; returns how ('explicit', 'slurm', 'tpu') or None (single host).

    Must run before any JAX call that touches devices. Idempotent: a second call returns
    'already' without doing anything.
    """
    import jax

    explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                "--process_id": process_id}
    given = [flag for flag, value in explicit.items() if value is not None]
    if given and len(given) < len(explicit):
        missing = [flag for flag in explicit if flag not in given]
        raise ValueError(f"multi-host flags {', '.join(given)} need {', '.join(missing)} too: pass all of "
                         "--coordinator_address host:port, --num_processes and --process_id on every "
                         "process (or none of them under SLURM or on a TPU pod)")
    if given:
        _check_explicit(coordinator_address, num_processes, process_id)

    if jax.distributed.is_initialized():
        return "already"
    how = "explicit" if given else detect_cluster()
    if how is None:
        if local_device_ids is not None:
            raise ValueError("--local_device_ids only applies to a multi-host run; pass it with "
                             "--coordinator_address, --num_processes and --process_id")
        return None
    if given and num_processes == 1:
        return None  # one process: there is nobody to connect to
    _require_no_backend()
    if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "") == "cpu":
        # CPU processes exchange collectives through gloo (jax 0.10's default; set so it stays)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if given:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    else:
        # SLURM and TPU: JAX's own cluster detection fills in all three values
        if how == "slurm" and local_device_ids is None:
            local_device_ids = slurm_local_device_ids()
        jax.distributed.initialize(local_device_ids=local_device_ids)
    print(f"jax.distributed ({how}): process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices", flush=True)
    return how


def slurm_local_device_ids(environ=None) -> Optional[list]:
    """The GPUs (CUDA ordinals) this SLURM task drives, or None to keep JAX's default.

    JAX's default is GPU number SLURM_LOCALID, right when every task sees all of the node's GPUs
    (--gres) but an invalid device on tasks 1, 2, ... when SLURM binds GPUs to tasks
    (--gpus-per-task, as launch/launch.py does): each task then sees only its own GPUs, from 0.
    """
    env = os.environ if environ is None else environ
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return None
    if "SLURM_GPUS_PER_TASK" in env or len(visible) == 1:
        return list(range(len(visible)))  # bound to this task: all of them
    tasks_here = _int_or(env.get("SLURM_NTASKS_PER_NODE"), 0) or _int_or(
        env.get("SLURM_TASKS_PER_NODE", "").split("(")[0].split(",")[0], 0)
    local = _int_or(env.get("SLURM_LOCALID"), 0)
    if tasks_here < 1 or len(visible) % tasks_here:
        return None
    per_task = len(visible) // tasks_here  # shared by the node's tasks: an equal share each
    return list(range(local * per_task, (local + 1) * per_task))


def _check_explicit(coordinator_address: str, num_processes: int, process_id: int):
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address {coordinator_address!r} is not host:port; write e.g. "
                         "10.0.0.1:1234 (process 0's address and a free port)")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"--num_processes must be a positive whole number, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in 0 ... {num_processes - 1} (--num_processes "
                         f"{num_processes}), got {process_id!r}")


def _require_no_backend():
    from jax._src import xla_bridge  # the public API has no "are devices initialized?" query

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("ul2lab.train.distributed.initialize() was called after JAX had already started its "
                           "devices (something called jax.devices(), built a mesh or ran a computation "
                           "first); call it at the very start of the program")


class StopAgreement:
    """One stop decision for all hosts: at every step boundary each host contributes its own stop
    request (the signal number it received, 0 for none) and all of them stop at the same step with
    the same signal, the largest one asked for (SIGTERM over Ctrl-C).

    A host that acts on its own signal alone would enter the checkpoint's barrier while the others
    enter the next step's collectives: a hang. So on several hosts the requests are combined by a
    tiny all-reduce (a jitted max over one int per device) that every host launches after each step.
    It is read one boundary later: its inputs are those of the previous boundary, the same on every
    host, and reading it waits only for the step before the current one, so the host may still run
    one step ahead of the devices. A stop therefore takes effect one step after it was asked for.
    On one host nothing is exchanged: the decision is the local request, at once.
    """

    def __init__(self, stop, mesh):
        import jax

        self._stop = stop
        self.hosts = jax.process_count()
        self._pending = None
        self.signal: Optional[int] = None  # the agreed stop: the signal that stops every host
        if self.hosts > 1:
            import numpy as np
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            devices = np.asarray(mesh.devices).reshape(-1)
            self._sharding = NamedSharding(Mesh(devices, ("hosts",)), PartitionSpec("hosts"))
            self._local = sum(d.process_index == jax.process_index() for d in devices)
            self._size = devices.size
            self._max = jax.jit(lambda flags: flags.max(),
                                out_shardings=NamedSharding(self._sharding.mesh, PartitionSpec()))

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return self._stop.name if self._stop.signal == self.signal else _signal_name(self.signal) + " (another host)"

    def at_boundary(self) -> bool:
        """Called by every host after every step, in the same order as the steps: True once all hosts
        agree to stop here."""
        if self.hosts == 1:
            self.signal = self._stop.signal
            return self.requested
        import jax
        import numpy as np

        mine = np.full((self._local,), self._stop.signal or 0, np.int32)
        launched = jax.make_array_from_process_local_data(self._sharding, mine, (self._size,))
        previous, self._pending = self._pending, self._max(launched)
        if previous is not None:
            agreed = int(np.asarray(previous.addressable_data(0)))
            self.signal = agreed or None
        return self.requested


def _signal_name(signum: Optional[int]) -> str:
    from ul2lab.train.interrupts import SIGNAL_NAMES

    return SIGNAL_NAMES.get(signum, f"signal {signum}")


# what a collective reports when a peer process is gone (gloo on CPU, NCCL on GPU, the coordination service)
_PEER_LOST = ("connection closed by peer", "connection reset", "broken pipe", "heartbeat timeout",
              "nccl", "gloo", "unavailable", "task is set to error")


def lost_host_error(error: Exception) -> Optional[str]:
    """The first line of a failed multi-host computation's error (`error` or its cause) when it says
    another host is gone (a collective whose peer closed its connection), else None."""
    import jax

    while error is not None and not isinstance(error, jax.errors.JaxRuntimeError):
        error = error.__cause__  # e.g. a save that failed on it
    if jax.process_count() == 1 or error is None:
        return None
    text = str(error)
    if not any(marker in text.lower() for marker in _PEER_LOST):
        return None
    return text.strip().splitlines()[0][:300]


def abandon_peers():
    """After another host died: this process ends, at its exit, at once with status 2 (as a one-line
    error of `ul2lab`), skipping JAX's shutdown, which would wait for the dead host at a barrier until
    the heartbeat timeout and then abort with a C++ stack dump."""
    import atexit
    import sys

    def end_now():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(LOST_HOST_EXIT_CODE)

    atexit.register(end_now)  # registered last, so it runs before JAX's own exit handlers


LOST_HOST_EXIT_CODE = 2
