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

Reliability: SIGTERM (preemption) or Ctrl-C saves the current step, also while the loop waits for
data, and `train` returns with result["preempted"] (the CLI then exits PREEMPTED_EXIT_CODE, for the
scheduler to requeue); an
unreadable latest checkpoint is reported and the previous one used; a step with a non-finite loss
or gradient is skipped, and `max_consecutive_nonfinite` of them in a row stop the run with the last
good state saved; a checkpoint that cannot be written stops the run with the previous one intact.
"""
import dataclasses
import os
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from ul2lab.train import checkpoints, data_position, distributed, flops, interrupts, partitioning, run_logging
from ul2lab.train import schedules
from ul2lab.train import state as state_lib
from ul2lab.train.config import PREEMPTED_EXIT_CODE, ConfigError, TrainConfig, TrainingStopped, check, end_step
from ul2lab.train.evaluation import EvalSources, PeriodicEval

__all__ = ["train", "TrainConfig", "ConfigError", "TrainingStopped", "PREEMPTED_EXIT_CODE"]


def train(config: TrainConfig, batches: Callable[[int], Iterator[dict]], *, vocab_path: Optional[str] = None,
          extra_ids: Optional[int] = None, on_checked: Optional[Callable[[], None]] = None,
          evaluation: Optional[EvalSources] = None) -> dict:
    """Run (or resume) training; returns {"step", "history": [logged metrics], "summary", ...}.

    `batches(skip)` yields host batches (dicts of numpy arrays) after skipping `skip` of them
    (ul2lab.data.pipeline builds them from a seqio task or mixture). `vocab_path` is copied into
    MODEL_DIR and recorded in config.json with the vocabulary's `extra_ids`. `on_checked()` is called
    once every check has passed and the state is restored (or made), before anything but a set-aside
    corrupt step is written to MODEL_DIR (the train job writes config.gin there). `evaluation`: what
    runs every config.eval_period steps (validation batches, an inference-metrics callback; see EvalSources).
    """
    stop = interrupts.StopRequests()  # from here on SIGTERM / Ctrl-C stop the run cleanly
    feed = None
    try:
        mesh, rules = check(config)
        checkpoints.check_same_vocabulary(config.model_dir, vocab_path)
        # the data pipeline is built before anything is written, so a task that cannot produce these
        # feature lengths (or a resume with another BATCH_SIZE) fails here with MODEL_DIR untouched
        batches_to_skip(checkpoints.latest_run_record(config.model_dir), config)
        data = _build_batches(batches, 0, config)  # a resumed run moves it to the saved position below

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
        try:
            state, restored_run = state_lib.restore_or_init(config, ckpt, optimizer, abstract_state, state_shardings)
            data_batches = 0
            if restored_run is not None:  # the step restored may be older than the latest (unreadable) one
                data_batches = batches_to_skip(restored_run, config)
                same_rows = restored_run.get("batch_size", config.batch_size) == config.batch_size
                position = (ckpt.restore_data_position(restored_run["step"])
                            if data_batches and same_rows else None)
                data = data_position.resume(batches, data, data_batches, position)
            # every check passed and the state exists: only now is MODEL_DIR written
            if on_checked is not None:
                on_checked()
            os.makedirs(config.model_dir, exist_ok=True)
            vocab_extra = {} if extra_ids is None else {"extra_ids": extra_ids}
            checkpoints.write_config(config.model_dir, config.model, vocab_path, **vocab_extra,
                                     mixture_or_task_name=config.mixture_or_task_name,
                                     task_feature_lengths=dict(config.task_feature_lengths))
            # on demand (depth 0): the feed never draws ahead of the steps, so the data position saved
            # with a step is that of the batches this step consumed (tf.data prefetches inside)
            feed = interrupts.DataFeed(data, depth=0)
            return _run_steps(config, mesh, rules, step_fn, state, state_shardings, restored_run, ckpt, data, feed,
                              data_batches, stop, evaluation)
        except Exception as e:  # noqa: BLE001  only a lost host is handled here
            lost = distributed.lost_host_error(e)
            if lost is None:
                raise
            ckpt = None  # its pending saves would wait for the dead host
            distributed.abandon_peers()
            raise TrainingStopped(
                f"host {jax.process_index()} of {jax.process_count()}: another host stopped responding ({lost}); "
                "the run needs every host. Restart all hosts with the same command to resume from the last "
                f"complete checkpoint in {config.model_dir}") from e
        finally:
            if ckpt is not None:
                ckpt.close()
    finally:
        if feed is not None:
            feed.close()
        stop.restore()


def _build_batches(batches, skip: int, config: TrainConfig):
    try:
        return batches(skip)
    except ValueError as e:
        raise ConfigError(f"the data pipeline of {config.mixture_or_task_name!r} cannot be built with "
                          f"TASK_FEATURE_LENGTHS {dict(config.task_feature_lengths)}: {e}") from e


def batches_to_skip(run: Optional[dict], config: TrainConfig) -> int:
    """Batches drawn before, to continue the data where the run record left it (0 for a new run or task).

    A resumed run with another BATCH_SIZE would skip batches of the new size and so land elsewhere in
    the data: it is refused unless TrainConfig.allow_batch_size_change, which converts the position
    (rounding up: no example is seen twice, at most one batch's worth is left out)."""
    if run is None or run.get("mixture_or_task_name") != config.mixture_or_task_name:
        return 0
    drawn, saved_batch_size = run.get("data_batches", 0), run.get("batch_size")
    if saved_batch_size is None or saved_batch_size == config.batch_size:
        return drawn
    if not config.allow_batch_size_change:
        raise ConfigError(
            f"{config.model_dir} was trained with BATCH_SIZE {saved_batch_size} (step {run.get('step')}), this run "
            f"has BATCH_SIZE {config.batch_size}: the resumed data would start elsewhere than where it stopped. "
            f"Resume with BATCH_SIZE = {saved_batch_size}, or set TrainConfig.allow_batch_size_change = True to "
            "continue after the examples already seen")
    return -(-drawn * saved_batch_size // config.batch_size)


def _run_steps(config: TrainConfig, mesh, rules, step_fn, state, state_shardings, restored_run, ckpt, data, feed,
               data_batches: int, stop, evaluation) -> dict:
    """The step loop: draw a batch (interruptibly), step, log, evaluate, save; then the summary."""
    start_step = int(state.step)
    # the step the run started at (INITIAL_CHECKPOINT_PATH's, else 0) fixes TRAIN_STEPS_RELATIVE's end
    initial_step = restored_run.get("initial_step", 0) if restored_run is not None else start_step
    config = dataclasses.replace(config, train_steps=end_step(config, initial_step))
    evaluator = (PeriodicEval(evaluation, config, mesh, rules, state_shardings.params)
                 if evaluation is not None and config.eval_period else None)

    agreement = distributed.StopAgreement(stop, mesh)  # every host stops at the same step
    # a host alone may stop while it waits for data; on several hosts each one waits for its batch
    # (the others are waiting for it in the step's collectives) and the stop is agreed after the step
    interruptible = stop if agreement.hosts == 1 else None

    def position():  # this host's data position, unless the feed is drawing a batch right now
        return None if feed.busy else host_position(data)

    lengths = config.task_feature_lengths
    tokens_per_step = config.batch_size * (lengths["inputs"] + lengths["targets"])
    target_slots = config.batch_size * lengths["targets"]
    step_flops = flops.train_flops_per_step(config.model, config.batch_size, lengths["inputs"],
                                            lengths["targets"])
    peak = flops.peak_flops_per_device(override=config.peak_flops_per_device)

    logger = run_logging.RunLogger(config.model_dir, config.train_steps, start_step, config.tensorboard)
    saved_step = ckpt.latest_step()
    last_time, last_step = None, start_step
    stopped = None
    period_sums, period_steps = None, 0  # metrics are averaged over each log period, as t5x does
    done = start_step
    if start_step < config.train_steps:
        print(f"step {start_step + 1}: waiting for the first batch and compiling the train step (the first step "
              "takes longest; progress is logged every TrainConfig.log_period steps)", flush=True)
    with partitioning.axis_rules(mesh, rules):  # whatever stops the loop, pending saves finish
        for step in range(start_step, config.train_steps):
            try:
                host_batch = feed.get(interruptible)
            except StopIteration:
                stopped = (f"the data of {config.mixture_or_task_name!r} ran out after {data_batches} batches, at "
                           f"step {done} of {config.train_steps}")
                if done > start_step and done != saved_step:
                    save(ckpt, done, state, state_lib.run_record(state, config, data_batches, initial_step),
                         saved_step, position())
                    stopped += f"; step {done} is saved in {config.model_dir}"
                stopped += ". Give the task more data (or more epochs), or lower TRAIN_STEPS"
                break
            if host_batch is None:  # a stop was requested while waiting for data
                break
            batch = partitioning.host_batch_to_global(host_batch, mesh, rules)
            state, metrics = step_fn(state, batch)
            data_batches += 1
            period_sums = metrics if period_sums is None else jax.tree_util.tree_map(jnp.add, period_sums, metrics)
            period_steps += 1
            done = step + 1
            agreement.at_boundary()
            if last_time is None:  # the first step compiles: time from its end on
                jax.block_until_ready(state.step)
                last_time, last_step = time.time(), done
            if done % config.log_period == 0 or done == config.train_steps or agreement.requested:
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
                elif done == config.train_steps and streak and streak >= done - start_step:
                    # fewer steps than the limit, but not one of them trained: that is no success
                    stopped = nonfinite_message(config, done, streak, whole_session=True)
            if done % config.checkpoint_period == 0 or done == config.train_steps or agreement.requested or stopped:
                save(ckpt, done, state, state_lib.run_record(state, config, data_batches, initial_step),
                     saved_step, position())
                saved_step = done
            if stopped or agreement.requested:
                break
            if evaluator is not None and evaluator.due(done, config.train_steps):
                logger.announce_eval(done, evaluator.describe())
                eval_started = time.time()
                results = evaluator.run(done, state.params)
                eval_seconds = time.time() - eval_started
                logger.log_eval(done, results, eval_seconds)
                last_time += eval_seconds  # evaluation time is not training time (tokens/s, MFU)
        if agreement.hosts == 1:
            agreement.at_boundary()  # a request that came while waiting for data
        if agreement.requested and not stopped:
            if done > start_step and done != saved_step:  # asked to stop while waiting for data
                save(ckpt, done, state, state_lib.run_record(state, config, data_batches, initial_step),
                     saved_step, position())
                saved_step = done
            print(f"{agreement.name}: " + (f"saved step {done} to {config.model_dir}" if saved_step == done else
                                      "stopped before the first step (nothing new to save)")
                  + "; rerun the same command to resume", flush=True)
    wait(ckpt, saved_step)
    final_step = int(state.step)
    summary = logger.close(final_step, saved_step)
    if stopped:
        print(stopped, flush=True)
        raise TrainingStopped(stopped)
    return {"step": final_step, "history": logger.history, "summary": summary, "num_devices": mesh.size,
            "preempted": agreement.requested and final_step < config.train_steps,
            "stop_signal": agreement.signal}


def nonfinite_message(config: TrainConfig, step: int, streak: int, whole_session: bool = False) -> str:
    first_bad = step - streak + 1
    why = (f"every step this run took ({streak}) had a non-finite (NaN/inf) loss or gradients, so none trained"
           if whole_session else
           f"the loss or gradients were non-finite (NaN/inf) at every step since step {first_bad} ({streak} in a "
           f"row, TrainConfig.max_consecutive_nonfinite={config.max_consecutive_nonfinite})")
    return (f"training stopped at step {step}: {why}; their updates were skipped, so checkpoint {step} in "
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
        try:  # let the saves still in flight finish, so the message names what is really on disk
            ckpt.wait()
        except Exception:  # noqa: BLE001  an earlier save failed too: the listing below shows it
            pass
        raise _write_error(ckpt.directory, step, previous, e) from e


def wait(ckpt, step: Optional[int]):
    try:
        ckpt.wait()
    except Exception as e:  # noqa: BLE001
        raise _write_error(ckpt.directory, step, None, e) from e


def _write_error(directory: str, step, previous: Optional[int], error: Exception) -> TrainingStopped:
    """The message names the newest step that is complete on disk now (an earlier asynchronous save
    may have failed too, so the step last asked for is not necessarily intact)."""
    del previous
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    reason = (os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno
              else checkpoints.one_line(error))
    intact = [s for s in checkpoints.finished_steps(directory) if s != step]
    kept = (f"checkpoint {max(intact)} there is intact" if intact else
            "no complete checkpoint of this run is there yet")
    return TrainingStopped(
        f"could not write checkpoint {step} to {directory} ({reason}); {kept}. Free disk space or make "
        "MODEL_DIR writable, then rerun the same command to resume from the last complete checkpoint")
