"""The TrainState's layout on the mesh, and where a run's state comes from: a restored step of
MODEL_DIR, INITIAL_CHECKPOINT_PATH's parameters (the step continuing from that checkpoint's, as in
t5x), or a fresh random init.

`build_step` is the one place the jitted step and its layouts are made from a model, optimizer and
mesh: the trainer runs it, ul2lab.train.memory compiles it from shapes alone.
"""
import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ul2lab.models import network
from ul2lab.models.config import T5Config
from ul2lab.train import checkpoints, optimizers, partitioning
from ul2lab.train import step as step_lib
from ul2lab.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """The jitted step and the layouts of its arguments. Trace, lower or run `step_fn` inside
    `partitioning.axis_rules(mesh, rules)`, as the trainer does."""
    step_fn: Any
    optimizer: Any
    mesh: Any
    rules: Any
    state_shardings: Any
    abstract_state: Any         # ShapeDtypeStructs carrying their shardings: nothing allocated
    batch_sharding: NamedSharding


def build_step(model: T5Config, optimizer, learning_rate: Callable, mesh, rules, seed: int = 0,
               **loss_options) -> StepSetup:
    """The jitted train step for `model` on `mesh` (loss_options: num_microbatches, z_loss, ...)."""
    state_shardings, abstract_state = state_layout(model, seed, optimizer, mesh, rules)
    batch_sharding = NamedSharding(mesh, partitioning.batch_partition_spec(2, rules))
    step_fn = step_lib.build_train_step(model, optimizer, learning_rate, state_shardings, batch_sharding,
                                        **loss_options)
    return StepSetup(step_fn, optimizer, mesh, rules, state_shardings, abstract_state, batch_sharding)


def default_optimizer(learning_rate):
    return optimizers.make_optimizer("adafactor", learning_rate)


def state_layout(model_config: T5Config, seed: int, optimizer, mesh, rules):
    """(shardings of the TrainState, abstract TrainState with those shardings) without allocating it."""
    boxed = network.abstract_params(model_config)
    params_shardings = partitioning.params_shardings(boxed, mesh, rules)
    abstract = jax.eval_shape(lambda: step_lib.init_state(model_config, optimizer, seed))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = step_lib.TrainState(
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
    latest = ckpt.latest_step()
    if latest is not None:
        print(f"restoring step {latest} of {config.model_dir} (and checking it against its checksums)", flush=True)
    restored = ckpt.restore_latest_good(abstract_state.params, abstract_state.opt_state)
    if restored is not None:
        step, params, opt_state, run = restored
        # every leaf placed as the step's in_shardings say, so the resumed step compiles once
        state = step_lib.TrainState(
            step=jax.device_put(np.asarray(run["step"], np.int32), state_shardings.step),
            params=params, opt_state=opt_state,
            rng=jax.device_put(np.asarray(run["rng"], np.uint32), state_shardings.rng),
            nonfinite_streak=jax.device_put(np.zeros((), np.int32), state_shardings.nonfinite_streak))
        print(f"resuming {config.model_dir} at step {step}", flush=True)
        return state, run
    if config.initial_checkpoint_path:
        # as t5x: the parameters and the step counter continue (TRAIN_STEPS is absolute); the optimizer's
        # moments start new, its step counts continue (the learning-rate schedule reads them)
        init = jax.jit(lambda params, step: at_step(step_lib.init_state(config.model, optimizer, config.seed,
                                                                        params), step),
                       out_shardings=state_shardings)
        _, params, from_step = checkpoints.load_params(config.initial_checkpoint_path,
                                                        abstract_params=abstract_state.params,
                                                        allow_missing_checksums=config.allow_missing_checksums)
        print(f"starting from the parameters of {config.initial_checkpoint_path} at its step {from_step}",
              flush=True)
        return init(params, np.asarray(from_step, np.int32)), None
    print(f"initializing a new model in {config.model_dir} (seed {config.seed})", flush=True)
    return new_state_fn(config.model, config.seed, optimizer, state_shardings)(), None


def at_step(state, step):
    """`state` moved to `step`: TrainState.step and every optax step count in its optimizer state.
    optax schedules are evaluated at those counts, not at TrainState.step, so a fresh optimizer state
    with counts at 0 would silently restart the learning-rate schedule of a run that continues a
    checkpoint's step (a warmup from zero, or a re-warm that never happens)."""
    def count(path, leaf):
        name = getattr(path[-1], "name", getattr(path[-1], "key", None)) if path else None
        return jax.numpy.asarray(step, leaf.dtype) if name == "count" else leaf
    return state.replace(step=step, opt_state=jax.tree_util.tree_map_with_path(count, state.opt_state))


def new_state_fn(model_config: T5Config, seed: int, optimizer, state_shardings):
    """Jitted () -> a fresh TrainState (random params from `seed`), laid out by state_shardings."""
    return jax.jit(lambda: step_lib.init_state(model_config, optimizer, seed),
                   out_shardings=state_shardings)


def run_record(state, config: TrainConfig, data_batches: int, initial_step: int = 0) -> dict:
    """What a checkpoint records beside the arrays; initial_step (the step the run started at) keeps
    TRAIN_STEPS_RELATIVE's end fixed across resumes, seed keeps RANDOM_SEED=None's draw."""
    return {"step": int(state.step), "rng": np.asarray(jax.device_get(state.rng)).tolist(),
            "mixture_or_task_name": config.mixture_or_task_name, "data_batches": data_batches,
            "batch_size": config.batch_size, "initial_step": int(initial_step), "seed": config.seed}
