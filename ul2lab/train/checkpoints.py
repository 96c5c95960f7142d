"""Checkpoint directories: orbax steps plus a config.json that makes them self-describing.

Layout of a checkpoint directory (MODEL_DIR of a run, or the output of `import-hf`):

    config.json          {"model": T5Config dict, "vocab_path": "spiece.model"|remote path|null,
                          "vocab_source", "vocab_sha256", ...}
    spiece.model         the SentencePiece model of the vocabulary (a copy: the directory is portable)
    <step>/params/...    orbax StandardSave of the float32 parameter tree
    <step>/checksums     JSON: a content digest per array of the step (ul2lab.train.integrity)
    <step>/<item>/...    more items written by the trainer (optimizer state, run metadata)

Readers need no gin: `read_config` + `load_params` rebuild the network; `vocabulary_path` finds the
vocabulary. Every restore compares the arrays it read with the step's checksums and checks them
finite; a step that fails is a CorruptCheckpointError naming the step and the arrays.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from ul2lab.errors import UserError
from ul2lab.files import atomic_write, atomic_write_json
from ul2lab.models.config import T5Config
from ul2lab.train import data_position as data_position_lib
from ul2lab.train import integrity
from ul2lab.train.orbax_noise import AbandonedReadsQuieted, silence_failed_writes

CONFIG_FILE = "config.json"
VOCAB_FILE = "spiece.model"  # the name Hugging Face's T5 tokenizer gives its SentencePiece model
CHECKSUMS_ITEM = "checksums"


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that is missing, incomplete, or of another model."""


class CorruptCheckpointError(CheckpointError):
    """A step whose arrays do not match their saved checksums or hold NaN/inf."""


class MissingChecksumsError(CheckpointError):
    """A step without checksums (or without some arrays' checksums): its arrays cannot be checked."""


# how a user accepts a step whose arrays have no checksums, named by the refusal
ALLOW_MISSING_CHECKSUMS = ("pass --allow_missing_checksums to use it unchecked (train and anneal: "
                           "--gin.bindings='TrainConfig.allow_missing_checksums = True')")


def write_config(directory: str, config: T5Config, vocab_path: Optional[str] = None, **extra: Any):
    """Write config.json atomically (temp file + rename), so a crash never leaves half a file.

    A local vocabulary file is copied into the directory as spiece.model and recorded by that
    relative name, with its original path (a hint) and sha256, so a copied checkpoint directory
    works anywhere. In a multi-host run only process 0 writes (every host holds the same config)."""
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    vocab = {"vocab_path": vocab_path}
    if vocab_path and "://" not in vocab_path:
        source = os.path.abspath(vocab_path)
        copy = os.path.join(directory, VOCAB_FILE)
        digest = _sha256(source)
        if source != os.path.abspath(copy) and not (os.path.isfile(copy) and _sha256(copy) == digest):
            with open(source, "rb") as f:
                atomic_write(copy, f.read())
        vocab = {"vocab_path": VOCAB_FILE, "vocab_sha256": digest, "vocab_source": source}
    payload = {"model": config.to_dict(), **vocab, **extra}
    atomic_write_json(os.path.join(directory, CONFIG_FILE), payload)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vocabulary_path(directory: str, payload: Optional[dict] = None) -> Optional[str]:
    """The vocabulary file of a checkpoint directory (None if it records none): its own copy
    (spiece.model), else the path config.json records; a CheckpointError if that is missing or
    is not the file the checkpoint was written with."""
    if payload is None:
        payload = read_config(directory)[1]
    recorded = payload.get("vocab_path")
    if not recorded:
        return None
    if "://" in recorded:
        return recorded
    path = recorded if os.path.isabs(recorded) else os.path.join(directory, recorded)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(directory, VOCAB_FILE)):
        path = os.path.join(directory, VOCAB_FILE)  # an older checkpoint whose recorded path is gone
    if not os.path.isfile(path):
        raise CheckpointError(f"the vocabulary of {directory} ({path}, vocab_path in its {CONFIG_FILE}) does not "
                              f"exist; put the SentencePiece .model file there, or set vocab_path in {CONFIG_FILE}")
    expected = payload.get("vocab_sha256")
    if expected and _sha256(path) != expected:
        raise CheckpointError(f"the vocabulary file {path} is not the one {directory} was written with (its sha256 "
                              f"differs from vocab_sha256 in {CONFIG_FILE}); restore the original file "
                              f"(it came from {payload.get('vocab_source', 'an unknown path')})")
    return path


