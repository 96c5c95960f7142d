"""t5x checkpoint files: every layout t5x writes, read one array at a time; its tensorstore layout written.

    checkpoint = t5x_files.open_checkpoint("/runs/t5_base")   # MODEL_DIR, checkpoint_<step>, or its file
    checkpoint.arrays["target/encoder/layers_0/attention/query/kernel"].load()   # float32 numpy
    t5x_files.write_checkpoint(model_dir, step, {"encoder/layers_0/...": LazyArray, ...})

The layouts (facts from t5x/checkpoints.py):
  msgpack  checkpoint_<step>/checkpoint: flax msgpack of {"version": 3, "optimizer": state} (version 0:
           the state itself), state = {"target": params, "state": {"step", "param_states"}}. A leaf is
           an inline array (flax's msgpack extension; arrays over 1 GiB are split into chunks) or, for
           partitioned arrays, a tensorstore spec (a dict) of a gzip zarr array in a folder beside the
           file named by the leaf's path joined with "." (target.encoder.layers_0.attention.query.kernel).
           bfloat16 is stored as bfloat16 (version 3) or as its bits in uint16 (version 2).
  orbax    checkpoint_<step>/state/: the same state as an orbax PyTree (t5x's OrbaxCheckpointManagerInterface).
Nothing reads a whole checkpoint into memory: the msgpack file is indexed (where each inline array
lies), and every array is read only when loaded.
"""
import dataclasses
import os
import re
from typing import Any, Dict

import numpy as np

from ul2lab.errors import UserError
from ul2lab.files import atomic_write, stop_if_interrupted
from ul2lab.train.checkpoints import CONFIG_FILE, LazyArray, pytree_arrays

STEP_PREFIX = "checkpoint_"
MSGPACK_FILE = "checkpoint"
ORBAX_STATE = "state"
RUN_GIN = "config.gin"               # t5x saves the run's gin config in MODEL_DIR, beside checkpoint_<step>
VOCAB_FILE = "sentencepiece.model"   # export-t5x's copy of the vocabulary (the name T5's vocabularies have)


def is_export_entry(name: str) -> bool:
    """Whether `name` in a MODEL_DIR is what export-t5x writes there, so --overwrite replaces it: config.gin,
    the vocabulary, and every checkpoint_<step> (t5x restores the latest one, so an older export's
    higher step would be restored in place of the new export's)."""
    return name in (RUN_GIN, VOCAB_FILE) or re.fullmatch(rf"{STEP_PREFIX}\d+", name) is not None
VERSION = 3                          # what t5x writes since 2021 (bfloat16 stored natively)
_CHUNK_BYTES = 64 * 2**20            # t5x's target zarr chunk size
_MSGPACK_MAP = frozenset(range(0x80, 0x90)) | {0xde, 0xdf}
_MSGPACK_EXT_HEADER = {0xd4: 2, 0xd5: 2, 0xd6: 2, 0xd7: 2, 0xd8: 2, 0xc7: 3, 0xc8: 4, 0xc9: 6}
_FLAX_ARRAY_EXT = (1, 3)             # flax.serialization: ndarray, numpy scalar (both (shape, dtype, bytes))


class T5xFormatError(UserError, ValueError):
    """A directory or file that is not a readable t5x checkpoint (or cannot be written as one)."""


@dataclasses.dataclass
class T5xCheckpoint:
    path: str                        # the step directory
    step: int
    layout: str                      # "msgpack" or "orbax"
    arrays: Dict[str, LazyArray]     # "target/...", "state/step", "state/param_states/..." (floats as float32)


# ----------------------------------------------------------------------------- finding the step

