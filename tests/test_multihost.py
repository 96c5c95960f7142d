"""Multi-host training: 2 processes x 2 CPU devices (gloo collectives) train a tiny T5 with data
and model parallelism through the real training loop, checkpoint, restart, resume, and match a
single-process 4-device run step for step. Also: the start-up flags and cluster detection.

This file is also the worker: `python tests/test_multihost.py --process_id ...` is one host.
"""
import argparse
import json
import os
import sys

import pytest

MESH = {"data": 2, "fsdp": 1, "model": 2}   # data parallel across the 2 hosts, model parallel within
STEPS, SAVE_AT = 6, 3


def run_config(model_dir, train_steps, num_devices=None):
    from ul2lab.train import schedules
    from ul2lab.train import loop as trainer
    from ul2lab.models.config import preset

    return trainer.TrainConfig(
        model_dir=str(model_dir), mixture_or_task_name="synthetic",
        model=preset("tiny", num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1),
        task_feature_lengths={"inputs": 32, "targets": 32}, train_steps=train_steps, batch_size=8,
        learning_rate=schedules.constant_schedule(0.05), checkpoint_period=SAVE_AT, log_period=1,
        tensorboard=False, mesh_shape=MESH, num_devices=num_devices)


def host_batches(skip, seconds_per_batch=0.0):
    """This host's rows of the global batch i (a fixed function of i), from batch `skip` on."""
    import time

    import jax
    from test_train_step import packed_batch

    rows = 8 // jax.process_count()
    lo = jax.process_index() * rows
    index = skip
    while True:
        time.sleep(seconds_per_batch)
        yield {k: v[lo:lo + rows] for k, v in packed_batch(100 + index % 2).items()}
        index += 1


def losses(result):
    return {r["step"]: r["loss"] for r in result["history"]}


# ---------------------------------------------------------------------------------------------
# The worker: one host of the 2-process run.