def check_same_vocabulary(directory: str, vocab_path: Optional[str]):
    """A run resumed with another vocabulary would train on other ids: refuse it (nothing is written)."""
    if not vocab_path or "://" in vocab_path or not os.path.exists(os.path.join(directory, CONFIG_FILE)):
        return
    _, payload = read_config(directory)
    expected = payload.get("vocab_sha256")
    if expected and os.path.isfile(vocab_path) and _sha256(vocab_path) != expected:
        raise CheckpointError(f"the task's vocabulary {vocab_path} is not the one {directory} was trained with "
                              f"(sha256 differs from its {CONFIG_FILE}; that one came from "
                              f"{payload.get('vocab_source')}); resume with the task and vocabulary that wrote it, "
                              "or choose a new MODEL_DIR")


def read_config(directory: str) -> Tuple[T5Config, dict]:
    """(model config, whole config.json dict) of a checkpoint directory."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} is not a ul2lab checkpoint directory: it has no {CONFIG_FILE} "
                              "(make one with `ul2lab import-hf` or `ul2lab train`)")
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (ValueError, OSError) as e:  # truncated, not UTF-8, unreadable
        raise CheckpointError(f"{path} cannot be read as JSON ({e}); restore it from a copy, or rerun "
                              "`ul2lab import-hf` / `ul2lab train` into a new directory") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        hint = (" it looks like a Hugging Face config: convert that model with `ul2lab import-hf`, or"
                if isinstance(payload, dict) and ("model_type" in payload or "architectures" in payload) else "")
        raise CheckpointError(f"{path} is not a ul2lab config.json (it has no \"model\" object);{hint} "
                              "point at a directory written by `ul2lab train` or `ul2lab import-hf`")
    try:
        return T5Config.from_dict(payload["model"]), payload
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} describes a model ul2lab cannot build: {e}") from None


def has_checkpoint(directory: str) -> bool:
    """True if the directory holds at least one finished orbax step."""
    return bool(finished_steps(directory))


def finished_steps(directory: str) -> list:
    """The steps whose directory orbax finalized (complete on disk), oldest first; read from the
    directory listing, so it is right even after a failed save."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and ocp.utils.is_checkpoint_finalized(os.path.join(directory, d)))


def all_steps(directory: str) -> list:
    """The finished steps of a checkpoint directory, oldest first (nothing is written)."""
    if not has_checkpoint(directory):
        return []
    with ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(create=False)) as manager:
        return sorted(manager.all_steps())


def copy_step(source: str, destination: str, step: int):
    """Copy step `step` and config.json of `source` into `destination` (process 0 copies; every host
    waits for it), e.g. to branch an anneal off a run without touching it."""
    from jax.experimental import multihost_utils

    os.makedirs(destination, exist_ok=True)
    if jax.process_index() == 0:
        shutil.copytree(os.path.join(source, str(step)), os.path.join(destination, str(step)))
        shutil.copy2(os.path.join(source, CONFIG_FILE), os.path.join(destination, CONFIG_FILE))
        if os.path.isfile(os.path.join(source, VOCAB_FILE)):  # config.json names it relative to the directory
            shutil.copy2(os.path.join(source, VOCAB_FILE), os.path.join(destination, VOCAB_FILE))
    multihost_utils.sync_global_devices(f"ul2lab: step {step} of {source} copied")


@dataclasses.dataclass(frozen=True)
class LazyArray:
    """An array known by shape and dtype, read only when `load()` is called: save_params writes trees of
    these one array at a time, so a model larger than host memory converts if each array fits."""
    shape: Tuple[int, ...]
    dtype: Any
    load: Callable[[], np.ndarray]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _OneArrayAtATime(ocp.type_handlers.NumpyHandler):
    """Writes LazyArrays as orbax writes numpy arrays (same files and metadata, read back as numpy),
    loading each only when its turn comes and dropping it once written."""

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write_in_turn(values, infos, args),
                                                                 name="ul2lab_lazy_arrays")]

    async def _write_in_turn(self, values, infos, args):
        for lazy, info, arg in zip(values, infos, args):
            array = np.asarray(lazy.load())
            if array.shape != lazy.shape or array.dtype != lazy.dtype:
                raise CheckpointError(f"parameter {info.name} was announced as {lazy.shape} {lazy.dtype} "
                                      f"but read as {array.shape} {array.dtype}")
            await self._background_serialize([array], [info], [arg])
            del array


