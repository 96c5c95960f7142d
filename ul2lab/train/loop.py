"""The training loop, top to bottom: checks -> state (restore or init) -> batches -> step -> log -> save.

`train(TrainConfig(...), batches)` is the whole run; the settings and their checks are in
ul2lab.train.config, the state's layout and origin in ul2lab.train.state.

Steps, as in t5x: TRAIN_STEPS is the step to stop at; a run from INITIAL_CHECKPOINT_PATH continues
that checkpoint's step (TRAIN_STEPS_RELATIVE: this many steps past it). Every EVAL_PERIOD steps and
at the last one, the evaluation the runs floor injected (ul2lab.train.evaluation) runs and is logged.

Exact resumption: the batches come from a deterministic pipeline; the checkpoint records how many
were drawn from which mixture and, per host, the pipeline's position (ul2lab.train.data_position),
so a resumed run continues with the next batch in constant time (or, for batches that cannot save
a position, replays the ones drawn) and reproduces the uninterrupted run's losses.

Reliability: SIGTERM (preemption) saves the current step and `train` returns with
result["preempted"] (the CLI then exits PREEMPTED_EXIT_CODE, for the scheduler to requeue); an
unreadable latest checkpoint is reported and the previous one used; a step with a non-finite loss
or gradient is skipped, and `max_consecutive_nonfinite` of them in a row stop the run with the last
good state saved; a checkpoint that cannot be written stops the run with the previous one intact.
"""
import dataclasses
import os
import signal
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from ul2lab.train import checkpoints, data_position, flops, partitioning, run_logging, schedules
from ul2lab.train import state as state_lib
from ul2lab.train.config import PREEMPTED_EXIT_CODE, ConfigError, TrainConfig, TrainingStopped, check, end_step
from ul2lab.train.evaluation import EvalSources, PeriodicEval

__all__ = ["train", "TrainConfig", "ConfigError", "TrainingStopped", "PREEMPTED_EXIT_CODE"]


