"""A host's batches as an iterator whose position can be saved and restored in constant time.

The training loop (ul2lab.train.loop, which never imports TensorFlow) draws numpy batches from a
`HostBatches` and, at every checkpoint, asks it for its position as bytes
(`save_position()`), which it stores per host in the orbax step; a resumed run hands those bytes
back (`restore_position(...)`) and the next batch is the one an uninterrupted run would have drawn.

The position is the tf.data iterator's own checkpoint (as t5x saves its input iterators per host):
shuffle buffers, mixture sampling, packing state and the read offsets of every file, so nothing is
replayed. A pipeline that TensorFlow cannot checkpoint (a `tf.data.Dataset.from_generator`
source, for instance) has no position: `save_position()` returns None, `unsaveable` says why,
and the loop replays the batches already drawn instead (time that grows with the step).

The bytes are a zip of the tf.train.Checkpoint files plus `position.json`, which describes the
pipeline that wrote them (task, lengths, batch rows, seed, shard); a position of another pipeline
is refused with a ValueError naming both, and the loop replays instead.
"""
import io
import json
import os
import re
import tempfile
import zipfile
from typing import Any, Mapping, Optional

import tensorflow as tf

POSITION_FILE = "position.json"
_PREFIX = "iterator"


class HostBatches:
    """Numpy batches (dicts of arrays) of a tf.data dataset, with a savable position.

    `description` names the pipeline (any JSON-able dict); a position restores only into a
    HostBatches of an equal description.
    """

    def __init__(self, dataset: tf.data.Dataset, description: Mapping[str, Any]):
        self.dataset = dataset
        self.description = json.loads(json.dumps(dict(description)))  # JSON-normalized, as saved
        self.unsaveable: Optional[str] = None  # why the position cannot be saved, once known
        self._iterator = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: v.numpy() for k, v in next(self._iterator).items()}

    def save_position(self) -> Optional[bytes]:
        """The iterator's position (after the last batch drawn), or None when this pipeline cannot
        be checkpointed (`unsaveable` then says why; asked once, not at every checkpoint)."""
        if self.unsaveable is not None:
            return None
        with tempfile.TemporaryDirectory(prefix="ul2lab-position-") as tmp:
            try:
                tf.train.Checkpoint(iterator=self._iterator).write(os.path.join(tmp, _PREFIX))
            except (tf.errors.UnimplementedError, tf.errors.FailedPreconditionError) as e:
                self.unsaveable = _why_unsaveable(e.message)
                return None
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
                archive.writestr(POSITION_FILE, json.dumps(self.description, sort_keys=True))
                for name in sorted(os.listdir(tmp)):
                    archive.write(os.path.join(tmp, name), name)
        return buffer.getvalue()

    def restore_position(self, position: bytes):
        """Continue from a position saved by `save_position` of the same pipeline; a ValueError
        (naming what differs) for bytes of another pipeline or bytes that are not a position."""
        try:
            archive = zipfile.ZipFile(io.BytesIO(position))
            saved = json.loads(archive.read(POSITION_FILE))
        except (zipfile.BadZipFile, KeyError, ValueError) as e:
            raise ValueError(f"the saved data position is not readable ({e})") from None
        if saved != self.description:
            differ = sorted(k for k in set(saved) | set(self.description)
                            if saved.get(k) != self.description.get(k))
            raise ValueError("it was saved by another data pipeline (" + "; ".join(
                f"{k}: {saved.get(k)!r} then, {self.description.get(k)!r} now" for k in differ) + ")")
        with tempfile.TemporaryDirectory(prefix="ul2lab-position-") as tmp:
            archive.extractall(tmp)
            iterator = iter(self.dataset)
            try:
                tf.train.Checkpoint(iterator=iterator).read(os.path.join(tmp, _PREFIX)).assert_consumed()
            except (tf.errors.OpError, AssertionError, ValueError) as e:
                message = e.message if isinstance(e, tf.errors.OpError) else str(e)
                raise ValueError(f"the saved data position does not fit this pipeline "
                                 f"({_first_line(message)})") from None
        self._iterator = iterator


def _why_unsaveable(message: str) -> str:
    message = _first_line(re.sub(r"\{\{function_node [^}]*\}\}", "", message).replace("[Op:SerializeIterator]", ""))
    if "Generator" in message or "PyFunc is stateful" in message:
        return ("a source of the pipeline is a Python generator (tf.data.Dataset.from_generator), which "
                f"TensorFlow cannot checkpoint: {message}")
    return f"TensorFlow cannot checkpoint this pipeline: {message}"


def _first_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:300] + ("..." if len(text) > 300 else "")