def _lazy_tree_handler() -> ocp.PyTreeCheckpointHandler:
    registry = ocp.type_handlers.create_type_handler_registry(
        (LazyArray, _OneArrayAtATime()), (np.ndarray, ocp.type_handlers.NumpyHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def save_params(directory: str, params: Any, config: T5Config, step: int = 0,
                vocab_path: Optional[str] = None, overwrite: bool = False, opt_state: Any = None,
                run: Optional[dict] = None):
    """Write a params-only checkpoint (what `import-hf` produces; loadable as INITIAL_CHECKPOINT_PATH).

    Leaves may be LazyArrays (float32), loaded and written one at a time. With `opt_state` and `run`
    (the trainer's items, see RunCheckpoints) the step is a whole train state a run resumes from."""
    directory = os.path.abspath(directory)
    if has_checkpoint(directory) and not overwrite:
        raise CheckpointError(f"{directory} already holds a checkpoint; pass --overwrite to replace it, "
                              "or choose another directory")
    params = jax.tree_util.tree_map(lambda x: x if isinstance(x, LazyArray) else np.asarray(x, np.float32),
                                    params, is_leaf=lambda x: isinstance(x, LazyArray))
    items = {"params": ocp.args.PyTreeSave(params)}
    handlers = {"params": _lazy_tree_handler()}
    if opt_state is not None:
        items.update(opt_state=ocp.args.PyTreeSave(opt_state), run=ocp.args.JsonSave(run))
        handlers.update(opt_state=_lazy_tree_handler(), run=ocp.JsonCheckpointHandler())
    arrays = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
    streamed = any(isinstance(x, LazyArray) for x in jax.tree_util.tree_leaves(
        arrays, is_leaf=lambda x: isinstance(x, LazyArray)))
    if streamed:
        # each LazyArray's digest is taken from the bytes written, as it is written (one array in memory);
        # the checksums item is added once every array is on disk
        arrays, checksums = _digest_while_written(arrays)
        items["params"] = ocp.args.PyTreeSave(arrays["params"])
        if opt_state is not None:
            items["opt_state"] = ocp.args.PyTreeSave(arrays["opt_state"])
    else:
        items[CHECKSUMS_ITEM] = ocp.args.JsonSave(integrity.digests(arrays))
        handlers[CHECKSUMS_ITEM] = ocp.JsonCheckpointHandler()
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=False), item_handlers=handlers) as manager:
        if overwrite:
            for old in manager.all_steps():
                manager.delete(old)
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    if streamed:
        missing = [k for k, digest in checksums["arrays"].items() if digest is None]
        if missing:  # an array the writer never loaded: the step must not look checked
            raise CheckpointError(f"{integrity.describe(missing)} of {directory} step {step} were not written")
        if jax.process_index() == 0:
            atomic_write_json(os.path.join(directory, str(step), CHECKSUMS_ITEM, JSON_ITEM_FILE), checksums)
    write_config(directory, config, vocab_path)


JSON_ITEM_FILE = "metadata"  # the file orbax's JsonCheckpointHandler keeps an item in


def _digest_while_written(arrays: Any) -> Tuple[Any, dict]:
    """(the tree with each LazyArray wrapped to record its digest when loaded for writing, checksums
    {"format", "arrays": {path: digest, None until written}}); in-memory leaves are digested now."""
    checksums = {"format": integrity.DIGEST_FORMAT, "arrays": {}}

    def wrap(path, leaf):
        name = jax.tree_util.keystr(path)
        if not isinstance(leaf, LazyArray):
            checksums["arrays"][name] = integrity.array_summary(np.asarray(leaf))[0]
            return leaf
        checksums["arrays"][name] = None

        def load(lazy=leaf):
            array = np.asarray(lazy.load())
            checksums["arrays"][name] = integrity.array_summary(array)[0]
            return array
        return LazyArray(leaf.shape, leaf.dtype, load)
    wrapped = jax.tree_util.tree_map_with_path(wrap, arrays, is_leaf=lambda x: isinstance(x, LazyArray))
    return wrapped, checksums


