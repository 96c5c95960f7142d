"""The training loop, top to bottom: mesh -> state (init or restore) -> data -> step -> log -> save.

`train(TrainConfig(...))` is the whole run. The config is frozen: what changes during a run
(parameters, optimizer moments, step, data position) lives in the TrainState and the checkpoint.

Exact resumption: the data pipeline is a deterministic seqio dataset (fixed seed), and the
checkpoint records how many batches were drawn from which mixture; a resumed run skips that
many batches, so it sees the same batches and reproduces the uninterrupted run's losses.
"""
import dataclasses
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


class ConfigError(ValueError):
    """The run's settings or data cannot work; raised before anything is written to MODEL_DIR."""


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
    state_shardings, abstract_state = state_layout(config, optimizer, mesh, rules)
    batch_shardings = NamedSharding(mesh, partitioning.batch_partition_spec(2, rules))

    # ---- state: resume this run, or start (from INITIAL_CHECKPOINT_PATH's params, or random)
    ckpt = checkpoints.RunCheckpoints(config.model_dir, config.keep_checkpoints, config.keep_period,
                                      config.async_checkpoints)
    state = restore_or_init(config, ckpt, optimizer, abstract_state, state_shardings)
    checkpoints.write_config(config.model_dir, config.model, vocab_path,
                             mixture_or_task_name=config.mixture_or_task_name,
                             task_feature_lengths=dict(config.task_feature_lengths))
    start_step = int(state.step)

    step_fn = train_step_lib.jit_train_step(
        train_step_lib.make_train_step(
            network.Transformer(config.model), optimizer, schedule,
            num_microbatches=config.num_microbatches, z_loss=config.z_loss,
            label_smoothing=config.label_smoothing,
            loss_normalizing_factor=config.loss_normalizing_factor),
        state_shardings, batch_shardings)
    lengths = config.task_feature_lengths
    tokens_per_step = config.batch_size * (lengths["inputs"] + lengths["targets"])
    step_flops = flops.train_flops_per_step(config.model, config.batch_size, lengths["inputs"],
                                            lengths["targets"])
    peak = flops.peak_flops_per_device(override=config.peak_flops_per_device)

    logger = run_logging.RunLogger(config.model_dir, config.train_steps, start_step, config.tensorboard)
    stop = _StopOnSigterm()
    saved_step = ckpt.latest_step()
    last_time, last_step = None, start_step
    period_sums, period_steps = None, 0  # metrics are averaged over each log period, as t5x does
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
                metrics = {k: float(v) / period_steps for k, v in jax.device_get(period_sums).items()}
                metrics["learning_rate"] = learning_rate
                period_sums, period_steps = None, 0
                now = time.time()
                if done > last_step:
                    seconds_per_step = (now - last_time) / (done - last_step)
                    metrics["tokens_per_s"] = tokens_per_step / seconds_per_step
                    metrics["mfu"] = flops.mfu(step_flops, seconds_per_step, mesh.size, peak)
                last_time, last_step = now, done
                logger.log(done, metrics)
            if done % config.checkpoint_period == 0 or done == config.train_steps or stop.requested:
                ckpt.save(done, state.params, state.opt_state, run_record(state, config, data_batches))
                saved_step = done
            if stop.requested:
                print(f"SIGTERM: saved step {done} to {config.model_dir}; rerun the same command to resume",
                      flush=True)
                break
    ckpt.wait()
    ckpt.close()
    stop.restore()
    final_step = int(state.step)
    summary = logger.close(final_step, saved_step)
    return {"step": final_step, "history": logger.history, "summary": summary, "num_devices": mesh.size}


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
    if not config.mixture_or_task_name:
        raise ValueError("no task: set MIXTURE_OR_TASK_NAME to a registered seqio task or mixture")
    for key in ("inputs", "targets"):
        if key not in config.task_feature_lengths:
            raise ValueError(f"TASK_FEATURE_LENGTHS {dict(config.task_feature_lengths)} has no {key!r} "
                             "length; write e.g. {'inputs': 512, 'targets': 114}")
    if config.train_steps <= 0 or config.batch_size <= 0:
        raise ValueError(f"TRAIN_STEPS ({config.train_steps}) and BATCH_SIZE ({config.batch_size}) must be positive")
    if config.batch_size % config.num_microbatches:
        raise ValueError(f"BATCH_SIZE {config.batch_size} is not divisible by TrainConfig.num_microbatches "
                         f"{config.num_microbatches}; pick a batch size that is a multiple of it")
    if config.log_period <= 0 or config.checkpoint_period <= 0:
        raise ValueError("TrainConfig.log_period and checkpoint_period must be positive")


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
    # build every lazily-trained vocabulary now: seqio compares the tasks' vocabularies when the
    # mixture's dataset is made, and one built and one not yet built would compare unequal
    for task in getattr(mixture_or_task, "tasks", [mixture_or_task]):
        for feature in task.output_features.values():
            _ = feature.vocabulary.vocab_size
    vocabulary = mixture_or_task.output_features["targets"].vocabulary
    if vocabulary.vocab_size > config.model.vocab_size:
        raise ValueError(f"the vocabulary of {name!r} has {vocabulary.vocab_size} ids but the model's vocab_size "
                         f"is {config.model.vocab_size}; set T5Config vocab_size >= {vocabulary.vocab_size}")
    return getattr(vocabulary, "sentencepiece_model_file", None)


# ---------------------------------------------------------------------------------------------
# State: layout, restore, init.

def default_optimizer(learning_rate):
    return optimizers.make_optimizer("adafactor", learning_rate)


def state_layout(config: TrainConfig, optimizer, mesh, rules):
    """(shardings of the TrainState, abstract TrainState with those shardings) without allocating it."""
    boxed = network.abstract_params(config.model)
    params_shardings = partitioning.params_shardings(boxed, mesh, rules)
    abstract = jax.eval_shape(lambda: train_step_lib.init_state(config.model, optimizer, config.seed))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = train_step_lib.TrainState(
        step=replicated, params=params_shardings,
        opt_state=opt_state_shardings(abstract.opt_state, abstract.params, params_shardings, replicated),
        rng=replicated)
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
    step = ckpt.latest_step()
    if step is not None:
        params, opt_state, run = ckpt.restore(step, abstract_state.params, abstract_state.opt_state)
        state = train_step_lib.TrainState(
            step=jnp.asarray(run["step"], jnp.int32), params=params, opt_state=opt_state,
            rng=jax.device_put(np.asarray(run["rng"], np.uint32), state_shardings.rng))
        print(f"resuming {config.model_dir} at step {step}", flush=True)
        return state
    init = jax.jit(lambda params: train_step_lib.init_state(config.model, optimizer, config.seed, params),
                   out_shardings=state_shardings)
    if config.initial_checkpoint_path:
        params, from_step = checkpoints.restore_params(config.initial_checkpoint_path, abstract_state.params)
        print(f"starting from the parameters of {config.initial_checkpoint_path} (step {from_step})", flush=True)
        return init(params)
    return jax.jit(lambda: train_step_lib.init_state(config.model, optimizer, config.seed),
                   out_shardings=state_shardings)()


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