def step_directory(path: str) -> str:
    """The checkpoint_<step> folder `path` means: that folder, its msgpack file, or a MODEL_DIR (latest step)."""
    if "://" in path:
        raise T5xFormatError(f"{path}: remote paths are not read directly; copy the checkpoint first "
                             f"(gsutil -m cp -r {path} .) and pass the local folder")
    if os.path.isfile(path):
        if os.path.basename(path) == MSGPACK_FILE:
            return _check_not_tensorflow(os.path.dirname(os.path.abspath(path)))
        raise T5xFormatError(f"{path} is a file, not a t5x checkpoint; pass its checkpoint_<step> folder")
    if not os.path.isdir(path):
        raise T5xFormatError(f"{path} does not exist; pass a t5x MODEL_DIR or one of its checkpoint_<step> folders")
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, ORBAX_STATE)) or os.path.isfile(os.path.join(path, MSGPACK_FILE)):
        return _check_not_tensorflow(path)
    steps = sorted((int(m.group(1)), name) for name in os.listdir(path)
                   for m in [re.fullmatch(rf"{STEP_PREFIX}(\d+)", name)] if m)
    if steps:
        return step_directory(os.path.join(path, steps[-1][1]))
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        raise T5xFormatError(f"{path} holds no t5x checkpoint_<step> folder (it looks like a ul2lab or Hugging "
                             "Face checkpoint: use it directly, or convert it with export-t5x / import-hf)")
    if any(name.endswith(".index") for name in os.listdir(path)):
        raise T5xFormatError(f"{path} holds a TensorFlow checkpoint, not a t5x one; Mesh TensorFlow T5 "
                             "checkpoints import with `ul2lab import-mtf`")
    raise T5xFormatError(f"{path} is not a t5x checkpoint: it has no checkpoint_<step> folder, no "
                         f"'{MSGPACK_FILE}' file and no '{ORBAX_STATE}' folder")


def _check_not_tensorflow(step_dir: str) -> str:
    msgpack_file = os.path.join(step_dir, MSGPACK_FILE)
    if os.path.isfile(msgpack_file) and not os.path.isdir(os.path.join(step_dir, ORBAX_STATE)):
        with open(msgpack_file, "rb") as f:
            if f.read(21) == b"model_checkpoint_path":
                raise T5xFormatError(f"{step_dir} holds a TensorFlow checkpoint ({msgpack_file} is its index "
                                     "file); Mesh TensorFlow T5 checkpoints import with `ul2lab import-mtf`")
    return step_dir


def open_checkpoint(path: str) -> T5xCheckpoint:
    """The arrays of a t5x checkpoint (shapes read, data not yet)."""
    step_dir = step_directory(path)
    if os.path.isdir(os.path.join(step_dir, ORBAX_STATE)):
        state_dir = os.path.join(step_dir, ORBAX_STATE)
        try:
            raw = pytree_arrays(state_dir)
        except Exception as e:  # noqa: BLE001  orbax's own words on what it could not read
            raise T5xFormatError(f"{state_dir} is not a readable orbax checkpoint ({_one_line(e)})") from None
        arrays = {name: _as_float32(lazy, name, state_dir) for name, lazy in raw.items()}
        layout = "orbax"
    else:
        arrays = _msgpack_arrays(os.path.join(step_dir, MSGPACK_FILE))
        layout = "msgpack"
    match = re.fullmatch(rf"{STEP_PREFIX}(\d+)", os.path.basename(step_dir))
    step = int(match.group(1)) if match else 0
    if "state/step" in arrays:
        step = int(np.asarray(arrays["state/step"].load()))
    return T5xCheckpoint(step_dir, step, layout, arrays)


# ----------------------------------------------------------------------------- msgpack (+ zarr) layout

@dataclasses.dataclass(frozen=True)
class _Inline:
    """Where one inline array lies in the msgpack file."""
    start: int
    end: int
    shape: tuple
    dtype: str


def _msgpack_arrays(path: str) -> Dict[str, LazyArray]:
    tree = _index_msgpack(path)
    if not isinstance(tree, dict):
        raise T5xFormatError(f"{path} is not a t5x checkpoint (its msgpack content is not a map)")
    if "optimizer" in tree:
        version = tree.get("version", 0)
        if not isinstance(version, int) or version > VERSION:
            raise T5xFormatError(f"{path} is a t5x checkpoint of version {version!r}; ul2lab reads versions "
                                 f"up to {VERSION}")
        tree = tree["optimizer"]
    arrays: Dict[str, LazyArray] = {}
    step_dir = os.path.dirname(path)

    def visit(name: str, node: Any):
        if isinstance(node, dict) and "__msgpack_chunked_array__" in node:
            arrays[name] = _chunked_array(path, name, node)
        elif isinstance(node, dict) and "driver" in node:
            arrays[name] = _zarr_array(step_dir, name, node)
        elif isinstance(node, dict):
            for key, child in node.items():
                visit(f"{name}/{key}" if name else str(key), child)
        elif isinstance(node, _Inline):
            arrays[name] = _inline_array(path, name, node)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            arrays[name] = LazyArray((), np.asarray(node).dtype, lambda value=node: np.asarray(value))
        # None (a parameter no optimizer updates) and empty states carry nothing

    visit("", tree)
    return arrays