def param_arrays(directory: str, step: Optional[int] = None, allow_missing_checksums: bool = False,
                 log=print) -> Tuple[T5Config, int, Dict[str, LazyArray]]:
    """(config, step, {"/"-joined parameter path: LazyArray}) of a checkpoint step: shapes come from
    the step's metadata and each array is read only when loaded (to convert models larger than memory).
    Each load checks the array against the step's checksums and finite (CorruptCheckpointError); a step
    without checksums for every array is refused before anything is read (MissingChecksumsError)
    unless allow_missing_checksums."""
    directory = os.path.abspath(directory)
    config, _ = read_config(directory)
    steps = all_steps(directory)
    if not steps or (step is not None and step not in steps):
        raise CheckpointError(f"{directory} has no finished checkpoint step {'' if step is None else step}"
                              f"{'' if not steps else f'; it has steps {steps}'}")
    step = steps[-1] if step is None else step
    arrays = pytree_arrays(os.path.join(directory, str(step), "params"))
    saved = read_checksums(directory, step)
    names = {path: integrity.key("params", *path.split("/")) for path in arrays}
    _check_covered(list(names.values()), saved, directory, step, allow_missing_checksums, log)
    digests = (saved or {}).get("arrays", {})
    step_dir = os.path.join(directory, str(step))

    def checked(path: str, lazy: LazyArray) -> LazyArray:
        def load():
            array = lazy.load()
            digest, nonfinite = integrity.array_summary(array)
            expected = digests.get(names[path])
            if expected is not None and list(expected) != digest:
                raise CorruptCheckpointError(f"checkpoint {step_dir} is corrupt: the content of params/{path} does "
                                             "not match the checksum saved with it (the bytes changed after the "
                                             "step was written). Use another step (or restore this one from a copy)")
            if nonfinite:
                raise CorruptCheckpointError(f"checkpoint {step_dir} is corrupt: params/{path} holds NaN or inf. "
                                             "Use another step (or restore this one from a copy)")
            return array
        return LazyArray(lazy.shape, lazy.dtype, load)
    return config, step, {path: checked(path, lazy) for path, lazy in arrays.items()}


def read_checksums(directory: str, step: int) -> Optional[dict]:
    """The checksums saved with a step (None when it has none), read without touching its arrays."""
    path = os.path.join(directory, str(step), CHECKSUMS_ITEM, JSON_ITEM_FILE)
    if not os.path.isfile(path):
        if os.path.isdir(os.path.dirname(path)):  # the folder without its file: a step copied or written in part
            raise CorruptCheckpointError(f"checkpoint {os.path.join(directory, str(step))} is incomplete: its "
                                         f"{CHECKSUMS_ITEM} folder has no {JSON_ITEM_FILE} (a step copied or "
                                         "written in part); use another step (or restore this one from a copy)")
        return None  # a step written before ul2lab saved checksums
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (ValueError, OSError) as e:
        raise CorruptCheckpointError(f"the checksums of checkpoint {os.path.join(directory, str(step))} cannot be "
                                     f"read ({one_line(e)}); use another step (or restore this one from a copy)") from None
    return saved if isinstance(saved, dict) else None