def worker_main(argv=None):
    parser = argparse.ArgumentParser()
    from ul2lab.cli import train as train_cli
    from ul2lab.train import distributed

    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--train_steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds_per_batch", type=float, default=0.0)  # slow data: a signal lands mid-run
    train_cli.add_host_arguments(parser)  # the flags `ul2lab train` takes
    args = parser.parse_args(argv)
    hosts = train_cli.hosts_from_args(args)
    how = distributed.initialize(**hosts)   # first, before anything touches devices
    again = distributed.initialize(**hosts)  # idempotent

    import jax
    from ul2lab.train import loop as trainer

    from ul2lab.errors import UserError

    try:
        result = trainer.train(run_config(args.model_dir, args.train_steps),
                               lambda skip: host_batches(skip, args.seconds_per_batch))
    except UserError as e:  # as `ul2lab train` reports it: one line, exit 2
        print(f"host {jax.process_index()}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    with open(f"{args.out}.{jax.process_index()}.json", "w") as f:
        json.dump({"how": how, "again": again, "process_count": jax.process_count(),
                   "num_devices": result["num_devices"], "step": result["step"],
                   "local_devices": jax.local_device_count(), "losses": losses(result)}, f)
    # `ul2lab train`'s exit code: 128 + the signal when a stop request saved and ended the run
    sys.exit(128 + result["stop_signal"] if result["preempted"] else 0)


def run_two_hosts(model_dir, train_steps, out, cache_dir, timeout=240):
    from two_hosts import launch

    return launch(__file__, out, ["--model_dir", model_dir, "--train_steps", train_steps], cache_dir, timeout)


def logged_losses(model_dir):
    """step -> loss over every session of the run in metrics.jsonl, the latest record of a step winning."""
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def as_steps(d):
    return {int(k): v for k, v in d.items()}


@pytest.mark.slow
def test_two_hosts_train_checkpoint_resume_match_one_host(tmp_path):
    import numpy as np
    from ul2lab.train import loop as trainer

    one_host = losses(trainer.train(run_config(tmp_path / "one_host", STEPS, num_devices=4), host_batches))
    assert sorted(one_host) == list(range(1, STEPS + 1))

    model_dir = tmp_path / "two_hosts"
    first, _ = run_two_hosts(model_dir, SAVE_AT, tmp_path / "first", tmp_path / "cache")
    for r in first:
        assert (r["how"], r["again"], r["process_count"], r["num_devices"], r["local_devices"]) == (
            "explicit", "already", 2, 4, 2)
    assert first[0]["losses"] == first[1]["losses"]  # both hosts see the same global loss

    # restart both processes: they resume from the step-3 checkpoint they wrote together
    second, outputs = run_two_hosts(model_dir, STEPS, tmp_path / "second", tmp_path / "cache")
    assert all(f"at step {SAVE_AT}" in text for text in outputs), outputs[0][-2000:]
    assert second[0]["losses"] == second[1]["losses"]
    two_hosts = {**as_steps(first[0]["losses"]), **as_steps(second[0]["losses"])}
    assert sorted(two_hosts) == sorted(one_host)
    steps = sorted(one_host)
    np.testing.assert_allclose([two_hosts[s] for s in steps], [one_host[s] for s in steps], rtol=2e-5)
    assert one_host[5] < one_host[1] - 0.5  # it learned: the same batch four steps later
    # process 0 alone writes the run's files: one metrics line per logged step, not one per host
    with open(model_dir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == steps
    assert sorted(p.name for p in model_dir.glob("config.json*")) == ["config.json"]


# ---------------------------------------------------------------------------------------------
# Start-up flags and detection (no processes started).

@pytest.mark.parametrize("kwargs, needs", [
    (dict(num_processes=2), "--coordinator_address, --process_id"),
    (dict(coordinator_address="h:1", process_id=0), "--num_processes"),
])
def test_partial_flags_name_the_missing_ones(kwargs, needs):
    from ul2lab.train import distributed

    with pytest.raises(ValueError, match=f"need {needs} too"):
        distributed.initialize(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="nohostport", num_processes=2, process_id=0), "is not host:port"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "positive whole number"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"must be in 0 \.\.\. 1"),
])
def test_bad_flag_values_are_refused(kwargs, message):
    from ul2lab.train import distributed

    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)


def test_single_host_does_nothing_and_late_initialize_is_explained(monkeypatch):
    import jax
    from ul2lab.train import distributed

    for name in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                 "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is None
    assert not jax.distributed.is_initialized()
    jax.devices()  # the backend is up: connecting now is too late, and the error says why
    with pytest.raises(RuntimeError, match="call it at the very start"):
        distributed.initialize("localhost:1", 2, 0)


SRUN = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "3"}


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({**SRUN, "SLURM_NTASKS": "1"}, None),                     # one task: a single process
    ({**SRUN, "SLURM_NTASKS": "16"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, None),        # the batch script itself, not srun
    ({"TPU_WORKER_HOSTNAMES": "t-0"}, None),                    # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, "tpu"),  # multi-slice
])
def test_cluster_detection(environ, expected):
    from ul2lab.train import distributed

    assert distributed.detect_cluster(environ) == expected


@pytest.mark.parametrize("environ, expected", [
    ({}, None),                                                               # JAX's default
    ({"CUDA_VISIBLE_DEVICES": "5", "SLURM_LOCALID": "5"}, [0]),               # --gpus-per-task=1
    ({"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_GPUS_PER_TASK": "2", "SLURM_LOCALID": "1"}, [0, 1]),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_NTASKS_PER_NODE": "4", "SLURM_LOCALID": "3"}, [3]),  # --gres
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_LOCALID": "1"}, [2, 3]),
])
def test_slurm_tasks_drive_the_gpus_slurm_gave_them(environ, expected):
    from ul2lab.train import distributed

    assert distributed.slurm_local_device_ids(environ) == expected


if __name__ == "__main__":
    worker_main()
