"""Per-device parameter + optimizer memory of the trainer's step under FSDP, from compiled executables.

    python bench/fsdp_memory.py --models t5_1_1_base t5_1_1_large t5_1_1_xl

Nothing is trained or allocated: the step (`ul2lab.train_step` as the trainer jits it, with
`trainer.state_layout`'s shardings) is lowered for abstract arrays (ShapeDtypeStructs carrying
their shardings) over 8 host CPU devices and compiled; XLA's memory analysis of that executable
gives the bytes of its arguments on one device. The batch's per-device bytes are subtracted, so
what remains is the TrainState (params, optimizer moments, step, rng) one device holds. The same
step compiled with replicated parameters (mesh data=8, standard rules) gives the replicated total.
Prints one JSON object per model.
"""
import os
import sys

# run as a script: 8 host CPU devices (tests/conftest.py forces the same when the test imports this)
if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import build_train_step  # noqa: E402

from ul2lab import partitioning  # noqa: E402
from ul2lab.models.config import preset  # noqa: E402


def _bytes_per_device(abstract_tree) -> int:
    """Bytes of one device's shards of an abstract tree (ShapeDtypeStructs with shardings)."""
    return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
               for leaf in jax.tree_util.tree_leaves(abstract_tree))


def compiled_state_memory(model_name: str, mesh_shape: dict, rules_name: str, optimizer: str = "adafactor",
                          batch_size: int = 8, inputs_length: int = 512, targets_length: int = 114,
                          **overrides) -> dict:
    """Compile the trainer's step for abstract shapes; bytes of the TrainState per device (XLA's figure)."""
    model = preset(model_name, **overrides)
    (step_fn, _, mesh, rules, _, abstract_state, _, abstract_batch) = build_train_step(
        model, optimizer, batch_size, inputs_length, targets_length, mesh_shape, rules_name)
    start = time.perf_counter()
    with partitioning.axis_rules(mesh, rules):
        compiled = step_fn.lower(abstract_state, abstract_batch).compile()
    analysis = compiled.memory_analysis()
    batch_bytes = _bytes_per_device(abstract_batch)
    return {
        "mesh": dict(mesh.shape), "rules": rules_name,
        "compile_s": round(time.perf_counter() - start, 2),
        "argument_bytes_per_device": int(analysis.argument_size_in_bytes),
        "state_bytes_per_device": int(analysis.argument_size_in_bytes) - batch_bytes,
        # cross-check from the shardings alone (what each device should hold)
        "state_bytes_per_device_from_shardings": _bytes_per_device(abstract_state),
        "state_bytes_total": sum(leaf.size * leaf.dtype.itemsize
                                 for leaf in jax.tree_util.tree_leaves(abstract_state)),
        "temp_bytes_per_device": int(analysis.temp_size_in_bytes),
    }


def fsdp_vs_replicated(model_name: str, optimizer: str = "adafactor", batch_size: int = 8,
                       inputs_length: int = 512, targets_length: int = 114, **overrides) -> dict:
    """FSDP over all devices vs fully replicated parameters, both compiled; ratio = fsdp / replicated."""
    kwargs = dict(optimizer=optimizer, batch_size=batch_size, inputs_length=inputs_length,
                  targets_length=targets_length, **overrides)
    fsdp = compiled_state_memory(model_name, {"data": 1, "fsdp": -1, "model": 1}, "fsdp", **kwargs)
    replicated = compiled_state_memory(model_name, {"data": -1, "fsdp": 1, "model": 1}, "standard", **kwargs)
    num_devices = int(np.prod(list(fsdp["mesh"].values())))
    return {
        "model": model_name, "optimizer": optimizer, "num_devices": num_devices,
        "batch_size": batch_size, "inputs_length": inputs_length, "targets_length": targets_length,
        "replicated_state_bytes_per_device": replicated["state_bytes_per_device"],
        "fsdp_state_bytes_per_device": fsdp["state_bytes_per_device"],
        "fsdp_over_replicated": fsdp["state_bytes_per_device"] / replicated["state_bytes_per_device"],
        "bound": 1.1 / num_devices,
        "fsdp": fsdp, "replicated": replicated,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["t5_1_1_base", "t5_1_1_large", "t5_1_1_xl"])
    parser.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    args = parser.parse_args(argv)
    for name in args.models:
        result = fsdp_vs_replicated(name, args.optimizer, args.batch_size, args.inputs_length,
                                    args.targets_length)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