def pytree_arrays(pytree_dir: str) -> Dict[str, LazyArray]:
    """{"/"-joined path: LazyArray} of an orbax PyTree directory (a step's `params`, or t5x's orbax
    `state`), each leaf read alone (an orbax partial restore) when loaded."""
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(pytree_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree

    def nested(keys, value):
        for key in reversed(keys):
            value = {key: value}
        return value

    def loader(keys, leaf):
        def load():
            with AbandonedReadsQuieted():
                restored = checkpointer.restore(pytree_dir, args=ocp.args.PyTreeRestore(
                    item=nested(keys, leaf), restore_args=nested(keys, ocp.RestoreArgs(restore_type=np.ndarray)),
                    partial_restore=True))
            for key in keys:
                restored = restored[key]
            return np.asarray(restored)
        return load

    arrays = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        arrays["/".join(keys)] = LazyArray(tuple(leaf.shape), np.dtype(leaf.dtype), loader(keys, leaf))
    return arrays


def load_params(directory: str, step: Optional[int] = None, abstract_params: Any = None,
                allow_missing_checksums: bool = False) -> Tuple[T5Config, Any, int]:
    """(model config, params, step) of any ul2lab checkpoint directory (a run's MODEL_DIR or an
    import): the latest step by default. Without `abstract_params` the params come as saved (float32
    numpy); with it (a tree of jax.ShapeDtypeStruct) they are laid out as its shardings say, and a
    checkpoint of other shapes is a CheckpointError. Either way the arrays are checked against the
    step's checksums and checked finite (CorruptCheckpointError); a step without checksums for every
    array is a MissingChecksumsError unless allow_missing_checksums."""
    directory = os.path.abspath(directory)
    config, _ = read_config(directory)  # a clear error if it is not a checkpoint directory
    wanted = abstract_params
    if abstract_params is not None:
        abstract_params = _with_saved_decoder_norm(abstract_params, config.decoder_norm_use_scale)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as manager:
        steps = list(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{directory} has a {CONFIG_FILE} but no finished checkpoint step")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f"{directory} has no checkpoint at step {step}; it has steps {sorted(steps)}")
        what = f"the parameters in {directory} (step {step})"
        if read_checksums(directory, step) is None and not allow_missing_checksums:
            _check_covered(["params"], None, directory, step, False)  # refused before anything is read
        try:
            with AbandonedReadsQuieted():
                restored = manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params), **_checksums_restore(directory, step)))
        except (ValueError, KeyError, TypeError) as e:
            _raise_if_unreadable(e, directory, step)
            raise CheckpointError(f"{what} do not fit this model: {e}") from e
        except Exception as e:  # noqa: BLE001  orbax re-raises tensorstore's read errors as Exception
            _raise_if_unreadable(e, directory, step)
            raise CorruptCheckpointError(f"checkpoint {os.path.join(directory, str(step))} cannot be read "
                                         f"({one_line(e)}); use another step (or restore it from a copy)") from e
    if abstract_params is not None:
        _check_shapes(restored["params"], abstract_params, what)
    verify(restored, directory, step, allow_missing_checksums)
    if wanted is not None:
        return config, _as_decoder_norm_of(restored["params"], wanted, what), step
    return config, restored["params"], step


# A decoder final norm whose scale is all ones is the norm without a scale. Hugging Face's T5 always has
# the scale (google/ul2's is all ones) while UL2 20B's t5x checkpoint and ul2_20b.gin have none: a model
# with one loads a checkpoint with the other when that scale is all ones (or is missing: ones).

def _decoder_norm_scale(params: Any) -> Any:
    return (params.get("decoder", {}).get("decoder_norm") or {}).get("scale") if isinstance(params, dict) else None


def _with_saved_decoder_norm(abstract: Any, saved_has_scale: bool) -> Any:
    """`abstract` with the decoder norm scale the checkpoint holds (added or dropped)."""
    has = _decoder_norm_scale(abstract) is not None
    if has == saved_has_scale or not isinstance(abstract, dict) or "decoder" not in abstract:
        return abstract
    decoder = dict(abstract["decoder"])
    if saved_has_scale:
        like = abstract["encoder"]["encoder_norm"]["scale"]  # same shape (embed,) and layout
        decoder["decoder_norm"] = {"scale": like}
    else:
        decoder.pop("decoder_norm")
    return {**abstract, "decoder": decoder}


def _as_decoder_norm_of(params: Any, wanted: Any, what: str) -> Any:
    """The restored params with the decoder norm scale `wanted` has (see above)."""
    saved, want = _decoder_norm_scale(params), _decoder_norm_scale(wanted)
    if (saved is None) == (want is None):
        return params
    decoder = dict(params["decoder"])
    if want is None:
        if not np.all(np.asarray(saved) == 1):
            raise CheckpointError(f"{what} have a decoder norm scale that is not all ones, and this model has none "
                                  "(decoder_norm_use_scale = False); train it with preset.decoder_norm_use_scale = True")
        decoder.pop("decoder_norm")
    else:
        ones = np.ones(want.shape, want.dtype)
        sharding = getattr(want, "sharding", None)
        decoder["decoder_norm"] = {"scale": jax.device_put(ones, sharding) if sharding is not None else ones}
    return {**params, "decoder": decoder}


