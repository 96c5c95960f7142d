"""Device memory of the trainer's step, from XLA's memory analysis of the compiled executable.

Nothing is trained or allocated: the step (as `trainer.train` builds it, with `trainer.state_layout`'s
shardings) is lowered for abstract arrays (ShapeDtypeStructs carrying their shardings) and compiled.
The executable's argument bytes on one device, less that device's share of the batch, are the
TrainState (params, optimizer state, step, rng) the device holds: compare a sharded layout (FSDP)
with a replicated one. bench/fsdp_memory.py and bench/train_throughput.py report these figures.
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from ul2lab import optimizers, partitioning, schedules, trainer
from ul2lab import train_step as train_step_lib
from ul2lab.models.config import T5Config

BATCH_FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
                  "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                  "decoder_positions", "decoder_loss_weights")


@dataclasses.dataclass(frozen=True)
class AbstractStep:
    """The trainer's jitted step and its layouts, from shapes alone. Trace, lower or run `step_fn`
    inside `partitioning.axis_rules(mesh, rules)`, as the trainer does."""
    step_fn: Any
    optimizer: Any
    mesh: Any
    rules: Any
    state_shardings: Any
    abstract_state: Any
    batch_sharding: NamedSharding
    abstract_batch: dict
    seed: int  # the trainer's default: `trainer.new_state_fn(model, seed, ...)` makes its fresh state

    def compile(self):
        with partitioning.axis_rules(self.mesh, self.rules):
            return self.step_fn.lower(self.abstract_state, self.abstract_batch).compile()


def abstract_train_step(model: T5Config, optimizer_name: str, batch_size: int, inputs_length: int,
                        targets_length: int, mesh_shape: dict, rules_name: str,
                        num_devices: Optional[int] = None) -> AbstractStep:
    """The step `trainer.train` would run for this model, batch and mesh (checked as the trainer checks)."""
    config = trainer.TrainConfig(
        model_dir="(nothing is written)", model=model, mixture_or_task_name="synthetic",
        task_feature_lengths={"inputs": inputs_length, "targets": targets_length}, train_steps=1,
        batch_size=batch_size, mesh_shape=mesh_shape, num_devices=num_devices,
        logical_axis_rules=rules_name)
    mesh, rules, _ = trainer.check(config, with_task=False)
    schedule = schedules.rsqrt_schedule()
    optimizer = optimizers.make_optimizer(optimizer_name, schedule)
    state_shardings, abstract_state = trainer.state_layout(model, config.seed, optimizer, mesh, rules)
    batch_sharding = NamedSharding(mesh, partitioning.batch_partition_spec(2, rules))
    step_fn = train_step_lib.build_train_step(
        model, optimizer, schedule, state_shardings, batch_sharding, z_loss=config.z_loss,
        label_smoothing=config.label_smoothing, loss_normalizing_factor=config.loss_normalizing_factor)
    abstract_batch = {name: jax.ShapeDtypeStruct(
        (batch_size, inputs_length if name.startswith("encoder") else targets_length), jnp.int32,
        sharding=batch_sharding) for name in BATCH_FEATURES}
    return AbstractStep(step_fn, optimizer, mesh, rules, state_shardings, abstract_state, batch_sharding,
                        abstract_batch, config.seed)


def bytes_per_device(abstract_tree) -> int:
    """Bytes of one device's shards of an abstract tree (ShapeDtypeStructs with shardings)."""
    return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
               for leaf in jax.tree_util.tree_leaves(abstract_tree))


def total_bytes(abstract_tree) -> int:
    """Bytes of a whole (unsharded) tree: what each device holds when it is replicated."""
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(abstract_tree))


def memory_analysis_dict(compiled) -> dict:
    """XLA's per-device byte counts of a compiled executable ({} where the backend gives none)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


def compiled_state_memory(model: T5Config, mesh_shape: dict, rules_name: str, optimizer: str = "adafactor",
                          batch_size: int = 8, inputs_length: int = 512, targets_length: int = 114) -> dict:
    """Compile the trainer's step for abstract shapes; bytes of the TrainState per device (XLA's figure)."""
    step = abstract_train_step(model, optimizer, batch_size, inputs_length, targets_length, mesh_shape,
                               rules_name)
    analysis = memory_analysis_dict(step.compile())
    arguments = analysis["argument_size_in_bytes"]
    return {
        "mesh": dict(step.mesh.shape), "rules": rules_name,
        "argument_bytes_per_device": arguments,
        "state_bytes_per_device": arguments - bytes_per_device(step.abstract_batch),
        # cross-check from the shardings alone (what each device should hold)
        "state_bytes_per_device_from_shardings": bytes_per_device(step.abstract_state),
        "state_bytes_total": total_bytes(step.abstract_state),
        "temp_bytes_per_device": analysis.get("temp_size_in_bytes", 0),
    }
