"""Device memory of the trainer's step, from XLA's memory analysis of the compiled executable.

Nothing is trained or allocated: the step, as the trainer builds it (`ul2lab.train.state.build_step`),
is lowered for abstract arrays (ShapeDtypeStructs carrying their shardings) and compiled.
The executable's argument bytes on one device, less that device's share of the batch, are the
TrainState (params, optimizer state, step, rng) the device holds: compare a sharded layout (FSDP)
with a replicated one. bench/fsdp_memory.py and bench/train_throughput.py report these figures.
"""
import collections
import re
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ul2lab.models.config import T5Config
from ul2lab.train import config as config_lib
from ul2lab.train import optimizers, partitioning, schedules
from ul2lab.train import state as state_lib

BATCH_FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
                  "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                  "decoder_positions", "decoder_loss_weights")
_HLO_SHAPE = re.compile(r"\b(?:pred|[subf]\d+|bf16|f8e\w+)\[(\d+(?:,\d+)*)\]")


def abstract_train_step(model: T5Config, optimizer_name: str, batch_size: int, inputs_length: int,
                        targets_length: int, mesh_shape: dict, rules_name: str,
                        num_devices: Optional[int] = None) -> Tuple[state_lib.StepSetup, dict]:
    """The step the trainer would run for this model, batch and mesh (built by the trainer's own
    `state.build_step`, checked as the trainer checks), and its abstract batch."""
    mesh, rules = config_lib.mesh_and_rules(mesh_shape, rules_name, num_devices)
    config_lib.check_batch_size(batch_size, 1, mesh, rules)
    schedule = schedules.rsqrt_schedule()
    setup = state_lib.build_step(model, optimizers.make_optimizer(optimizer_name, schedule), schedule, mesh, rules)
    abstract_batch = {name: jax.ShapeDtypeStruct(
        (batch_size, inputs_length if name.startswith("encoder") else targets_length), jnp.int32,
        sharding=setup.batch_sharding) for name in BATCH_FEATURES}
    return setup, abstract_batch


def compile_step(setup: state_lib.StepSetup, abstract_batch: dict):
    """Lower and compile the step for abstract shapes (nothing allocated)."""
    with partitioning.axis_rules(setup.mesh, setup.rules):
        return setup.step_fn.lower(setup.abstract_state, abstract_batch).compile()


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


def array_shapes(compiled) -> set:
    """Every array shape (tuple of dims) in a compiled executable's optimized HLO: operands, results
    and fusion internals, i.e. every buffer XLA might assign, whatever its dtype or layout."""
    return {tuple(int(d) for d in dims.split(",")) for dims in _HLO_SHAPE.findall(compiled.as_text())}


def attention_sized_arrays(shapes, batch: int, heads: int, inputs_length: int, targets_length: int) -> list:
    """The shapes among `shapes` that hold a (batch, heads, q, k) array of one of T5's attentions
    (encoder self, decoder self, cross): those four dims in any order, other dims allowed (e.g. a
    scanned layers axis), or batch and heads merged into one. batch and heads are per device."""
    pairs = ((inputs_length, inputs_length), (targets_length, targets_length), (targets_length, inputs_length))
    wanted = [collections.Counter(dims) for q, k in pairs for dims in ((batch, heads, q, k), (batch * heads, q, k))]
    return sorted(s for s in shapes if any(not want - collections.Counter(s) for want in wanted))


def compiled_state_memory(model: T5Config, mesh_shape: dict, rules_name: str, optimizer: str = "adafactor",
                          batch_size: int = 8, inputs_length: int = 512, targets_length: int = 114) -> dict:
    """Compile the trainer's step for abstract shapes; bytes of the TrainState per device (XLA's figure)."""
    setup, abstract_batch = abstract_train_step(model, optimizer, batch_size, inputs_length, targets_length,
                                                mesh_shape, rules_name)
    analysis = memory_analysis_dict(compile_step(setup, abstract_batch))
    arguments = analysis["argument_size_in_bytes"]
    return {
        "mesh": dict(setup.mesh.shape), "rules": rules_name,
        "argument_bytes_per_device": arguments,
        "state_bytes_per_device": arguments - bytes_per_device(abstract_batch),
        # cross-check from the shardings alone (what each device should hold)
        "state_bytes_per_device_from_shardings": bytes_per_device(setup.abstract_state),
        "state_bytes_total": total_bytes(setup.abstract_state),
        "temp_bytes_per_device": analysis.get("temp_size_in_bytes", 0),
    }