# ---------------------------------------------------------------------------------------------
# Training runs: the whole train state, so an interrupted run resumes exactly.
#
#   <step>/params     the float32 parameter tree (what load_params reads)
#   <step>/opt_state  the optimizer state
#   <step>/run        JSON: step, dropout key, and the data position (batches drawn from which mixture)

# fields that change parameter shapes: a MODEL_DIR holding another value of any of them is another model
SHAPE_FIELDS = ("vocab_size", "emb_dim", "num_heads", "num_encoder_layers", "num_decoder_layers",
                "head_dim", "mlp_dim", "mlp_activations", "logits_via_embedding",
                "relative_attention_num_buckets", "decoder_norm_use_scale", "scan_layers")


def check_same_model(directory: str, config: T5Config):
    """Raise CheckpointError, naming the differing fields, if `directory` holds another model's config."""
    if not os.path.exists(os.path.join(directory, CONFIG_FILE)):
        return
    saved, _ = read_config(directory)
    differ = [f"{name}: {getattr(saved, name)!r} there, {getattr(config, name)!r} now"
              for name in SHAPE_FIELDS if getattr(saved, name) != getattr(config, name)]
    if differ:
        raise CheckpointError(f"{directory} holds a checkpoint of another model shape ({'; '.join(differ)}); "
                              "choose a new MODEL_DIR, or use the model config that wrote it")


class SaveFailed(Exception):
    """Writing checkpoint `step` failed (`__cause__`: why); its temporary folder was removed."""

    def __init__(self, step: int):
        super().__init__(f"checkpoint {step} could not be written")
        self.step = step


