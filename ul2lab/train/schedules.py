"""Learning-rate schedules: step -> learning rate, traceable under jit (optax `Schedule`s).

    constant_schedule   a fixed value
    rsqrt_schedule      t5x's default `constant * rsqrt_decay`: base / sqrt(max(step, warmup_steps))
    cosine_schedule     linear warmup, cosine decay to end_value at total_steps
    wsd_schedule        warmup-stable-decay: linear warmup, constant, short decay at the end
    infinite_schedule   warmup, cooldown to a constant, constant for as long as you like, and an
                        exponential anneal that can be branched off any constant-phase checkpoint

Continual pretraining with the infinite schedule
------------------------------------------------
The schedule is a pure function of the optimizer step, so what a run sees depends on where its
step counter starts:

* Resuming a run, or starting one from INITIAL_CHECKPOINT_PATH (the step continues from that
  checkpoint's, as in t5x): an infinite-schedule run's step is already past `warmup_steps +
  cooldown_steps`, so the learning rate is the constant with no re-warming. Nothing to do.
* `start_step` shifts the schedule: it is evaluated at `step + start_step`. A run started from
  INITIAL_CHECKPOINT_PATH continues that checkpoint's step S (as t5x does), so continuing an
  infinite-schedule run needs nothing, and `start_step=-S` re-warms (the new run's first step is the
  schedule's step 0). Left unset (None), `ul2lab train` decides when the run starts
  (ul2lab.runs.train.resolve_schedule): continue when the checkpoint was trained with the infinite
  schedule, else re-warm, as continual-pretraining work does after another schedule; the choice is
  recorded in MODEL_DIR/config.gin.
* `ul2lab anneal` from a constant-phase checkpoint at step s: check `schedule.in_constant_phase(s)`,
  then train the branch with `schedule.branch_anneal(s)` (the same schedule with anneal_start=s),
  so the branch decays from the constant starting at the checkpoint's own step.
"""
import dataclasses
import math
from typing import Optional

import jax.numpy as jnp
import optax

COOLDOWNS = ("cosine", "inverse_sqrt")
WSD_DECAYS = ("linear", "cosine", "sqrt")


def _check_positive(name: str, value, allow_zero: bool = False):
    if value is None or (value < 0 if allow_zero else value <= 0):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"learning-rate schedule: {name} must be {kind}, got {value!r}")


def _check_steps(name: str, value, allow_zero: bool = True):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"learning-rate schedule: {name} must be a whole number of steps, got {value!r}")
    _check_positive(name, value, allow_zero=allow_zero)


def constant_schedule(value: float) -> optax.Schedule:
    _check_positive("value", value)
    return optax.constant_schedule(value)


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> optax.Schedule:
    """t5x's default `constant * rsqrt_decay`: flat at base/sqrt(warmup_steps), then 1/sqrt(step).

    (t5x's "warmup" here is a plateau, not a ramp: with base 1.0 and 10k steps the rate is 0.01
    for the first 10k steps.)
    """
    _check_positive("base_learning_rate", base_learning_rate)
    _check_steps("warmup_steps", warmup_steps, allow_zero=False)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return base_learning_rate / jnp.sqrt(jnp.maximum(step, float(warmup_steps)))
    return schedule


def cosine_schedule(peak_value: float, warmup_steps: int, total_steps: int,
                    end_value: float = 0.0, init_value: float = 0.0, start_step: int = 0) -> optax.Schedule:
    """Linear warmup init_value -> peak_value, then cosine decay to end_value at total_steps.

    start_step shifts the step counter, as the infinite schedule's does: a run from a checkpoint at
    step S continues that step (as in t5x), and start_step = -S warms up again from its first step."""
    _check_positive("peak_value", peak_value)
    _check_positive("end_value", end_value, allow_zero=True)
    _check_steps("warmup_steps", warmup_steps)
    _check_steps("total_steps", total_steps, allow_zero=False)
    if total_steps <= warmup_steps:
        raise ValueError(f"cosine schedule: total_steps ({total_steps}) must exceed warmup_steps "
                         f"({warmup_steps}); raise TRAIN_STEPS or shorten the warmup")
    schedule = optax.warmup_cosine_decay_schedule(init_value, peak_value, warmup_steps,
                                                  decay_steps=total_steps, end_value=end_value)
    if isinstance(start_step, bool) or not isinstance(start_step, int):
        raise ValueError(f"cosine schedule: start_step must be a whole number, got {start_step!r}")
    return schedule if not start_step else (lambda step: schedule(step + start_step))


