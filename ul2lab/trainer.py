"""The training loop, top to bottom: mesh -> state (init or restore) -> data -> step -> log -> save.

`train(TrainConfig(...))` is the whole run. The config is frozen: what changes during a run
(parameters, optimizer moments, step, data position) lives in the TrainState and the checkpoint.

Exact resumption: the data pipeline is a deterministic seqio dataset (fixed seed), and the
checkpoint records how many batches were drawn from which mixture; a resumed run skips that
many batches, so it sees the same batches and reproduces the uninterrupted run's losses.

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
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ul2lab import checkpoints, flops, optimizers, partitioning, run_logging, schedules
from ul2lab import train_step as train_step_lib
from ul2lab.models import network
from ul2lab.models.config import T5Config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Run settings (gin: `TrainConfig.<field> = ...`, see gin/runs/*.gin)."""
    model_dir: str
    model: T5Config
    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]     # {"inputs": 512, "targets": 114}
    train_steps: int                            # steps of this run, counted from step 0 of MODEL_DIR
    batch_size: int                             # global examples (packed rows) per step
    learning_rate: Optional[Callable] = None    # a schedule step -> lr; default t5x's rsqrt decay
    optimizer: Optional[Callable] = None        # learning_rate -> optax transform; default Adafactor
    num_microbatches: int = 1                   # gradient accumulation: batch_size / this per pass
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: Any = "NUM_REAL_TARGET_TOKENS"
    pack: bool = True
    seed: int = 0                               # parameter init, dropout and data order
    checkpoint_period: int = 1000
    keep_checkpoints: Optional[int] = 3         # keep the last N ...
    keep_period: Optional[int] = None           # ... plus every K-th step
    async_checkpoints: bool = True
    log_period: int = 10
    initial_checkpoint_path: Optional[str] = None  # params only (import-hf output or another run)
    mesh_shape: Mapping[str, int] = dataclasses.field(  # sizes of data/fsdp/model; -1 = the rest
        default_factory=lambda: {"data": -1, "fsdp": 1, "model": 1})
    num_devices: Optional[int] = None           # use only the first N devices (default: all)
    logical_axis_rules: str = "standard"        # "standard" | "fsdp"
    peak_flops_per_device: Optional[float] = None  # for MFU; default: flops.py's table for the device
    tensorboard: bool = True
    # a step with a non-finite loss or gradient norm is skipped (metrics "skipped_updates"); this many
    # in a row stop the run with the last good state saved (None: skip them and never stop)
    max_consecutive_nonfinite: Optional[int] = 20


# exit status of a run stopped by SIGTERM after saving its step: 128 + SIGTERM, what a shell reports for
# a process ended by SIGTERM, so schedulers and launch scripts treat it as "preempted, requeue me"
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class ConfigError(ValueError):
    """The run's settings or data cannot work; raised before anything is written to MODEL_DIR."""


class TrainingStopped(RuntimeError):
    """The run stopped itself (non-finite losses, a checkpoint that cannot be written); the message
    says at which step, what was saved, and what to do."""