class RunCheckpoints:
    """An orbax CheckpointManager for a training run: async saves, keep-last-N plus every K-th step.

    A save that fails raises SaveFailed naming its own step (an asynchronous one when the next save,
    `wait` or `check_saves` finds it), once, with orbax's logged tracebacks of it suppressed."""

    def __init__(self, directory: str, max_to_keep: Optional[int] = 3, keep_period: Optional[int] = None,
                 async_save: bool = True, allow_missing_checksums: bool = False):
        self.directory = os.path.abspath(directory)
        self.allow_missing_checksums = allow_missing_checksums
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True))  # a killed save leaves *.orbax-checkpoint-tmp-*
        self._saving: Optional[int] = None  # the asynchronous save started last, not yet known finished
        self._quieted: Optional[AbandonedReadsQuieted] = None  # around the saves not yet known finished
        silence_failed_writes()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, run: dict, *, data_position: Any = None):
        """Start writing step `step` (returns before it is on disk when async; see wait).

        `data_position`: None (not saved), or data_position.HostBytesSave(this host's position bytes),
        the same kind of value on every host."""
        checksums = integrity.digests({"params": params, "opt_state": opt_state})  # before the buffers are reused
        items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                     run=ocp.args.JsonSave(run), **{CHECKSUMS_ITEM: ocp.args.JsonSave(checksums)})
        if data_position is not None:
            items[data_position_lib.ITEM] = data_position
        self.wait()  # orbax would wait too, and blame its failure on this step
        # from the start of a save until it is known finished: a write that fails makes orbax abandon the
        # others, whose callbacks into its closed event loop each print a traceback
        self._quieted = AbandonedReadsQuieted(what="writes that the failed checkpoint save")
        self._quieted.__enter__()
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001  orbax wraps OS errors of its writer threads
            self._end_quieting(e)
            self._remove_temporary(step)
            raise SaveFailed(step) from e
        self._saving = step

    def restore_data_position(self, step: int) -> Optional[bytes]:
        """This host's saved data position at `step`, or None (none saved, or by another host count)."""
        if not data_position_lib.has_item(self.directory, step):
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{data_position_lib.ITEM: data_position_lib.HostBytesRestore()}))
        return restored[data_position_lib.ITEM]

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> Tuple[Any, Any, dict]:
        """(params, opt_state, run dict) of `step`, laid out as the abstract trees' shardings say."""
        if read_checksums(self.directory, step) is None and not self.allow_missing_checksums:
            _check_covered(["params"], None, self.directory, step, False)  # refused before anything is read
        try:
            with AbandonedReadsQuieted():
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state), run=ocp.args.JsonRestore(),
                    **_checksums_restore(self.directory, step)))
        except (ValueError, KeyError, TypeError) as e:
            _raise_if_unreadable(e, self.directory, step)
            raise CheckpointError(f"could not restore step {step} of {self.directory}: its parameters or "
                                  f"optimizer state do not match this run's model and optimizer ({e}). "
                                  "Resume with the settings that wrote it, or choose a new MODEL_DIR") from e
        except Exception as e:  # noqa: BLE001  orbax re-raises tensorstore's read errors as Exception
            _raise_if_unreadable(e, self.directory, step)
            raise
        what = f"step {step} of {self.directory}: its parameters or optimizer state"
        _check_shapes(restored["params"], abstract_params, what)
        _check_shapes(restored["opt_state"], abstract_opt_state, what)
        verify(restored, self.directory, step, self.allow_missing_checksums)
        return restored["params"], restored["opt_state"], dict(restored["run"])

    def restore_latest_good(self, abstract_params: Any, abstract_opt_state: Any, log=print):
        """(step, params, opt_state, run) of the newest step that restores, or None if there is none.

        A newer step that cannot be read (truncated file, missing array, half-copied directory) is
        reported with its path and renamed to `corrupt-<step>-<time>` (kept, never deleted), so
        orbax neither picks it again nor refuses to save that step number later. If no step
        restores, nothing is renamed and the newest step's error is raised: that is a run of
        another model or optimizer, not corruption.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failed = []
        for step in steps:
            try:
                return_value = (step, *self.restore(step, abstract_params, abstract_opt_state))
            except MissingChecksumsError:
                raise  # not damage: the user decides (restore the checksums, or accept the step unchecked)
            except Exception as e:  # noqa: BLE001  any unreadable step falls back to an older one
                failed.append((step, e))
                log(f"warning: checkpoint {os.path.join(self.directory, str(step))} cannot be restored "
                    f"({one_line(e)}); trying the previous one", flush=True)
                continue
            for bad, _ in failed:
                self._set_aside(bad, log)
            return return_value
        if failed:
            raise failed[0][1]
        return None

    def _set_aside(self, step: int, log):
        path = os.path.join(self.directory, str(step))
        aside = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
        if jax.process_index() == 0:
            os.rename(path, aside)
        self.manager.reload()
        log(f"warning: kept the unreadable checkpoint {path} as {aside} (not deleted; inspect or remove it "
            "yourself)", flush=True)

    def wait(self):
        """Until the saves started are on disk; SaveFailed if one failed."""
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._end_quieting(e)
            self._remove_temporary(step)
            raise SaveFailed(step) from e
        self._end_quieting(None)

    def _end_quieting(self, error: Optional[BaseException]):
        quieted, self._quieted = self._quieted, None
        if quieted is not None:
            quieted.__exit__(type(error) if error is not None else None, error, None)

    def check_saves(self):
        """Without waiting: SaveFailed if the last asynchronous save has failed (nothing while it runs).
        One host only: on several, hosts could learn it at different steps, so there it is found
        at the next save or `wait`, which every host reaches together."""
        if self._saving is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
            self.wait()

    def _remove_temporary(self, step: Optional[int]):
        """A failed save's partial folder goes, so that nothing half-written is left to trip a retry."""
        if step is None or jax.process_index() != 0:
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def close(self):
        try:
            self.manager.close()
        finally:
            self._end_quieting(None)


def _checksums_restore(directory: str, step: int) -> dict:
    """The checksums item to restore with a step, if the step has one (steps written before it existed do not)."""
    if os.path.isdir(os.path.join(directory, str(step), CHECKSUMS_ITEM)):
        return {CHECKSUMS_ITEM: ocp.args.JsonRestore()}
    return {}


