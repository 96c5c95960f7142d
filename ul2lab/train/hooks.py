"""What the training loop does around each step, one hook per concern, with one cadence predicate.

ul2lab.train.loop draws a batch and steps; after each step it calls, in this order: the stop
agreement (ul2lab.train.distributed), the asynchronous-save check, `MetricsLog` (periodic means,
timing, MFU), `nonfinite_stop` (max_consecutive_nonfinite), `Saver` (the checkpoint) and `Evaluation`.
Every "every N steps" is `itstime(step, N, last)`: the N-th steps and the last one, as t5x's periods
and big_vision's `itstime`.
"""
import os
import re
import time
from typing import Optional

import jax
import jax.numpy as jnp

from ul2lab.train import checkpoints, data_position, flops, run_logging
from ul2lab.train import state as state_lib
from ul2lab.train.config import TrainConfig, TrainingStopped


def itstime(step: int, every: Optional[int], last: int) -> bool:
    """True at every `every`-th step (none when `every` is 0 or None) and at `last`, the run's end."""
    return step == last or bool(every) and step % every == 0


class MetricsLog:
    """The logging hook: metrics are averaged over each log period (t5x's habit; skipped_updates is a
    count), with the learning rate of the period's last step, tokens/s, MFU and t5x's timing scalars;
    time from the end of the first step (it compiles), evaluation time left out."""

    def __init__(self, config: TrainConfig, mesh, start_step: int):
        lengths = config.task_feature_lengths
        self.config, self.devices = config, mesh.size
        self.tokens_per_step = config.batch_size * (lengths["inputs"] + lengths["targets"])
        self.target_slots = config.batch_size * lengths["targets"]
        self.step_flops = flops.train_flops_per_step(config.model, config.batch_size, lengths["inputs"],
                                                     lengths["targets"])
        self.peak = flops.peak_flops_per_device(override=config.peak_flops_per_device)
        self.logger = run_logging.RunLogger(config.model_dir, config.train_steps, start_step, config.tensorboard)
        self.last_time, self.last_step = None, start_step
        self.period_sums, self.period_steps = None, 0

    def after_step(self, done: int, state, metrics: dict, force: bool = False):
        sums = self.period_sums
        self.period_sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
        self.period_steps += 1
        if self.last_time is None:  # the first step compiles: time from its end on
            jax.block_until_ready(state.step)
            self.last_time, self.last_step = time.time(), done
        if itstime(done, self.config.log_period, self.config.train_steps) or force:
            self._write(done, float(metrics["learning_rate"]))  # this step's, not the period's mean

    def _write(self, done: int, learning_rate: float):
        metrics = {k: float(v) / (1 if k == "skipped_updates" else self.period_steps)
                   for k, v in jax.device_get(self.period_sums).items()}
        metrics["learning_rate"] = learning_rate
        # t5x's names: the loss without z-loss, the share of target slots holding a token
        metrics["cross_ent_loss"] = metrics["loss"] - metrics["z_loss"]
        metrics["nonpadding_fraction"] = metrics["target_tokens"] / self.target_slots
        self.period_sums, self.period_steps = None, 0
        now = time.time()
        if done > self.last_step:
            seconds_per_step = (now - self.last_time) / (done - self.last_step)
            metrics["tokens_per_s"] = self.tokens_per_step / seconds_per_step
            metrics["mfu"] = flops.mfu(self.step_flops, seconds_per_step, self.devices, self.peak)
            # t5x's timing scalars, under t5x's names (target tokens: the whole targets array)
            metrics["timing/steps_per_second"] = 1.0 / seconds_per_step
            metrics["timing/seqs_per_second"] = self.config.batch_size / seconds_per_step
            metrics["timing/target_tokens_per_second"] = self.target_slots / seconds_per_step
        self.last_time, self.last_step = now, done
        self.logger.log(done, metrics)

    def exclude(self, seconds: float):
        """Time that was not training (evaluation): not counted in tokens/s and MFU."""
        self.last_time += seconds


