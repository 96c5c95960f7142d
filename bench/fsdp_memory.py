"""Per-device parameter + optimizer memory of the trainer's step under FSDP, from compiled executables.

    python bench/fsdp_memory.py --models t5_1_1_base t5_1_1_large t5_1_1_xl

Nothing is trained or allocated: `ul2lab.train.memory.compiled_state_memory` compiles the trainer's step
for abstract arrays over 8 host CPU devices and reads the TrainState bytes one device holds from
XLA's memory analysis. The same step compiled with replicated parameters (mesh data=8, standard
rules) gives the replicated total.
Prints one JSON object per model.
"""
import os

# 8 host CPU devices (tests/test_fsdp_memory.py checks the same library function under conftest's 8)
if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ul2lab.train import memory  # noqa: E402
from ul2lab.models.config import preset  # noqa: E402


def compiled_state_memory(model_name: str, mesh_shape: dict, rules_name: str, **kwargs) -> dict:
    start = time.perf_counter()
    result = memory.compiled_state_memory(preset(model_name), mesh_shape, rules_name, **kwargs)
    return {**result, "compile_s": round(time.perf_counter() - start, 2)}


def fsdp_vs_replicated(model_name: str, optimizer: str = "adafactor", batch_size: int = 8,
                       inputs_length: int = 512, targets_length: int = 114) -> dict:
    """FSDP over all devices vs fully replicated parameters, both compiled; ratio = fsdp / replicated."""
    kwargs = dict(optimizer=optimizer, batch_size=batch_size, inputs_length=inputs_length,
                  targets_length=targets_length)
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