# what tensorstore says when a step's bytes cannot be decoded (a damaged compressed chunk or index of
# the OCDBT files), as opposed to a tree or shape that does not match the model
_UNREADABLE_MARKERS = ("DATA_LOSS", "FAILED_PRECONDITION: Error reading", "Error decoding")


def _raise_if_unreadable(error: BaseException, directory: str, step: int):
    """CorruptCheckpointError when `error` or what caused it (orbax wraps tensorstore's error in a
    plain Exception) says the step's bytes cannot be decoded; otherwise returns."""
    seen = error
    while seen is not None:
        if any(marker in str(seen) for marker in _UNREADABLE_MARKERS):
            raise CorruptCheckpointError(
                f"checkpoint {os.path.join(directory, str(step))} is corrupt: its files cannot be decoded "
                f"({one_line(seen)[:300]}). Use another step (or restore this one from a copy)") from error
        seen = seen.__cause__ or seen.__context__


def verify(restored: dict, directory: str, step: int, allow_missing_checksums: bool = False, log=print):
    """Raise CorruptCheckpointError if the restored arrays (every item but the checksums and the run
    record) differ from the step's checksums or hold NaN/inf; MissingChecksumsError if some have no
    checksum (unless allow_missing_checksums: then one warning line)."""
    arrays = {k: v for k, v in restored.items() if k not in (CHECKSUMS_ITEM, "run")}
    _check_covered(integrity.uncovered(arrays, restored.get(CHECKSUMS_ITEM)), restored.get(CHECKSUMS_ITEM),
                   directory, step, allow_missing_checksums, log, computed=True)
    found = integrity.problems(arrays, restored.get(CHECKSUMS_ITEM))
    if found:
        raise CorruptCheckpointError(f"checkpoint {os.path.join(directory, str(step))} is corrupt: {'; '.join(found)}. "
                                     "Use another step (or restore this one from a copy)")


def _check_covered(paths: list, saved: Optional[dict], directory: str, step: int, allow: bool, log=print,
                   computed: bool = False):
    """Refuse (MissingChecksumsError) or, when allowed, warn in one line about a step whose checksums
    are missing (saved None) or lack some of `paths` (array keys; `computed`: paths are already the
    uncovered ones)."""
    step_dir = os.path.join(directory, str(step))
    if saved is None:
        if not paths:
            return
        what = f"checkpoint {step_dir} has no checksums (its {CHECKSUMS_ITEM} folder is missing)"
    else:
        missing = paths if computed else [p for p in paths if p not in saved.get("arrays", {})]
        if not missing:
            return
        what = f"checkpoint {step_dir} has no checksum for {integrity.describe(missing)}"
    if allow:
        log(f"warning: {what}; using it unchecked (allow_missing_checksums)", flush=True)
        return
    raise MissingChecksumsError(f"{what}, so damage to its arrays cannot be detected; restore the step from a "
                                f"copy, or {ALLOW_MISSING_CHECKSUMS}")


def shape_mismatches(got: Any, expected: Any) -> List[str]:
    """What differs between two trees of arrays by path ("/"-joined): another shape, a path missing from
    `got`, a path `got` has that `expected` lacks; empty when they fit. orbax restores an array of
    another shape without complaint, so every restore and every read of a step's parameters asks this."""
    def shapes(tree):
        return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
                tuple(np.shape(x)) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    have, want = shapes(got), shapes(expected)
    return ([f"{k}: {have[k]} saved, {want[k]} expected" for k in want if k in have and have[k] != want[k]]
            + [f"{k} missing" for k in want if k not in have] + [f"{k} not in the model" for k in have if k not in want])


def _check_shapes(restored: Any, expected: Any, what: str):
    wrong = shape_mismatches(restored, expected)
    if wrong:
        raise CheckpointError(f"{what} do not fit this model: {'; '.join(wrong[:3])}"
                              + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""))


def latest_run_record(directory: str) -> Optional[dict]:
    """The run JSON (step, data position, ...) of the latest step, read without writing anything."""
    if not has_checkpoint(directory):
        return None
    with ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(create=False)) as manager:
        step = manager.latest_step()
        try:
            return dict(manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"])
        except Exception:  # noqa: BLE001  an unreadable latest step: the trainer falls back and reports it
            return None


def one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")