def nonfinite_stop(config: TrainConfig, state, done: int, start_step: int) -> Optional[str]:
    """The non-finite hook: the message that stops the run when max_consecutive_nonfinite steps in a
    row were skipped, or when not one step of this session trained; checked where the host syncs
    anyway (a log or checkpoint step)."""
    if config.max_consecutive_nonfinite is None:
        return None
    last = config.train_steps
    if not (itstime(done, config.checkpoint_period, last) or itstime(done, config.log_period, last)):
        return None
    streak = int(state.nonfinite_streak)
    if streak >= config.max_consecutive_nonfinite:
        return nonfinite_message(config, done, streak)
    if done == last and streak and streak >= done - start_step:
        # fewer steps than the limit, but not one of them trained: that is no success
        return nonfinite_message(config, done, streak, whole_session=True)
    return None


def nonfinite_message(config: TrainConfig, step: int, streak: int, whole_session: bool = False) -> str:
    first_bad = step - streak + 1
    why = (f"every step this run took ({streak}) had a non-finite (NaN/inf) loss or gradients, so none trained"
           if whole_session else
           f"the loss or gradients were non-finite (NaN/inf) at every step since step {first_bad} ({streak} in a "
           f"row, TrainConfig.max_consecutive_nonfinite={config.max_consecutive_nonfinite})")
    return (f"training stopped at step {step}: {why}; their updates were skipped, so checkpoint {step} in "
            f"{config.model_dir} holds the last good state, that of step {first_bad - 1}. Look at the data "
            "near that step, lower the learning rate, or rerun the same command to continue past it")


class Saver:
    """The checkpoint hook: saves a step with its run record and this host's data position (taken only
    while the data feed is not drawing); a failed write, this save's or an asynchronous one's, stops
    the run naming that step."""

    def __init__(self, ckpt, config: TrainConfig, initial_step: int, data, feed):
        self.ckpt, self.config, self.initial_step = ckpt, config, initial_step
        self.data, self.feed = data, feed
        self.saved_step = ckpt.latest_step()

    def save(self, done: int, state, data_batches: int):
        position = None if self.feed.busy else host_position(self.data)
        run = state_lib.run_record(state, self.config, data_batches, self.initial_step)
        try:
            self.ckpt.save(done, state.params, state.opt_state, run, data_position=position)
        except checkpoints.SaveFailed as e:
            try:  # let the saves still in flight finish, so the message names what is really on disk
                self.ckpt.wait()
            except checkpoints.SaveFailed:  # the listing in the message shows it
                pass
            raise write_error(self.ckpt.directory, e) from e
        self.saved_step = done

    def check(self):
        """After each step: an asynchronous save that failed meanwhile stops the run here."""
        try:
            self.ckpt.check_saves()
        except checkpoints.SaveFailed as e:
            raise write_error(self.ckpt.directory, e) from e

    def wait(self):
        try:
            self.ckpt.wait()
        except checkpoints.SaveFailed as e:
            raise write_error(self.ckpt.directory, e) from e


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


def write_error(directory: str, failed: "checkpoints.SaveFailed") -> TrainingStopped:
    """One line: the step whose save failed, why (the OS's words when there are some), and the newest
    step that is complete on disk now (an earlier asynchronous save may have failed too)."""
    error = failed.__cause__ or failed
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno:
        reason = os.strerror(cause.errno)
    else:  # tensorstore's write errors carry the OS's code in their text
        code = re.search(r"os_error_code='(\d+)'", str(error))
        reason = os.strerror(int(code.group(1))) if code else checkpoints.one_line(error)
    intact = [s for s in checkpoints.finished_steps(directory) if s != failed.step]
    kept = (f"checkpoint {max(intact)} there is intact" if intact else
            "no complete checkpoint of this run is there yet")
    return TrainingStopped(
        f"could not write checkpoint {failed.step} to {directory} ({reason}); {kept}. Free disk space or make "
        "MODEL_DIR writable, then rerun the same command to resume from the last complete checkpoint")


class Evaluation:
    """The evaluation hook: every eval_period steps and at the last, what the runs floor injected
    (ul2lab.train.evaluation), logged; its time is not training time."""

    def __init__(self, evaluator, log: MetricsLog):
        self.evaluator, self.log = evaluator, log

    def after_step(self, done: int, state):
        if self.evaluator is None or not self.evaluator.due(done, self.log.config.train_steps):
            return
        self.log.logger.announce_eval(done, self.evaluator.describe())
        started = time.time()
        results = self.evaluator.run(done, state.params)
        seconds = time.time() - started
        self.log.logger.log_eval(done, results, seconds)
        self.log.exclude(seconds)