def wsd_schedule(peak_value: float, warmup_steps: int, total_steps: int, decay_steps: int,
                 end_value: float = 0.0, decay: str = "sqrt") -> optax.Schedule:
    """Warmup-stable-decay: 0 -> peak linearly, hold the peak, decay over the last decay_steps.

    decay: "linear", "cosine", or "sqrt" (1 - sqrt(x), the usual WSD cooldown).
    """
    _check_positive("peak_value", peak_value)
    _check_positive("end_value", end_value, allow_zero=True)
    _check_steps("warmup_steps", warmup_steps)
    _check_steps("total_steps", total_steps, allow_zero=False)
    _check_steps("decay_steps", decay_steps, allow_zero=False)
    if decay not in WSD_DECAYS:
        raise ValueError(f"wsd schedule: decay must be one of {WSD_DECAYS}, got {decay!r}")
    stable_end = total_steps - decay_steps
    if stable_end < warmup_steps:
        raise ValueError(f"wsd schedule: warmup_steps ({warmup_steps}) + decay_steps ({decay_steps}) "
                         f"exceed total_steps ({total_steps}); shorten one of them or raise TRAIN_STEPS")

    def decay_fn(step):
        x = jnp.clip(jnp.asarray(step, jnp.float32) / decay_steps, 0.0, 1.0)
        shape = {"linear": lambda: 1.0 - x, "cosine": lambda: 0.5 * (1.0 + jnp.cos(jnp.pi * x)),
                 "sqrt": lambda: 1.0 - jnp.sqrt(x)}[decay]()
        return end_value + (peak_value - end_value) * shape

    pieces, boundaries = [optax.constant_schedule(peak_value), decay_fn], [stable_end]
    if warmup_steps:
        pieces.insert(0, optax.linear_schedule(0.0, peak_value, warmup_steps))
        boundaries.insert(0, warmup_steps)
    return optax.join_schedules(pieces, boundaries)


