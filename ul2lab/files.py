"""Writing a file so that no reader ever sees half of it: the one atomic writer of the project.
Also: moving a folder written beside its target into place (`replace_in_folder`), and holding
Ctrl-C while such a move runs (`interrupts_held`).

The data goes to a temporary file of a unique name beside the target (same filesystem), is
flushed to disk, and replaces the target with one rename: a crash or a full disk leaves the old
file whole and no temporary behind. A replaced file keeps its permissions; a new one gets the usual
ones (0666 less the umask) whatever the writer used (safetensors, like mkstemp, creates 0600 files
others cannot read). Imports nothing but the standard library.
"""
import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
import uuid
from typing import Any, Callable, Iterator, Union


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


_held_interrupts = []  # Ctrl-Cs received inside `interrupts_held` blocks, not yet acted on


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) during the block is held until the block ends (or `stop_if_interrupted` acts on it),
    then delivered to the handler it would have reached: a folder being written beside its target is
    removed, a move of several entries into place is never cut in half, and no KeyboardInterrupt is
    raised inside library code that cannot take one. Only the main thread receives signals, so
    elsewhere this holds nothing; nested blocks hold until the outermost ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if _held_interrupts and previous is not _hold:
            _held_interrupts.clear()
            signal.raise_signal(signal.SIGINT)


def _hold(signum, frame):
    _held_interrupts.append(signum)


def stop_if_interrupted():
    """Raise KeyboardInterrupt if a Ctrl-C is held: called between the steps of a long write."""
    if _held_interrupts:
        _held_interrupts.clear()
        raise KeyboardInterrupt


def replace_in_folder(staged: str, target: str, replaces: Callable[[str], bool]):
    """Move every entry of the folder `staged` into `target` (which need not exist), replacing the
    target's entries of the same names and those `replaces(name)` names (what an earlier write of
    the same kind left, e.g. weight shards a smaller export no longer has); every other entry of
    `target` stays. Ctrl-C is held meanwhile; an OSError puts `target` back as it was. `staged`
    is gone afterwards (moved, or removed)."""
    with interrupts_held():
        if not os.path.isdir(target) or not os.listdir(target):
            if os.path.isdir(target):
                os.rmdir(target)
            os.rename(staged, target)  # one rename: the folder appears whole
            return
        new = sorted(os.listdir(staged))
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".old",
                                 dir=os.path.dirname(os.path.abspath(target)))
        moved_aside, moved_in = [], []
        try:
            for name in sorted(os.listdir(target)):
                if name in new or replaces(name):
                    os.rename(os.path.join(target, name), os.path.join(aside, name))
                    moved_aside.append(name)
            for name in new:
                os.rename(os.path.join(staged, name), os.path.join(target, name))
                moved_in.append(name)
        except OSError:
            for name in moved_in:
                os.rename(os.path.join(target, name), os.path.join(staged, name))
            for name in moved_aside:
                os.rename(os.path.join(aside, name), os.path.join(target, name))
            shutil.rmtree(aside, ignore_errors=True)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)
