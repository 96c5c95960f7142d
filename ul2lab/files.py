"""Writing a file so that no reader ever sees half of it: the one atomic writer of the project.

The data goes to a temporary file of a unique name beside the target (same filesystem), is
flushed to disk, and replaces the target with one rename: a crash or a full disk leaves the old
file whole and no temporary behind. A replaced file keeps its permissions; a new one gets the usual
ones (0666 less the umask) whatever the writer used (safetensors, like mkstemp, creates 0600 files
others cannot read). Imports nothing but the standard library.
"""
import contextlib
import json
import os
import stat
import uuid
from typing import Any, Iterator, Union


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path to write `path`'s new content to; on success it replaces `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # a name of its own per writer, so two writers never rename each other's half file
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; set back at once
    os.umask(mask)
    return mask


def atomic_write(path: str, data: Union[str, bytes]):
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_write_json(path: str, payload: Any):
    """Write `payload` as indented, key-sorted JSON (plus a newline) atomically."""
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
