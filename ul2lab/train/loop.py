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

Each step is followed by the hooks of ul2lab.train.hooks (stop agreement, logging, non-finite
check, checkpoint, evaluation), each on the cadence `itstime(step, period, last)`.

Reliability: SIGTERM (preemption) or Ctrl-C saves the current step, also while the loop waits for
data, and `train` returns with result["preempted"] (the CLI then exits PREEMPTED_EXIT_CODE, for the
scheduler to requeue). On several hosts a signal on any one of them stops all of them at the same
step, with the same exit code (ul2lab.train.distributed.StopAgreement), and a host that dies makes
the others stop with one line instead of hanging. An unreadable latest checkpoint is reported and
the previous one used; a step with a non-finite loss or gradient is skipped, and
`max_consecutive_nonfinite` of them in a row stop the run with the last good state saved; a
checkpoint that cannot be written stops the run, at the next step at the latest, naming that step,
with its partial folder removed and the previous checkpoint intact.
"""
import dataclasses
import os
from typing import Callable, Iterator, Optional

import jax

from ul2lab.train import checkpoints, data_position, distributed, hooks, interrupts, partitioning, schedules
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
                                          config.async_checkpoints, config.allow_missing_checksums)
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
    """The step loop: draw a batch (interruptibly), step, then the hooks (ul2lab.train.hooks); then the summary."""
    start_step = int(state.step)
    # the step the run started at (INITIAL_CHECKPOINT_PATH's, else 0) fixes TRAIN_STEPS_RELATIVE's end
    initial_step = restored_run.get("initial_step", 0) if restored_run is not None else start_step
    config = dataclasses.replace(config, train_steps=end_step(config, initial_step))
    last = config.train_steps
    agreement = distributed.StopAgreement(stop, mesh)  # every host stops at the same step
    # a host alone may stop while it waits for data; on several hosts each one waits for its batch
    # (the others are waiting for it in the step's collectives) and the stop is agreed after the step
    interruptible = stop if agreement.hosts == 1 else None
    log = hooks.MetricsLog(config, mesh, start_step)
    saver = hooks.Saver(ckpt, config, initial_step, data, feed)
    evaluate = hooks.Evaluation(PeriodicEval(evaluation, config, mesh, rules, state_shardings.params)
                                if evaluation is not None and config.eval_period else None, log)
    stopped, done = None, start_step
    if start_step < last:
        print(f"step {start_step + 1}: waiting for the first batch and compiling the train step (the first step "
              "takes longest; progress is logged every TrainConfig.log_period steps)", flush=True)
    with partitioning.axis_rules(mesh, rules):  # whatever stops the loop, pending saves finish
        for step in range(start_step, last):
            try:
                host_batch = feed.get(interruptible)
            except StopIteration:
                stopped = (f"the data of {config.mixture_or_task_name!r} ran out after {data_batches} batches, at "
                           f"step {done} of {last}")
                if done > start_step and done != saver.saved_step:
                    saver.save(done, state, data_batches)
                    stopped += f"; step {done} is saved in {config.model_dir}"
                stopped += ". Give the task more data (or more epochs), or lower TRAIN_STEPS"
                break
            if host_batch is None:  # a stop was requested while waiting for data
                break
            state, metrics = step_fn(state, partitioning.host_batch_to_global(host_batch, mesh, rules))
            data_batches += 1
            done = step + 1
            agreement.at_boundary()
            saver.check()  # a save that failed meanwhile stops the run here, not a save later
            log.after_step(done, state, metrics, force=agreement.requested)
            stopped = hooks.nonfinite_stop(config, state, done, start_step)
            if hooks.itstime(done, config.checkpoint_period, last) or agreement.requested or stopped:
                saver.save(done, state, data_batches)
            if stopped or agreement.requested:
                break
            evaluate.after_step(done, state)
        if agreement.hosts == 1:
            agreement.at_boundary()  # a request that came while waiting for data
        if agreement.requested and not stopped:
            if done > start_step and done != saver.saved_step:  # asked to stop while waiting for data
                saver.save(done, state, data_batches)
            print(f"{agreement.name}: " + (f"saved step {done} to {config.model_dir}" if saver.saved_step == done
                                           else "stopped before the first step (nothing new to save)")
                  + "; rerun the same command to resume", flush=True)
    saver.wait()
    final_step = int(state.step)
    summary = log.logger.close(final_step, saver.saved_step)
    if stopped:
        print(stopped, flush=True)
        raise TrainingStopped(stopped)
    return {"step": final_step, "history": log.logger.history, "summary": summary, "num_devices": mesh.size,
            "preempted": agreement.requested and final_step < last, "stop_signal": agreement.signal}