def train(config: TrainConfig, batches: Callable[[int], Iterator[dict]], *, vocab_path: Optional[str] = None,
          on_checked: Optional[Callable[[], None]] = None, evaluation: Optional[EvalSources] = None) -> dict:
    """Run (or resume) training; returns {"step", "history": [logged metrics], "summary", ...}.

    `batches(skip)` yields host batches (dicts of numpy arrays) after skipping `skip` of them
    (ul2lab.data.pipeline builds them from a seqio task or mixture). `vocab_path` is recorded in
    config.json. `on_checked()` is called once every check has passed, before MODEL_DIR is first
    written (the train job writes config.gin there). `evaluation`: what runs every
    config.eval_period steps (validation batches, an inference-metrics callback; see EvalSources).
    """
    mesh, rules = check(config)
    # the data pipeline is built before anything is written, so a task that cannot produce these
    # feature lengths fails here with MODEL_DIR untouched
    try:
        data = batches(0)  # a resumed run moves it to the saved position below (data_position.resume)
    except ValueError as e:
        raise ConfigError(f"the data pipeline of {config.mixture_or_task_name!r} cannot be built with "
                          f"TASK_FEATURE_LENGTHS {dict(config.task_feature_lengths)}: {e}") from e
    if on_checked is not None:
        on_checked()

    schedule = config.learning_rate or schedules.rsqrt_schedule()
    optimizer = (config.optimizer or state_lib.default_optimizer)(learning_rate=schedule)
    setup = state_lib.build_step(
        config.model, optimizer, schedule, mesh, rules, config.seed,
        num_microbatches=config.num_microbatches, z_loss=config.z_loss, label_smoothing=config.label_smoothing,
        loss_normalizing_factor=config.loss_normalizing_factor,
        max_consecutive_nonfinite=config.max_consecutive_nonfinite)
    step_fn, state_shardings, abstract_state = setup.step_fn, setup.state_shardings, setup.abstract_state

    # ---- state: resume this run, or start (from INITIAL_CHECKPOINT_PATH's params, or random)
    ckpt = checkpoints.RunCheckpoints(config.model_dir, config.keep_checkpoints, config.keep_period,
                                      config.async_checkpoints)
    state, restored_run = state_lib.restore_or_init(config, ckpt, optimizer, abstract_state, state_shardings)
    if restored_run is not None:  # the step restored may be older than the latest (unreadable) one
        restored_batches = (restored_run.get("data_batches", 0)
                            if restored_run.get("mixture_or_task_name") == config.mixture_or_task_name else 0)
        position = ckpt.restore_data_position(restored_run["step"]) if restored_batches else None
        data_batches, data = restored_batches, data_position.resume(batches, data, restored_batches, position)
    else:
        data_batches = 0
    checkpoints.write_config(config.model_dir, config.model, vocab_path,
                             mixture_or_task_name=config.mixture_or_task_name,
                             task_feature_lengths=dict(config.task_feature_lengths))
    start_step = int(state.step)
    # the step the run started at (INITIAL_CHECKPOINT_PATH's, else 0) fixes TRAIN_STEPS_RELATIVE's end
    initial_step = restored_run.get("initial_step", 0) if restored_run is not None else start_step
    config = dataclasses.replace(config, train_steps=end_step(config, initial_step))
    evaluator = (PeriodicEval(evaluation, config, mesh, rules, state_shardings.params)
                 if evaluation is not None and config.eval_period else None)

    lengths = config.task_feature_lengths
    tokens_per_step = config.batch_size * (lengths["inputs"] + lengths["targets"])
    target_slots = config.batch_size * lengths["targets"]
    step_flops = flops.train_flops_per_step(config.model, config.batch_size, lengths["inputs"],
                                            lengths["targets"])
    peak = flops.peak_flops_per_device(override=config.peak_flops_per_device)

    logger = run_logging.RunLogger(config.model_dir, config.train_steps, start_step, config.tensorboard)
    stop = _StopOnSigterm()
    saved_step = ckpt.latest_step()
    last_time, last_step = None, start_step
    stopped = None
    period_sums, period_steps = None, 0  # metrics are averaged over each log period, as t5x does
    try:  # whatever stops the loop, pending saves finish and the SIGTERM handler is given back
        with partitioning.axis_rules(mesh, rules):
            for step in range(start_step, config.train_steps):
                batch = partitioning.host_batch_to_global(next(data), mesh, rules)
                state, metrics = step_fn(state, batch)
                data_batches += 1
                period_sums = metrics if period_sums is None else jax.tree_util.tree_map(jnp.add, period_sums, metrics)
                period_steps += 1
                done = step + 1
                if last_time is None:  # the first step compiles: time from its end on
                    jax.block_until_ready(state.step)
                    last_time, last_step = time.time(), done
                if done % config.log_period == 0 or done == config.train_steps or stop.requested:
                    learning_rate = float(metrics["learning_rate"])  # this step's, not the period's mean
                    # means over the period, but skipped_updates is a count
                    metrics = {k: float(v) / (1 if k == "skipped_updates" else period_steps)
                               for k, v in jax.device_get(period_sums).items()}
                    metrics["learning_rate"] = learning_rate
                    # t5x's names: the loss without z-loss, the share of target slots holding a token
                    metrics["cross_ent_loss"] = metrics["loss"] - metrics["z_loss"]
                    metrics["nonpadding_fraction"] = metrics["target_tokens"] / target_slots
                    period_sums, period_steps = None, 0
                    now = time.time()
                    if done > last_step:
                        seconds_per_step = (now - last_time) / (done - last_step)
                        metrics["tokens_per_s"] = tokens_per_step / seconds_per_step
                        metrics["mfu"] = flops.mfu(step_flops, seconds_per_step, mesh.size, peak)
                        # t5x's timing scalars, under t5x's names (target tokens: the whole targets array)
                        metrics["timing/steps_per_second"] = 1.0 / seconds_per_step
                        metrics["timing/seqs_per_second"] = config.batch_size / seconds_per_step
                        metrics["timing/target_tokens_per_second"] = target_slots / seconds_per_step
                    last_time, last_step = now, done
                    logger.log(done, metrics)
                periodic = done % config.checkpoint_period == 0 or done % config.log_period == 0
                if (periodic or done == config.train_steps) and config.max_consecutive_nonfinite is not None:
                    streak = int(state.nonfinite_streak)  # synced here only, where the host waits anyway
                    if streak >= config.max_consecutive_nonfinite:
                        stopped = nonfinite_message(config, done, streak)
                if done % config.checkpoint_period == 0 or done == config.train_steps or stop.requested or stopped:
                    save(ckpt, done, state, state_lib.run_record(state, config, data_batches, initial_step),
                         saved_step, host_position(data))
                    saved_step = done
                if stopped:
                    break
                if stop.requested:
                    print(f"SIGTERM: saved step {done} to {config.model_dir}; rerun the same command to resume",
                          flush=True)
                    break
                if evaluator is not None and evaluator.due(done, config.train_steps):
                    logger.announce_eval(done, evaluator.describe())
                    eval_started = time.time()
                    results = evaluator.run(done, state.params)
                    eval_seconds = time.time() - eval_started
                    logger.log_eval(done, results, eval_seconds)
                    last_time += eval_seconds  # evaluation time is not training time (tokens/s, MFU)
        wait(ckpt, saved_step)
    finally:
        ckpt.close()
        stop.restore()
    final_step = int(state.step)
    summary = logger.close(final_step, saved_step)
    if stopped:
        print(stopped, flush=True)
        raise TrainingStopped(stopped)
    return {"step": final_step, "history": logger.history, "summary": summary, "num_devices": mesh.size,
            "preempted": stop.requested and final_step < config.train_steps}


