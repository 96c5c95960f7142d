"""A training run's settings (TrainConfig) and every check made before any work.

The config is frozen: what changes during a run (parameters, optimizer moments, step, data
position) lives in the TrainState and the checkpoint. `check` runs before anything is compiled
or written, so bad input never costs a compile or touches MODEL_DIR.
"""
import dataclasses
import os
import signal
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from ul2lab.errors import UserError
from ul2lab.models.config import T5Config
from ul2lab.train import checkpoints, partitioning


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Run settings (gin: `TrainConfig.<field> = ...`, see gin/runs/*.gin)."""
    model_dir: str
    model: T5Config
    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]     # {"inputs": 512, "targets": 114}
    train_steps: int                            # the step to stop at (t5x: absolute, counted from step 0)
    batch_size: int                             # global examples (packed rows) per step
    learning_rate: Optional[Callable] = None    # a schedule step -> lr; default t5x's rsqrt decay
    optimizer: Optional[Callable] = None        # learning_rate -> optax transform; default Adafactor
    num_microbatches: int = 1                   # gradient accumulation: batch_size / this per pass
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: Any = "NUM_REAL_TARGET_TOKENS"
    pack: bool = True
    use_cached_tasks: bool = False              # read the tasks from `ul2lab cache` output (gin USE_CACHED_TASKS)
    seqio_cache_dirs: Sequence[str] = ()        # where those caches are (seqio.add_global_cache_dirs)
    seed: Optional[int] = 0                     # parameter init, dropout and data order (None: from the clock)
    checkpoint_period: int = 1000
    keep_checkpoints: Optional[int] = 3         # keep the last N ...
    keep_period: Optional[int] = None           # ... plus every K-th step
    async_checkpoints: bool = True
    log_period: int = 10
    initial_checkpoint_path: Optional[str] = None  # params only (import-hf output or another run); the
    #                                              step continues from that checkpoint's, as in t5x
    train_steps_relative: Optional[int] = None  # t5x's TRAIN_STEPS_RELATIVE: this many steps past the step the
    #                                             run started at (replaces train_steps)
    # the data side, t5x's DatasetConfig (read by the runs and data floors, never by the loop)
    mixture_or_task_module: Any = None          # module(s) that register the task: "my.tasks" or a list
    shuffle_train_examples: bool = True         # SHUFFLE_TRAIN_EXAMPLES
    use_cached_tasks: bool = False              # USE_CACHED_TASKS: read seqio's cache of the task
    # evaluation during training (t5x's eval_period / eval_steps / infer_eval_dataset_cfg)
    eval_period: Optional[int] = 1000           # evaluate every N steps and at the last step (None/0: never)
    eval_steps: int = 20                        # batches of validation loss per task (training_eval/)
    eval_mixture_or_task_name: Optional[str] = None  # its metrics on the model's predictions (inference_eval/)
    evaluator_num_examples: Optional[int] = None     # examples per task of that evaluation (None: all)
    mesh_shape: Mapping[str, int] = dataclasses.field(  # sizes of data/fsdp/model; -1 = the rest
        default_factory=lambda: {"data": -1, "fsdp": 1, "model": 1})
    num_devices: Optional[int] = None           # use only the first N devices (default: all)
    logical_axis_rules: str = "standard"        # "standard" | "fsdp"
    peak_flops_per_device: Optional[float] = None  # for MFU; default: flops.py's table for the device
    tensorboard: bool = True
    # a step with a non-finite loss or gradient norm is skipped (metrics "skipped_updates"); this many
    # in a row stop the run with the last good state saved (None: skip them and never stop)
    max_consecutive_nonfinite: Optional[int] = 20
    # resuming MODEL_DIR with another batch_size moves the data position; refused unless this is True
    # (then the run continues after the examples already seen, rounded up to a whole new batch)
    allow_batch_size_change: bool = False
    # a step without checksums (or INITIAL_CHECKPOINT_PATH's) is refused: its arrays cannot be checked
    # for damage; True restores it unchecked (one warning line)
    allow_missing_checksums: bool = False


# exit status of a run stopped by SIGTERM after saving its step: 128 + SIGTERM, what a shell reports for
# a process ended by SIGTERM, so schedulers and launch scripts treat it as "preempted, requeue me"
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class ConfigError(UserError, ValueError):
    """The run's settings or data cannot work; raised before anything is written to MODEL_DIR."""


class TrainingStopped(UserError, RuntimeError):
    """The run stopped itself (non-finite losses, a checkpoint that cannot be written); the message
    says at which step, what was saved, and what to do."""


def check(config: TrainConfig):
    """All checks of the run's settings (the task is checked by the data layer); returns
    (mesh, logical axis rules). Nothing is written and nothing is compiled."""
    try:
        check_config(config)
        checkpoints.check_same_model(config.model_dir, config.model)
        mesh, rules = mesh_and_rules(config.mesh_shape, config.logical_axis_rules, config.num_devices)
        check_batch_size(config.batch_size, config.num_microbatches, mesh, rules)
        return mesh, rules
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
    check_checkpoints_kept(config)
    check_optimizer(config)
    check_steps_and_eval(config)
    if config.max_consecutive_nonfinite is not None and (not _is_int(config.max_consecutive_nonfinite)
                                                         or config.max_consecutive_nonfinite <= 0):
        raise ValueError(f"TrainConfig.max_consecutive_nonfinite ({config.max_consecutive_nonfinite}) must be "
                         "positive, or None to skip non-finite steps without ever stopping")


def check_checkpoints_kept(config: TrainConfig):
    """keep_checkpoints / keep_period: None (keep all; no period) or a positive whole number. orbax
    takes max_to_keep=0 as "keep none" and deletes every step as soon as it is written."""
    for name, value in (("TrainConfig.keep_checkpoints", config.keep_checkpoints),
                        ("TrainConfig.keep_period", config.keep_period)):
        if value is not None and (not _is_int(value) or value <= 0):
            fix = ("None keeps every checkpoint (as t5x's SaveCheckpointConfig.keep), N >= 1 keeps the last N"
                   if name.endswith("keep_checkpoints") else "None keeps no extra steps, K >= 1 keeps every K-th step")
            raise ValueError(f"{name} = {value!r} cannot work: it must be None or a whole number >= 1 ({fix}); "
                             f"e.g. --gin.{name}=3")


def check_optimizer(config: TrainConfig):
    """Build the optimizer once (cheap: no state) so that a gin binding it refuses (an unknown
    make_optimizer.name) is one line here, before the data and the model are touched."""
    if config.optimizer is None:
        return
    try:
        config.optimizer(learning_rate=1e-3)
    except UserError as e:  # gin appends "In call to configurable ..." on lines of their own
        raise ConfigError(str(e).split("\n")[0].strip()) from None


def check_steps_and_eval(config: TrainConfig):
    """TRAIN_STEPS_RELATIVE, RANDOM_SEED, the evaluation settings; and, for a new run from
    INITIAL_CHECKPOINT_PATH, that the absolute TRAIN_STEPS lies beyond that checkpoint's step."""
    for name, value, least in (("TRAIN_STEPS_RELATIVE", config.train_steps_relative, 1),
                               ("EVAL_PERIOD", config.eval_period, 0), ("EVAL_STEPS", config.eval_steps, 1),
                               ("EVALUATOR_NUM_EXAMPLES", config.evaluator_num_examples, 1)):
        if value is not None and (not _is_int(value) or value < least):
            raise ValueError(f"{name} is {value!r}; it must be a whole number >= {least}"
                             + (" or None" if name != "EVAL_STEPS" else ""))
    if config.seed is not None and not _is_int(config.seed):
        raise ValueError(f"RANDOM_SEED is {config.seed!r}; use a whole number (or None: a seed from the clock)")
    if config.initial_checkpoint_path and config.train_steps_relative is None \
            and not checkpoints.has_checkpoint(config.model_dir):
        steps = checkpoints.all_steps(config.initial_checkpoint_path)
        if steps and config.train_steps <= steps[-1]:
            raise ValueError(
                f"TRAIN_STEPS {config.train_steps} is not beyond step {steps[-1]} of INITIAL_CHECKPOINT_PATH "
                f"{config.initial_checkpoint_path}: as in t5x the step continues from the checkpoint's and "
                f"TRAIN_STEPS is the step to stop at; set TRAIN_STEPS={steps[-1] + config.train_steps} for "
                f"{config.train_steps} more steps, or TRAIN_STEPS_RELATIVE={config.train_steps}")


def end_step(config: TrainConfig, initial_step: int) -> int:
    """The step a run stops at: TRAIN_STEPS, or TRAIN_STEPS_RELATIVE past the step the run started at
    (INITIAL_CHECKPOINT_PATH's, else 0), recorded in the checkpoint so a resumed run keeps the same end."""
    if config.train_steps_relative is not None:
        return initial_step + config.train_steps_relative
    return config.train_steps


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# characters a local checkpoint path cannot hold: tensorstore (orbax's array writer) takes a backslash
# for a path separator, so the arrays of a step land outside its folder and the step cannot be read
# back; quotes and control characters are left over from a value quoted twice (`--gin.MODEL_DIR='"/x"'`)
# or pasted with a line break, never meant as part of a folder name
_UNUSABLE_PATH_CHARACTERS = {"\\": "a backslash", '"': "a double quote", "'": "a single quote"}


def path_problem(path: str) -> Optional[str]:
    """Why orbax/tensorstore cannot write checkpoints under `path` ("it contains a backslash"), or None."""
    for character, name in _UNUSABLE_PATH_CHARACTERS.items():
        if character in path:
            return f"it contains {name} ({character})"
    control = next((c for c in path if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        return f"it contains the control character {control!r}"
    return None


def check_model_dir(model_dir: str, name: str = "MODEL_DIR"):
    """A directory checkpoints can be written to: no character tensorstore cannot handle, and one
    that exists or can be made (checked without writing anything). `name`: how the user gave it
    (MODEL_DIR, --output_dir)."""
    problem = path_problem(model_dir)
    if problem:
        raise ValueError(f"{name} {model_dir!r} cannot hold checkpoints: {problem}, which the checkpoint "
                         "writer (tensorstore) cannot use in a path; choose a path without it (give the path "
                         "once, without quotes of its own: --gin.MODEL_DIR=/path/to/run)")
    if "://" in model_dir:  # gs:// and other remote paths: orbax reports problems with them itself
        return
    path = os.path.abspath(model_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{name} {model_dir} cannot be created: {existing} is a file; choose another {name}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {model_dir} is not writable ({existing} does not allow writing); "
                         f"choose a writable {name} or fix its permissions")


def check_output_dir(output_dir: str, flag: str = "--output_dir"):
    """check_model_dir for a command's output directory of checkpoints (import-*, anneal), as a
    ConfigError (one line) naming the flag."""
    try:
        check_model_dir(output_dir, flag)
    except ValueError as e:
        raise ConfigError(str(e).replace("--gin.MODEL_DIR=", f"{flag} ")) from None


def mesh_and_rules(mesh_shape: Mapping[str, int], rules_name: str, num_devices: Optional[int] = None):
    """(device mesh, logical axis rules) of a run's mesh_shape / logical_axis_rules settings."""
    devices = jax.devices()[:num_devices] if num_devices else None
    return partitioning.create_mesh(**dict(mesh_shape), devices=devices), logical_axis_rules(rules_name)


def logical_axis_rules(name: str):
    rules = {"standard": partitioning.standard_logical_axis_rules, "fsdp": partitioning.fsdp_logical_axis_rules}
    if name not in rules:
        raise ValueError(f"TrainConfig.logical_axis_rules {name!r} is not known; use one of {sorted(rules)}")
    return rules[name]()


def check_batch_size(batch_size: int, num_microbatches: int, mesh, rules):
    batch_axes = partitioning.batch_partition_spec(2, rules)[0] or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    data_parallel = int(np.prod([mesh.shape[axis] for axis in batch_axes]))
    per_pass = batch_size // num_microbatches
    if per_pass % data_parallel:
        raise ValueError(
            f"BATCH_SIZE {batch_size} (/{num_microbatches} microbatches = {per_pass}) is not "
            f"divisible by the data-parallel size {data_parallel} (mesh {dict(mesh.shape)}); use a multiple "
            f"of {data_parallel * num_microbatches}, or change the mesh")
    if batch_size % jax.process_count():
        raise ValueError(f"BATCH_SIZE {batch_size} is not divisible by the {jax.process_count()} hosts")