def _index_msgpack(path: str):
    """The msgpack tree with every inline array replaced by its _Inline location (read but not kept)."""
    import msgpack  # comes with flax

    size = os.path.getsize(path)
    with open(path, "rb") as f, open(path, "rb") as peek:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=max(size, 2**20))

        where = [""]  # the parameter being read, for the error when the file ends inside it

        def node(name: str):
            where[0] = name
            start = unpacker.tell()
            peek.seek(start)
            first = peek.read(1)
            if not first:
                raise msgpack.OutOfData
            kind = first[0]
            if kind in _MSGPACK_MAP:
                entries = {}
                for _ in range(unpacker.read_map_header()):
                    key = str(unpacker.unpack())
                    entries[key] = node(f"{name}/{key}" if name else key)
                return entries
            if kind in _MSGPACK_EXT_HEADER:
                header = _MSGPACK_EXT_HEADER[kind]
                unpacker.skip()
                end = unpacker.tell()
                peek.seek(start + header - 1)
                head = peek.read(min(end - start - header + 1, 513))
                if head[0] in _FLAX_ARRAY_EXT:  # payload: (shape, dtype name, bytes); read the first two
                    reader = msgpack.Unpacker(raw=False)
                    reader.feed(head[1:])
                    reader.read_array_header()
                    return _Inline(start, end, tuple(reader.unpack()), str(reader.unpack()))
                peek.seek(start)
                return _restore(peek.read(end - start))
            return unpacker.unpack()

        try:
            return node("")
        except (msgpack.OutOfData, msgpack.ExtraData, ValueError, TypeError, UnicodeDecodeError) as e:
            inside = f" (it ends inside parameter {_parameter_name(where[0])})" if where[0] else ""
            raise T5xFormatError(f"{path} is not a readable t5x checkpoint file: it is truncated or not msgpack"
                                 f"{inside} ({type(e).__name__}); copy the checkpoint again") from None


def _parameter_name(path: str) -> str:
    """t5x's tree path without its optimizer wrapping: optimizer/target/x/y -> target/x/y."""
    return path[len("optimizer/"):] if path.startswith("optimizer/") else path


def _restore(data: bytes):
    from flax import serialization
    return serialization.msgpack_restore(data)


def _inline_array(path: str, name: str, where: _Inline) -> LazyArray:
    def load():
        try:
            return np.asarray(_restore(_read(path, where)))
        except Exception as e:  # noqa: BLE001  the bytes are damaged; say which parameter
            raise T5xFormatError(f"{path}: parameter {name} cannot be read ({_one_line(e)}); "
                                 "copy the checkpoint again") from None
    return _as_float32(LazyArray(where.shape, _numpy_dtype(where.dtype), load), name, path)


def _chunked_array(path: str, name: str, node: dict) -> LazyArray:
    """flax's split form of arrays over 1 GiB: a flat array in numbered chunks, and its shape."""
    shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
    chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
    if not chunks or not all(isinstance(c, _Inline) for c in chunks):
        raise T5xFormatError(f"{path}: parameter {name} is a chunked array without its chunks; copy the "
                             "checkpoint again")
    dtype = _numpy_dtype(chunks[0].dtype)

    def load():  # filled chunk by chunk: the array and one chunk in memory, never all chunks twice
        out = np.empty(int(np.prod(shape)), dtype)
        offset = 0
        for chunk in chunks:
            values = np.asarray(_restore(_read(path, chunk)))
            out[offset:offset + values.size] = values.reshape(-1)
            offset += values.size
        if offset != out.size:
            raise T5xFormatError(f"{path}: parameter {name} has {offset} values in its chunks, its shape "
                                 f"{shape} needs {out.size}; copy the checkpoint again")
        return out.reshape(shape)
    return _as_float32(LazyArray(shape, dtype, load), name, path)


def _read(path: str, where: _Inline) -> bytes:
    with open(path, "rb") as f:
        f.seek(where.start)
        return f.read(where.end - where.start)