def train(config: TrainConfig, batches: Optional[Callable[[int], Iterator[dict]]] = None,
          on_checked: Optional[Callable[[], None]] = None) -> dict:
    """Run (or resume) training; returns {"step", "history": [logged metrics], "summary"}.

    `batches(skip)` yields host batches (dicts of numpy arrays) after skipping `skip` of them;
    by default they come from the seqio mixture `config.mixture_or_task_name`. `on_checked()` is
    called once every check has passed, before MODEL_DIR is first written (the CLI writes
    config.gin there).
    """
    mesh, rules, vocab_path = check(config, with_task=batches is None)
    if batches is None:
        batches = lambda skip: seqio_batches(config, skip)  # noqa: E731
    # the data pipeline is built before anything is written, so a task that cannot produce these
    # feature lengths fails here with MODEL_DIR untouched
    previous = checkpoints.latest_run_record(config.model_dir)
    same_data = previous is not None and previous.get("mixture_or_task_name") == config.mixture_or_task_name
    data_batches = previous.get("data_batches", 0) if same_data else 0
    try:
        data = batches(data_batches)
    except ValueError as e:
        raise ConfigError(f"the data pipeline of {config.mixture_or_task_name!r} cannot be built with "
                          f"TASK_FEATURE_LENGTHS {dict(config.task_feature_lengths)}: {e}") from e
    if on_checked is not None:
        on_checked()

    schedule = config.learning_rate or schedules.rsqrt_schedule()
    optimizer = (config.optimizer or default_optimizer)(learning_rate=schedule)
    state_shardings, abstract_state = state_layout(config.model, config.seed, optimizer, mesh, rules)
    batch_shardings = NamedSharding(mesh, partitioning.batch_partition_spec(2, rules))

    # ---- state: resume this run, or start (from INITIAL_CHECKPOINT_PATH's params, or random)
    ckpt = checkpoints.RunCheckpoints(config.model_dir, config.keep_checkpoints, config.keep_period,
                                      config.async_checkpoints)
    state, restored_run = restore_or_init(config, ckpt, optimizer, abstract_state, state_shardings)
    if restored_run is not None:  # the step restored may be older than the latest (unreadable) one
        restored_batches = (restored_run.get("data_batches", 0)
                            if restored_run.get("mixture_or_task_name") == config.mixture_or_task_name else 0)
        if restored_batches != data_batches:
            data_batches, data = restored_batches, batches(restored_batches)
    checkpoints.write_config(config.model_dir, config.model, vocab_path,
                             mixture_or_task_name=config.mixture_or_task_name,
                             task_feature_lengths=dict(config.task_feature_lengths))
    start_step = int(state.step)

    step_fn = train_step_lib.build_train_step(
        config.model, optimizer, schedule, state_shardings, batch_shardings,
        num_microbatches=config.num_microbatches, z_loss=config.z_loss, label_smoothing=config.label_smoothing,
        loss_normalizing_factor=config.loss_normalizing_factor,
        max_consecutive_nonfinite=config.max_consecutive_nonfinite)
    lengths = config.task_feature_lengths
    tokens_per_step = config.batch_size * (lengths["inputs"] + lengths["targets"])
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
                    period_sums, period_steps = None, 0
                    now = time.time()
                    if done > last_step:
                        seconds_per_step = (now - last_time) / (done - last_step)
                        metrics["tokens_per_s"] = tokens_per_step / seconds_per_step
                        metrics["mfu"] = flops.mfu(step_flops, seconds_per_step, mesh.size, peak)
                    last_time, last_step = now, done
                    logger.log(done, metrics)
                periodic = done % config.checkpoint_period == 0 or done % config.log_period == 0
                if (periodic or done == config.train_steps) and config.max_consecutive_nonfinite is not None:
                    streak = int(state.nonfinite_streak)  # synced here only, where the host waits anyway
                    if streak >= config.max_consecutive_nonfinite:
                        stopped = nonfinite_message(config, done, streak)
                if done % config.checkpoint_period == 0 or done == config.train_steps or stop.requested or stopped:
                    save(ckpt, done, state, run_record(state, config, data_batches), saved_step)
                    saved_step = done
                if stopped:
                    break
                if stop.requested:
                    print(f"SIGTERM: saved step {done} to {config.model_dir}; rerun the same command to resume",
                          flush=True)
                    break
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


def save(ckpt, step: int, state, run: dict, previous: Optional[int]):
    """Start saving `step`; a write that fails (disk full, read-only MODEL_DIR) stops the run with a
    plain error, leaving the in-memory state and the previous checkpoint as they were."""
    try:
        ckpt.save(step, state.params, state.opt_state, run)
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
              else checkpoints._one_line(error))
    kept = f"checkpoint {previous} there is intact" if previous is not None else "earlier checkpoints are untouched"
    return TrainingStopped(
        f"could not write checkpoint {step} to {directory} ({reason}); {kept}. Free disk space or make "
        "MODEL_DIR writable, then rerun the same command to resume from the last complete checkpoint")


# ---------------------------------------------------------------------------------------------
# Checks that run before any work, so bad input never costs a compile or touches MODEL_DIR.

