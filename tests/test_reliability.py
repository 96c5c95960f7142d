"""Reliability of a training run: kill -9 and exact resume, SIGTERM -> save + requeue exit code,
unreadable latest checkpoint -> previous one used (and kept), non-finite steps skipped or stopping
the run with the last good state, a checkpoint write that fails (disk full) leaving state intact.

The kill tests run the trainer in a child process: `python tests/test_reliability.py MODEL_DIR ...`
(the __main__ block at the bottom) trains the tiny model on synthetic batches, drawn slowly so that
a signal lands mid-run. Children share one persistent compilation cache, so a restart compiles nothing.
"""
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from test_train_step import packed_batch
from ul2lab.train import checkpoints, schedules
from ul2lab.train import loop as trainer
from ul2lab.models.config import preset

LENGTHS = {"inputs": 32, "targets": 32}
TRAIN_STEPS = 8


def make_config(model_dir, **overrides):
    settings = dict(model_dir=str(model_dir), model=preset("tiny", dropout_rate=0.1),
                    mixture_or_task_name="synthetic", task_feature_lengths=LENGTHS, train_steps=TRAIN_STEPS,
                    batch_size=8, learning_rate=schedules.constant_schedule(0.05), checkpoint_period=2,
                    keep_checkpoints=None, log_period=1, async_checkpoints=True, tensorboard=False,
                    num_devices=1, mesh_shape={"data": 1, "fsdp": 1, "model": 1})
    settings.update(overrides)
    return trainer.TrainConfig(**settings)


def synthetic_batches(seconds_per_batch=0.0, no_targets=lambda index: False):
    """batches(skip): batch i is one of two fixed batches by i's parity, so skipping is exact.
    Batches where `no_targets(i)` have every loss weight 0: 0/0 target tokens, a NaN loss."""
    def batches(skip):
        index = skip
        while True:
            time.sleep(seconds_per_batch)
            batch = packed_batch(100 + index % 2)
            if no_targets(index):
                batch["decoder_loss_weights"][:] = 0
            yield batch
            index += 1
    return batches


