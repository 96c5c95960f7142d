"""Checkpoint directories: orbax steps plus a config.json that makes them self-describing.

Layout of a checkpoint directory (MODEL_DIR of a run, or the output of `import-hf`):

    config.json          {"model": T5Config dict, "vocab_path": str|null, ...}
    <step>/params/...    orbax StandardSave of the float32 parameter tree
    <step>/<item>/...    more items written by the trainer (optimizer state, run metadata)

Readers need no gin: `read_config` + `load_params` rebuild the network.
"""
import json
import os
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from ul2lab.models.config import T5Config

CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, or of another model."""


def write_config(directory: str, config: T5Config, vocab_path: Optional[str] = None, **extra: Any):
    """Write config.json atomically (temp file + rename), so a crash never leaves half a file."""
    os.makedirs(directory, exist_ok=True)
    payload = {"model": config.to_dict(), "vocab_path": vocab_path, **extra}
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def read_config(directory: str) -> Tuple[T5Config, dict]:
    """(model config, whole config.json dict) of a checkpoint directory."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} is not a ul2lab checkpoint directory: it has no {CONFIG_FILE} "
                              "(make one with `ul2lab import-hf` or `ul2lab train`)")
    with open(path) as f:
        payload = json.load(f)
    return T5Config.from_dict(payload["model"]), payload


def has_checkpoint(directory: str) -> bool:
    """True if the directory holds at least one finished orbax step."""
    if not os.path.isdir(directory):
        return False
    return any(ocp.utils.is_checkpoint_finalized(os.path.join(directory, d))
               for d in os.listdir(directory) if d.isdigit())


def save_params(directory: str, params: Any, config: T5Config, step: int = 0,
                vocab_path: Optional[str] = None, overwrite: bool = False):
    """Write a params-only checkpoint (what `import-hf` produces; loadable as INITIAL_CHECKPOINT_PATH)."""
    directory = os.path.abspath(directory)
    if has_checkpoint(directory) and not overwrite:
        raise CheckpointError(f"{directory} already holds a checkpoint; pass --overwrite to replace it, "
                              "or choose another directory")
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=False)) as manager:
        if overwrite:
            for old in manager.all_steps():
                manager.delete(old)
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        manager.wait_until_finished()
    write_config(directory, config, vocab_path)


def load_params(directory: str, step: Optional[int] = None) -> Tuple[T5Config, Any]:
    """(config, float32 params as numpy) from a checkpoint directory: the latest step by default."""
    directory = os.path.abspath(directory)
    config, _ = read_config(directory)
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory} has a {CONFIG_FILE} but no finished checkpoint step")
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    return config, restored["params"]