def check(config: TrainConfig, with_task: bool = True):
    """All checks of the run's input; returns (mesh, logical axis rules, vocabulary path or None)."""
    try:
        check_config(config)
        checkpoints.check_same_model(config.model_dir, config.model)
        devices = jax.devices()[:config.num_devices] if config.num_devices else None
        mesh = partitioning.create_mesh(**dict(config.mesh_shape), devices=devices)
        rules = logical_axis_rules(config.logical_axis_rules)
        check_batch_size(config, mesh, rules)
        return mesh, rules, check_task(config) if with_task else None
    except (ConfigError, checkpoints.CheckpointError):
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_config(config: TrainConfig):
    if not config.model_dir:
        raise ValueError("MODEL_DIR is not set: bind MODEL_DIR (or TrainConfig.model_dir) to the run's directory")
    check_model_dir(config.model_dir)
    if not config.mixture_or_task_name:
        raise ValueError("no task: set MIXTURE_OR_TASK_NAME to a registered seqio task or mixture")
    if not isinstance(config.task_feature_lengths, Mapping):
        raise ValueError(f"TASK_FEATURE_LENGTHS {config.task_feature_lengths!r} is not a dict; write e.g. "
                         "{'inputs': 512, 'targets': 114}")
    for key in ("inputs", "targets"):
        if key not in config.task_feature_lengths:
            raise ValueError(f"TASK_FEATURE_LENGTHS {dict(config.task_feature_lengths)} has no {key!r} "
                             "length; write e.g. {'inputs': 512, 'targets': 114}")
        length = config.task_feature_lengths[key]
        if not _is_int(length) or length <= 0:
            raise ValueError(f"TASK_FEATURE_LENGTHS[{key!r}] is {length!r}; lengths must be positive whole "
                             "numbers of tokens, e.g. {'inputs': 512, 'targets': 114}")
    for name, value in (("TRAIN_STEPS", config.train_steps), ("BATCH_SIZE", config.batch_size),
                        ("TrainConfig.num_microbatches", config.num_microbatches),
                        ("TrainConfig.log_period", config.log_period),
                        ("TrainConfig.checkpoint_period", config.checkpoint_period)):
        if not _is_int(value):
            raise ValueError(f"{name} is {value!r} ({type(value).__name__}); it must be a whole number")
    if config.num_microbatches <= 0:
        raise ValueError(f"TrainConfig.num_microbatches ({config.num_microbatches}) must be positive")
    if config.train_steps <= 0 or config.batch_size <= 0:
        raise ValueError(f"TRAIN_STEPS ({config.train_steps}) and BATCH_SIZE ({config.batch_size}) must be positive")
    if config.batch_size % config.num_microbatches:
        raise ValueError(f"BATCH_SIZE {config.batch_size} is not divisible by TrainConfig.num_microbatches "
                         f"{config.num_microbatches}; pick a batch size that is a multiple of it")
    if config.log_period <= 0 or config.checkpoint_period <= 0:
        raise ValueError("TrainConfig.log_period and checkpoint_period must be positive")
    if config.max_consecutive_nonfinite is not None and (not _is_int(config.max_consecutive_nonfinite)
                                                         or config.max_consecutive_nonfinite <= 0):
        raise ValueError(f"TrainConfig.max_consecutive_nonfinite ({config.max_consecutive_nonfinite}) must be "
                         "positive, or None to skip non-finite steps without ever stopping")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_model_dir(model_dir: str):
    """MODEL_DIR must be a directory that exists or can be made (checked without writing anything)."""
    if "://" in model_dir:  # gs:// and other remote paths: orbax reports problems with them itself
        return
    path = os.path.abspath(model_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"MODEL_DIR {model_dir} cannot be created: {existing} is a file; choose another MODEL_DIR")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"MODEL_DIR {model_dir} is not writable ({existing} does not allow writing); "
                         "choose a writable MODEL_DIR or fix its permissions")


def logical_axis_rules(name: str):
    rules = {"standard": partitioning.standard_logical_axis_rules, "fsdp": partitioning.fsdp_logical_axis_rules}
    if name not in rules:
        raise ValueError(f"TrainConfig.logical_axis_rules {name!r} is not known; use one of {sorted(rules)}")
    return rules[name]()


def check_batch_size(config: TrainConfig, mesh, rules):
    batch_axes = partitioning.batch_partition_spec(2, rules)[0] or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    data_parallel = int(np.prod([mesh.shape[axis] for axis in batch_axes]))
    per_pass = config.batch_size // config.num_microbatches
    if per_pass % data_parallel:
        raise ValueError(
            f"BATCH_SIZE {config.batch_size} (/{config.num_microbatches} microbatches = {per_pass}) is not "
            f"divisible by the data-parallel size {data_parallel} (mesh {dict(mesh.shape)}); use a multiple "
            f"of {data_parallel * config.num_microbatches}, or change the mesh")
    if config.batch_size % jax.process_count():
        raise ValueError(f"BATCH_SIZE {config.batch_size} is not divisible by the {jax.process_count()} hosts")


def check_task(config: TrainConfig) -> Optional[str]:
    """The task's vocabulary must fit the model; returns the vocabulary's model file (for config.json)."""
    import seqio
    import ul2lab_tasks  # noqa: F401  registers the tasks and mixtures

    name = config.mixture_or_task_name
    if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
        import difflib
        known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"MIXTURE_OR_TASK_NAME {name!r} is not a registered seqio task or mixture"
                         + (f"; did you mean {' or '.join(map(repr, close))}?" if close else
                            f"; registered: {', '.join(known[:20])}"))
    mixture_or_task = seqio.get_mixture_or_task(name)
    vocabulary = mixture_or_task.output_features["targets"].vocabulary
    if vocabulary.vocab_size > config.model.vocab_size:
        raise ValueError(f"the vocabulary of {name!r} has {vocabulary.vocab_size} ids but the model's vocab_size "
                         f"is {config.model.vocab_size}; set T5Config vocab_size >= {vocabulary.vocab_size}")
    return getattr(vocabulary, "sentencepiece_model_file", None)