def logged_losses(model_dir):
    """step -> loss over every session of the run, the latest record of a repeated step winning."""
    by_step = {}
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record["loss"]
    return by_step


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = jax.config.jax_compilation_cache_dir or str(tmp_path_factory.getbasetemp() / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    model_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer.train(make_config(model_dir), synthetic_batches())
    return str(model_dir), logged_losses(str(model_dir))


def start_child(model_dir, cache_dir, seconds_per_batch):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, __file__, str(model_dir), str(seconds_per_batch)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(child, condition, what, timeout=300):
    """Block until `condition()` holds in the child's model dir (an event, not a wall-clock guess);
    the timeout only turns a hung child into a failure."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert child.poll() is None, f"the child exited early:\n{child.stdout.read()}"
        if condition():
            return
        time.sleep(0.05)
    child.kill()
    raise AssertionError(f"the child did not reach {what} in {timeout}s")


def wait_for_step(child, model_dir, step):
    """Block until the child has logged `step` (metrics.jsonl), so a signal lands after it."""
    path = os.path.join(model_dir, "metrics.jsonl")
    wait_for(child, lambda: os.path.exists(path) and max(logged_losses(model_dir), default=0) >= step,
             f"step {step}")


def finished_steps(model_dir):
    return sorted(int(d) for d in os.listdir(model_dir) if d.isdigit())


@pytest.mark.slow
def test_kill_9_after_first_checkpoint_resumes_exactly(uninterrupted, cache_dir, tmp_path):
    _, full = uninterrupted
    kill_after = 5  # a step after the first checkpoint (2), mid-way to the next ones
    child = start_child(tmp_path, cache_dir, seconds_per_batch=0.4)
    wait_for_step(child, str(tmp_path), kill_after)
    # step 2's save is asynchronous: on a loaded machine it may commit after step 5 is logged, and the
    # test is about a kill after a committed checkpoint
    wait_for(child, lambda: finished_steps(tmp_path), "a committed checkpoint")
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    last_complete = max(finished_steps(tmp_path))  # a step being written when killed is a tmp dir
    assert 2 <= last_complete <= kill_after + 1
    # the same command again: resumes from the last complete checkpoint and repeats the lost steps
    result = trainer.train(make_config(tmp_path), synthetic_batches())
    assert result["step"] == TRAIN_STEPS and result["history"][0]["step"] == last_complete + 1
    assert logged_losses(str(tmp_path)) == full  # exact, steps redone after the kill included


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_with_the_requeue_code(uninterrupted, cache_dir, tmp_path):
    _, full = uninterrupted
    child = start_child(tmp_path, cache_dir, seconds_per_batch=0.4)
    wait_for_step(child, str(tmp_path), 3)
    child.send_signal(signal.SIGTERM)
    output, _ = child.communicate(timeout=300)  # bounded: a run that ignores SIGTERM fails here
    assert child.returncode == trainer.PREEMPTED_EXIT_CODE == 143, output
    stopped_at = max(logged_losses(str(tmp_path)))
    assert stopped_at < TRAIN_STEPS
    assert max(finished_steps(tmp_path)) == stopped_at  # the step it was on, not the last periodic one
    assert f"SIGTERM: saved step {stopped_at}" in output
    trainer.train(make_config(tmp_path), synthetic_batches())
    assert logged_losses(str(tmp_path)) == full


# ---- unreadable checkpoints ------------------------------------------------------------------

def truncate_largest_file(step_dir):
    files = [p for p in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True) if os.path.isfile(p)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 3)


def remove_optimizer_state(step_dir):
    import shutil
    shutil.rmtree(os.path.join(step_dir, "opt_state"))


def half_copied(step_dir):
    """What an interrupted `cp -r` / rsync leaves: the directory name, a few metadata files, no arrays."""
    for path in glob.glob(os.path.join(step_dir, "*", "**", "*"), recursive=True):
        if os.path.isfile(path) and not path.endswith(("_METADATA", "_CHECKPOINT_METADATA")):
            os.remove(path)


@pytest.mark.parametrize("damage", [truncate_largest_file, remove_optimizer_state, half_copied],
                         ids=["truncated_file", "missing_arrays", "half_copied_dir"])
def test_unreadable_latest_checkpoint_is_reported_kept_and_the_previous_one_used(
        uninterrupted, tmp_path, capsys, damage):
    import shutil
    source, full = uninterrupted
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    for step in (8, 6):  # keep 2 and 4: the run stands at 4 with a damaged 6
        shutil.rmtree(os.path.join(model_dir, str(step))) if step == 8 else damage(os.path.join(model_dir, "6"))
    result = trainer.train(make_config(model_dir), synthetic_batches())
    out = capsys.readouterr().out
    assert f"checkpoint {model_dir}/6 cannot be restored" in out
    assert f"resuming {model_dir} at step 4" in out
    assert [r["step"] for r in result["history"]] == [5, 6, 7, 8]
    assert {r["step"]: r["loss"] for r in result["history"]} == {s: full[s] for s in (5, 6, 7, 8)}
    kept = glob.glob(os.path.join(model_dir, "corrupt-6-*"))
    assert len(kept) == 1 and os.listdir(kept[0])  # set aside, not deleted
    assert f"kept the unreadable checkpoint {model_dir}/6 as {kept[0]}" in out
    assert finished_steps(model_dir) == [2, 4, 6, 8]  # step 6 written again, cleanly


def test_a_run_of_another_optimizer_is_an_error_and_nothing_is_set_aside(uninterrupted, tmp_path):
    import optax
    import shutil
    source, _ = uninterrupted
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    config = make_config(model_dir, train_steps=10, optimizer=lambda learning_rate: optax.adam(learning_rate))
    with pytest.raises(checkpoints.CheckpointError, match=f"could not restore step 8 of {model_dir}"):
        trainer.train(config, synthetic_batches())
    assert finished_steps(model_dir) == [2, 4, 6, 8] and not glob.glob(os.path.join(model_dir, "corrupt-*"))


# ---- non-finite losses and gradients ---------------------------------------------------------

def test_non_finite_steps_are_skipped_and_counted(uninterrupted, tmp_path):
    config = make_config(tmp_path, train_steps=6, async_checkpoints=False, max_consecutive_nonfinite=5, log_period=2)
    history = trainer.train(config, synthetic_batches(no_targets=lambda i: i in (2, 3)))["history"]
    assert [(r["step"], r["skipped_updates"]) for r in history] == [(2, 0), (4, 2), (6, 0)]  # a count per log
    assert np.isnan(history[1]["loss"]) and np.isfinite(history[2]["loss"])
    params = {step: checkpoints.load_params(str(tmp_path), step=step)[1] for step in (2, 4, 6)}
    jax.tree_util.tree_map(np.testing.assert_array_equal, params[4], params[2])  # steps 3, 4 changed nothing
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), params[6], params[4])
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # and training went on after them


def test_consecutive_non_finite_steps_stop_the_run_with_the_last_good_state(uninterrupted, tmp_path, capsys):
    source, _ = uninterrupted
    config = make_config(tmp_path, max_consecutive_nonfinite=3, checkpoint_period=100)
    with pytest.raises(trainer.TrainingStopped) as stopped:
        trainer.train(config, synthetic_batches(no_targets=lambda i: i >= 2))
    message = str(stopped.value)
    assert message.startswith("training stopped at step 5: the loss or gradients were non-finite")
    assert "since step 3 (3 in a row" in message and "the last good state, that of step 2" in message
    assert finished_steps(tmp_path) == [5]
    _, saved, _ = checkpoints.load_params(str(tmp_path))
    _, good, _ = checkpoints.load_params(source, step=2)  # the uninterrupted run after step 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, saved, good)


# ---- checkpoint writes that fail ---------------------------------------------------------------

def test_disk_full_during_save_is_a_clear_error_and_the_run_resumes(uninterrupted, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    _, full = uninterrupted
    original = ocp.CheckpointManager.save

    def save_until_the_disk_is_full(self, step, *args, **kwargs):
        if step >= 4:
            os.makedirs(os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp-1"), exist_ok=True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_the_disk_is_full)
    with pytest.raises(trainer.TrainingStopped) as stopped:
        trainer.train(make_config(tmp_path), synthetic_batches())
    assert str(stopped.value).startswith(f"could not write checkpoint 4 to {tmp_path} (No space left on device); "
                                         "checkpoint 2 there is intact")
    monkeypatch.undo()
    assert finished_steps(tmp_path) == [2]
    trainer.train(make_config(tmp_path), synthetic_batches())  # space freed: the same command resumes
    assert logged_losses(str(tmp_path)) == full


@pytest.mark.slow
def test_a_save_over_the_file_size_limit_is_one_line_naming_its_step_and_leaves_no_partial_folder(cache_dir, tmp_path):
    """`ul2lab train` as typed, under `ulimit -f`: step 2's checkpoint is written by a first run, the
    resumed run's asynchronous save of step 4 fails. Before, orbax printed a traceback per writer
    thread, the error named step 6 (the save that found the failure), training went on past step 4
    and 4.orbax-checkpoint-tmp stayed behind."""
    import resource
    from test_train_cli import train_args

    model_dir = str(tmp_path / "run")
    command = [sys.executable, "-c", "import sys, test_train_cli; from ul2lab.cli.main import main; sys.exit(main())"]
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_COMPILATION_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    # tensorstore groups a save's arrays into data files by timing, so only a limit below one array's own bytes
    # fails the same save every time: a 2 MB MLP kernel (64 x 8192 float32) against a 600 kB limit, which
    # stays above the data position's file (0.3-0.4 MB at steps 2-4)
    flags = ("--gin.TrainConfig.checkpoint_period=2", "--gin.preset.mlp_dim=8192")
    first = subprocess.run(command + train_args(model_dir, *flags, steps=2),
                           env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]

    def file_size_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))

    done = subprocess.run(command + train_args(model_dir, *flags, steps=8),
                          env=env, capture_output=True, text=True, timeout=600, preexec_fn=file_size_limit)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(
        f"ul2lab train: error: could not write checkpoint 4 to {model_dir} (File too large); checkpoint 2 there "
        "is intact"), done.stderr[-3000:]
    assert max(logged_losses(model_dir)) <= 6  # found at a step boundary, at the latest by the next save
    assert finished_steps(model_dir) == [2] and not glob.glob(os.path.join(model_dir, "*.orbax-checkpoint-tmp*"))


if __name__ == "__main__":  # the child process of the kill tests
    from ul2lab.runs import train as train_cli
    model_dir, seconds = sys.argv[1], float(sys.argv[2])
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    result = trainer.train(make_config(model_dir), synthetic_batches(seconds))
    sys.exit(train_cli.exit_code(result))