def _zarr_array(step_dir: str, name: str, spec: dict) -> LazyArray:
    """A tensorstore-written array; its folder is named in the spec relative to the step directory
    (gcs-written specs name it the same way, relative to the bucket's checkpoint folder)."""
    relative = (spec.get("kvstore") or {}).get("path", spec.get("path"))
    metadata = spec.get("metadata") or {}
    if not relative or "shape" not in metadata:
        raise T5xFormatError(f"{step_dir}/{MSGPACK_FILE}: parameter {name} has a tensorstore spec without a path "
                             f"or shape ({spec}); is the checkpoint from another tool?")
    location = os.path.join(step_dir, relative)
    if not os.path.exists(location):  # a spec naming the folder by its path in the bucket it was written to
        location = os.path.join(step_dir, os.path.basename(relative.rstrip("/")))
    shape = tuple(int(d) for d in metadata["shape"])
    stored = spec.get("dtype") or metadata.get("dtype") or "float32"

    def load():
        import tensorstore as ts  # comes with orbax
        try:
            store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": location}},
                            open=True, read=True).result()
            if tuple(store.shape) != shape:
                raise T5xFormatError(f"{location}: parameter {name} is stored as {tuple(store.shape)} but the "
                                     f"checkpoint file says {shape}; the checkpoint is mixed from two runs")
            array = store.read().result()
        except T5xFormatError:
            raise
        except Exception as e:  # noqa: BLE001  tensorstore says what is missing or damaged
            raise T5xFormatError(f"{location}: parameter {name} cannot be read ({_one_line(e)}); the checkpoint is "
                                 "incomplete or damaged: copy it again") from None
        return array
    dtype = "bfloat16" if stored in ("uint16", "<u2") else stored  # version 2: bfloat16 bits as uint16
    return _as_float32(LazyArray(shape, _numpy_dtype(dtype), load), name, location)


def _numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes  # comes with jax
    try:
        return np.dtype(ml_dtypes.bfloat16 if str(name) in ("bfloat16", "uint16", "<u2") else name)
    except TypeError:
        raise T5xFormatError(f"unknown array dtype {name!r} in the checkpoint") from None


def _as_float32(lazy: LazyArray, name: str, where: str) -> LazyArray:
    """Floating arrays are converted exactly to float32 (ul2lab's parameter dtype); others as stored."""
    import ml_dtypes
    floating = np.issubdtype(lazy.dtype, np.floating) or lazy.dtype == np.dtype(ml_dtypes.bfloat16)
    if not floating:
        return lazy

    def load():
        array = np.asarray(lazy.load())
        if array.dtype == np.uint16:  # version 2 bfloat16 bits
            array = array.view(ml_dtypes.bfloat16)
        if array.shape != lazy.shape:
            raise T5xFormatError(f"{where}: parameter {name} has shape {array.shape}, the checkpoint says "
                                 f"{lazy.shape}; copy the checkpoint again")
        return array.astype(np.float32, copy=False)
    return LazyArray(lazy.shape, np.float32, load)


# ----------------------------------------------------------------------------- writing

def write_checkpoint(model_dir: str, step: int, params: Dict[str, LazyArray]) -> str:
    """Write params as t5x's tensorstore layout, checkpoint_<step>/ (zarr folders + msgpack index), one
    array at a time; returns the step directory. `params` are "/"-joined t5x parameter paths."""
    import tensorstore as ts
    from flax import serialization

    step_dir = os.path.join(model_dir, f"{STEP_PREFIX}{step}")
    os.makedirs(step_dir, exist_ok=True)
    target: Dict[str, Any] = {}
    for name, lazy in params.items():
        stop_if_interrupted()  # a held Ctrl-C stops between arrays
        folder = "target." + name.replace("/", ".")
        spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": folder},
                "metadata": {"compressor": {"id": "gzip"}, "shape": list(lazy.shape),
                             "chunks": _chunk_shape(lazy.shape, _CHUNK_BYTES // 4)}}
        array = np.asarray(lazy.load(), np.float32)
        store = ts.open({**spec, "kvstore": {"driver": "file", "path": os.path.join(step_dir, folder)}},
                        create=True, delete_existing=True).result()
        store.write(array).result()
        del array
        node = target
        keys = name.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = spec  # relative path: t5x resolves it against the checkpoint folder
    index = {"version": VERSION, "optimizer": {"target": target, "state": {"step": np.asarray(step, np.int32)}}}
    atomic_write(os.path.join(step_dir, MSGPACK_FILE), serialization.msgpack_serialize(index))
    return step_dir


def _chunk_shape(shape: tuple, max_elements: int) -> list:
    """The largest chunk of at most max_elements that divides the shape evenly (largest dimensions split
    first), as t5x chooses its zarr chunks."""
    chunk = list(shape)
    while int(np.prod(chunk)) > max_elements:
        axis = int(np.argmax(chunk))
        size = chunk[axis]
        chunk[axis] = next(size // d for d in range(2, size + 1) if size % d == 0)
    return chunk


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}" + ("..." if len(text) > 240 else "")