# ---------------------------------------------------------------------------------------------
# State: layout, restore, init.

def default_optimizer(learning_rate):
    return optimizers.make_optimizer("adafactor", learning_rate)


def state_layout(model_config: T5Config, seed: int, optimizer, mesh, rules):
    """(shardings of the TrainState, abstract TrainState with those shardings) without allocating it."""
    boxed = network.abstract_params(model_config)
    params_shardings = partitioning.params_shardings(boxed, mesh, rules)
    abstract = jax.eval_shape(lambda: train_step_lib.init_state(model_config, optimizer, seed))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = train_step_lib.TrainState(
        step=replicated, params=params_shardings,
        opt_state=opt_state_shardings(abstract.opt_state, abstract.params, params_shardings, replicated),
        rng=replicated, nonfinite_streak=replicated)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return shardings, abstract


def opt_state_shardings(opt_state, params, params_shardings, replicated):
    """Optimizer leaves shaped like their parameter (Adam moments, unfactored Adafactor) share its
    sharding; other leaves (factored Adafactor rows/columns, counts) are small and replicated."""
    by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        by_path[tuple(path)] = leaf.shape
    shardings_by_path = {tuple(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]}

    def sharding_of(path, leaf):
        for start in range(len(path)):  # the params path is a suffix of the optimizer leaf's path
            suffix = tuple(path[start:])
            if suffix in by_path:
                return shardings_by_path[suffix] if by_path[suffix] == leaf.shape else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


def restore_or_init(config: TrainConfig, ckpt, optimizer, abstract_state, state_shardings):
    """(state, run record of the restored step or None): the newest readable step, else a new state."""
    restored = ckpt.restore_latest_good(abstract_state.params, abstract_state.opt_state)
    if restored is not None:
        step, params, opt_state, run = restored
        state = train_step_lib.TrainState(
            step=jnp.asarray(run["step"], jnp.int32), params=params, opt_state=opt_state,
            rng=jax.device_put(np.asarray(run["rng"], np.uint32), state_shardings.rng),
            nonfinite_streak=jax.device_put(np.zeros((), np.int32), state_shardings.nonfinite_streak))
        print(f"resuming {config.model_dir} at step {step}", flush=True)
        return state, run
    init = jax.jit(lambda params: train_step_lib.init_state(config.model, optimizer, config.seed, params),
                   out_shardings=state_shardings)
    if config.initial_checkpoint_path:
        params, from_step = checkpoints.restore_params(config.initial_checkpoint_path, abstract_state.params)
        print(f"starting from the parameters of {config.initial_checkpoint_path} (step {from_step})", flush=True)
        return init(params), None
    return new_state_fn(config.model, config.seed, optimizer, state_shardings)(), None


def new_state_fn(model_config: T5Config, seed: int, optimizer, state_shardings):
    """Jitted () -> a fresh TrainState (random params from `seed`), laid out by state_shardings."""
    return jax.jit(lambda: train_step_lib.init_state(model_config, optimizer, seed),
                   out_shardings=state_shardings)


def run_record(state, config: TrainConfig, data_batches: int) -> dict:
    return {"step": int(state.step), "rng": np.asarray(jax.device_get(state.rng)).tolist(),
            "mixture_or_task_name": config.mixture_or_task_name, "data_batches": data_batches,
            "batch_size": config.batch_size}


# ---------------------------------------------------------------------------------------------
# Data: seqio mixture -> packed examples -> host batches (numpy).

def seqio_batches(config: TrainConfig, skip: int) -> Iterator[dict]:
    """Deterministic host batches of `config.mixture_or_task_name`, the first `skip` left out."""
    import seqio
    import tensorflow as tf

    dataset = seqio.get_dataset(
        config.mixture_or_task_name, dict(config.task_feature_lengths),
        feature_converter=seqio.EncDecFeatureConverter(pack=config.pack),
        dataset_split="train", shuffle=True, num_epochs=None, seed=config.seed, use_cached=False,
        shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()), verbose=False)
    dataset = dataset.batch(config.batch_size // jax.process_count(), drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    dataset = dataset.with_options(options).skip(skip).prefetch(2)
    return dataset.as_numpy_iterator()


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
