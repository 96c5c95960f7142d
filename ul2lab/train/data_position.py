"""The data position of a run, per host: saved in every checkpoint, restored on resume in constant time.

The train floor never imports TensorFlow or seqio, so it does not know what a position is: it asks
the batches object. `batches(skip)` (ul2lab.data.pipeline.train_batches) returns an iterator that
may also have

    save_position() -> bytes | None    this host's position after the last batch drawn
    restore_position(bytes)            continue from such a position (ValueError if it does not fit)
    unsaveable: str | None             why save_position() returned None

(ul2lab.data.host_batches.HostBatches: the tf.data iterator's checkpoint, as t5x saves per host).
The loop stores the bytes in the orbax step as item `data`, one file per host
(`<step>/data/host-<i>-of-<n>.bin`, HostBytesHandler), next to the run record that counts the
batches drawn. On resume, the position is restored when there is one that fits; otherwise (a
plain generator, a pipeline TensorFlow cannot checkpoint, another number of hosts, a checkpoint
from before positions were saved) the batches already drawn are replayed, `batches(drawn)`, which
is exact too but takes time that grows with the step; one line says which and why.
"""
import dataclasses
import os
import tempfile
from typing import Callable, Iterator, List, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future

from ul2lab.errors import UserError

ITEM = "data"


def host_file_name(index: Optional[int] = None, count: Optional[int] = None) -> str:
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return f"host-{index}-of-{count}.bin"


def saves_positions(data) -> bool:
    """Whether the batches object can save its position at all (the same answer on every host)."""
    return callable(getattr(data, "save_position", None))


def position_of(data) -> Optional[bytes]:
    """This host's position, or None (the batches cannot save one)."""
    return data.save_position() if saves_positions(data) else None


def resume(batches: Callable[[int], Iterator[dict]], data, drawn: int, position: Optional[bytes],
           log=print) -> Iterator[dict]:
    """The batches after the `drawn` ones of a restored step: `data` (fresh, from batches(0)) moved
    to the saved `position` in constant time when it fits, else batches(drawn), a replay."""
    if drawn == 0:
        return data
    if position is not None and callable(getattr(data, "restore_position", None)):
        try:
            data.restore_position(position)
        except ValueError as e:
            why = f"the saved data position of this host cannot be used: {e}"
        except OSError as e:  # unpacked into temporary files: a full disk or a file-size limit (ulimit -f)
            raise UserError(
                f"the data position saved after batch {drawn} cannot be unpacked into the temporary folder "
                f"{tempfile.gettempdir()} ({e.strerror or e}); free space there (or set TMPDIR to a folder "
                "with room) and raise the file-size limit (ulimit -f) if one is set, then rerun the same "
                "command to resume") from None
        else:
            log(f"restored the data position after batch {drawn} (nothing replayed)", flush=True)
            return data
    elif not saves_positions(data):
        why = "the batches have no savable position"
    elif getattr(data, "unsaveable", None):
        why = f"the data pipeline cannot be checkpointed ({data.unsaveable})"
    else:
        why = (f"the checkpoint holds no data position for host {jax.process_index()} of "
               f"{jax.process_count()} (written by another number of hosts, or before positions were saved)")
    log(f"note: replaying the {drawn} batches already drawn to reach the data position, since {why}; "
        "this takes time that grows with the step (a cached task, `ul2lab cache`, resumes in constant time)",
        flush=True)
    return batches(drawn)


def warn_unsaveable(data, log=print):
    """One line, the first time a checkpoint finds the data position cannot be saved."""
    log(f"note: the data position is not saved with the checkpoints ({data.unsaveable}); a resumed run "
        "will replay the batches already drawn", flush=True)


# ---------------------------------------------------------------------------------------------
# The orbax item: one file per host.

class HostBytesHandler(ocp.AsyncCheckpointHandler):
    """Every process writes its own bytes (or nothing, for None) as host-<i>-of-<n>.bin, and reads
    back its own file (None if there is none)."""

    async def _write(self, directory: epath.Path, data: Optional[bytes]):
        self._write_sync(directory, data)

    async def async_save(self, directory: epath.Path, args: "HostBytesSave") -> Optional[List[future.Future]]:
        return [future.CommitFutureAwaitingContractedSignals(self._write(directory, args.data),
                                                             name="ul2lab_host_bytes_save")]

    def save(self, directory: epath.Path, args: "HostBytesSave"):
        self._write_sync(directory, args.data)

    def _write_sync(self, directory: epath.Path, data: Optional[bytes]):
        if data is not None:
            (directory / host_file_name()).write_bytes(data)

    def restore(self, directory: epath.Path, args: Optional["HostBytesRestore"] = None) -> Optional[bytes]:
        path = directory / host_file_name()
        return path.read_bytes() if path.exists() else None

    def close(self):
        pass


@ocp.args.register_with_handler(HostBytesHandler, for_save=True)
@dataclasses.dataclass
class HostBytesSave(ocp.args.CheckpointArgs):
    data: Optional[bytes]


@ocp.args.register_with_handler(HostBytesHandler, for_restore=True)
@dataclasses.dataclass
class HostBytesRestore(ocp.args.CheckpointArgs):
    pass


def has_item(directory: str, step: int) -> bool:
    return os.path.isdir(os.path.join(directory, str(step), ITEM))