def nonfinite_message(config: TrainConfig, step: int, streak: int) -> str:
    first_bad = step - streak + 1
    return (f"training stopped at step {step}: the loss or gradients were non-finite (NaN/inf) at every step "
            f"since step {first_bad} ({streak} in a row, TrainConfig.max_consecutive_nonfinite="
            f"{config.max_consecutive_nonfinite}); their updates were skipped, so checkpoint {step} in "
            f"{config.model_dir} holds the last good state, that of step {first_bad - 1}. Look at the data "
            "near that step, lower the learning rate, or rerun the same command to continue past it")


def host_position(data):
    """The orbax item of this host's data position (None when the batches cannot save positions);
    a pipeline that turns out not to be checkpointable is reported once."""
    if not data_position.saves_positions(data):
        return None
    position = data.save_position()
    if position is None and not getattr(data, "_ul2lab_warned", False):
        data_position.warn_unsaveable(data)
        data._ul2lab_warned = True
    return data_position.HostBytesSave(position)


def save(ckpt, step: int, state, run: dict, previous: Optional[int], position=None):
    """Start saving `step` (with this host's data position, if any); a write that fails (disk full,
    read-only MODEL_DIR) stops the run with a plain error, leaving the in-memory state and the
    previous checkpoint as they were."""
    try:
        ckpt.save(step, state.params, state.opt_state, run, data_position=position)
    except Exception as e:  # noqa: BLE001  orbax wraps OS errors of its writer threads
        raise _write_error(ckpt.directory, step, previous, e) from e


def wait(ckpt, step: Optional[int]):
    try:
        ckpt.wait()
    except Exception as e:  # noqa: BLE001
        raise _write_error(ckpt.directory, step, None, e) from e


def _write_error(directory: str, step, previous: Optional[int], error: Exception) -> TrainingStopped:
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    reason = (os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno
              else checkpoints.one_line(error))
    kept = f"checkpoint {previous} there is intact" if previous is not None else "earlier checkpoints are untouched"
    return TrainingStopped(
        f"could not write checkpoint {step} to {directory} ({reason}); {kept}. Free disk space or make "
        "MODEL_DIR writable, then rerun the same command to resume from the last complete checkpoint")


class _StopOnSigterm:
    """Turns SIGTERM (preemption) into a request to save and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, preemption then loses the last steps
            pass

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