@dataclasses.dataclass(frozen=True)
class InfiniteSchedule:
    """The infinite schedule (build it with `infinite_schedule`); call it with a step.

    Phases, with W = warmup_steps, C = cooldown_steps, A = anneal_start, S = anneal_steps:
      [0, W)        warmup    0 -> peak_value linearly
      [W, W+C)      cooldown  peak_value -> constant_value (cosine, or inverse-sqrt scaled to land)
      [W+C, A)      constant  constant_value (forever when anneal_start is None)
      [A, A+S)      anneal    constant * (end / constant) ** ((t - A) / S); end 0: linearly to 0
      [A+S, ...)    end       end_value
    """
    peak_value: float
    warmup_steps: int
    cooldown_steps: int
    constant_value: float
    anneal_start: Optional[int] = None
    anneal_steps: Optional[int] = None
    end_value: Optional[float] = None
    cooldown: str = "cosine"
    start_step: Optional[int] = None  # None: not chosen yet (see the module docstring); acts as 0

    def __post_init__(self):
        _check_positive("peak_value", self.peak_value)
        _check_positive("constant_value", self.constant_value)
        _check_steps("warmup_steps", self.warmup_steps)
        _check_steps("cooldown_steps", self.cooldown_steps)
        if self.start_step is not None and (not isinstance(self.start_step, int)
                                            or isinstance(self.start_step, bool)):  # negative: re-warm
            raise ValueError(f"learning-rate schedule: start_step must be a whole number, got {self.start_step!r}")
        if self.cooldown not in COOLDOWNS:
            raise ValueError(f"infinite schedule: cooldown must be one of {COOLDOWNS}, got {self.cooldown!r}")
        if self.constant_value > self.peak_value:
            raise ValueError(f"infinite schedule: constant_value ({self.constant_value}) is above "
                             f"peak_value ({self.peak_value}); the cooldown goes down to the constant")
        if self.anneal_start is None:
            if self.anneal_steps is not None or self.end_value is not None:
                raise ValueError("infinite schedule: anneal_steps/end_value given without anneal_start; "
                                 "set anneal_start (the step the anneal begins) or drop them")
            return
        _check_steps("anneal_start", self.anneal_start)
        _check_steps("anneal_steps", self.anneal_steps, allow_zero=False)
        _check_positive("end_value", self.end_value, allow_zero=True)
        if self.anneal_start < self.constant_start:
            raise ValueError(f"infinite schedule: anneal_start ({self.anneal_start}) is before the end of "
                             f"warmup + cooldown ({self.constant_start}); anneal from the constant phase")
        if self.end_value > self.constant_value:
            raise ValueError(f"infinite schedule: end_value ({self.end_value}) is above constant_value "
                             f"({self.constant_value}); the anneal goes down to end_value")

    @property
    def offset(self) -> int:
        """Steps done before this run's step 0 (start_step; unset counts as 0)."""
        return self.start_step or 0

    @property
    def constant_start(self) -> int:
        return self.warmup_steps + self.cooldown_steps

    def phase(self, step: int) -> str:
        """'warmup', 'cooldown', 'constant', 'anneal' or 'end' for a (python int) step of this run."""
        t = int(step) + self.offset
        if t < self.warmup_steps:
            return "warmup"
        if t < self.constant_start:
            return "cooldown"
        if self.anneal_start is None or t < self.anneal_start:
            return "constant"
        return "anneal" if t < self.anneal_start + self.anneal_steps else "end"

    def in_constant_phase(self, step: int) -> bool:
        return self.phase(step) == "constant"

    def branch_anneal(self, step: int, anneal_steps: Optional[int] = None,
                      end_value: Optional[float] = None) -> "InfiniteSchedule":
        """This schedule with its anneal starting at `step` (a constant-phase checkpoint's step)."""
        if not self.in_constant_phase(step):
            raise ValueError(f"cannot branch an anneal at step {step}: the schedule is in its "
                             f"{self.phase(step)!r} phase there; pick a checkpoint from the constant phase "
                             f"(steps from {self.constant_start - self.offset} on)")
        anneal_steps = anneal_steps if anneal_steps is not None else self.anneal_steps
        end_value = end_value if end_value is not None else self.end_value
        if anneal_steps is None or end_value is None:
            raise ValueError("branch_anneal needs anneal_steps and end_value (the schedule has none)")
        return dataclasses.replace(self, anneal_start=int(step) + self.offset,
                                   anneal_steps=anneal_steps, end_value=end_value)

    def _cooldown_fn(self):
        peak, const, steps = self.peak_value, self.constant_value, self.cooldown_steps
        if self.cooldown == "cosine":
            return optax.cosine_decay_schedule(peak, steps, alpha=const / peak)
        h1 = 1.0 / math.sqrt(11.0) - 1.0  # h(1): scales h so the cooldown lands on the constant

        def inverse_sqrt(step):
            x = jnp.asarray(step, jnp.float32) / steps
            return peak + (const - peak) * (1.0 / jnp.sqrt(1.0 + 10.0 * x) - 1.0) / h1
        return inverse_sqrt

    def __call__(self, step):
        # (first step of the phase, schedule of the steps since that first step)
        phases = []
        if self.warmup_steps:
            phases.append((0, optax.linear_schedule(0.0, self.peak_value, self.warmup_steps)))
        if self.cooldown_steps:
            phases.append((self.warmup_steps, self._cooldown_fn()))
        phases.append((self.constant_start, optax.constant_schedule(self.constant_value)))
        if self.anneal_start is not None:
            if self.end_value:
                ratio = self.end_value / self.constant_value
                phases.append((self.anneal_start, lambda s: self.constant_value * jnp.power(
                    ratio, jnp.asarray(s, jnp.float32) / self.anneal_steps)))
            else:  # an exponential never reaches 0 (it would drop to 0 after one step): linear to 0
                phases.append((self.anneal_start, optax.linear_schedule(self.constant_value, 0.0, self.anneal_steps)))
            phases.append((self.anneal_start + self.anneal_steps, optax.constant_schedule(self.end_value)))
        schedule = optax.join_schedules([fn for _, fn in phases], [start for start, _ in phases[1:]])
        return jnp.asarray(schedule(jnp.asarray(step) + self.offset), jnp.float32)


def infinite_schedule(peak_value: float, warmup_steps: int, cooldown_steps: int, constant_value: float,
                      anneal_start: Optional[int] = None, anneal_steps: Optional[int] = None,
                      end_value: Optional[float] = None, cooldown: str = "cosine",
                      start_step: Optional[int] = None) -> InfiniteSchedule:
    """The infinite schedule (see `InfiniteSchedule` for its phases and the module docstring for
    continual pretraining). anneal_start=None keeps the constant forever (the main run); the
    anneal is then branched off a checkpoint with `.branch_anneal(step, anneal_steps, end_value)`.
    start_step shifts the step counter: -S re-warms parameters whose checkpoint is at step S; None
    lets `ul2lab train` choose (re-warm unless INITIAL_CHECKPOINT_PATH's run used this schedule).
    """
    return InfiniteSchedule(peak_value, warmup_steps, cooldown_steps, constant_value, anneal_start,
                            anneal_steps, end_value, cooldown, start_step)
