"""One live run per MODEL_DIR: a second `ul2lab train` / `anneal` into a directory a live run is
writing is refused with one line, instead of the two overwriting each other's checkpoints.

The lock is fcntl.flock on MODEL_DIR/.ul2lab-lock-host-<i> (i: this process's index), held while
the run lasts. The kernel drops a flock when its process ends, however it ends (kill -9 included),
so a killed run never leaves MODEL_DIR locked: the same command resumes at once. One file per
process index: on a pod every host writes the same MODEL_DIR, and host 1 must not find itself
locked out by host 0 of its own run; a second run's host i meets the first run's host i.

Remote MODEL_DIRs (gs://...) and filesystems without flock are not locked (nothing to lock with).
"""
import contextlib
import errno
import os
from typing import Iterator, Optional

import jax

from ul2lab.errors import UserError

LOCK_FILE = ".ul2lab-lock-host-{index}"


class ModelDirInUse(UserError):
    """Another live process holds this MODEL_DIR."""


class ModelDirLock:
    """flock on the lock file of `model_dir`, taken by `acquire()` (again is a no-op), let go by `release()`."""

    def __init__(self, model_dir: str, name: str = "MODEL_DIR"):
        self.model_dir, self.name = model_dir, name
        self.path = os.path.join(os.path.abspath(model_dir), LOCK_FILE.format(index=jax.process_index()))
        self._fd: Optional[int] = None

    def acquire(self, create_dir: bool = True):
        """Lock (making MODEL_DIR first when create_dir; otherwise a MODEL_DIR that does not exist yet
        is left alone: no other run is in it). ModelDirInUse when a live process holds the lock."""
        if not self.model_dir or "://" in self.model_dir or (not create_dir and not os.path.isdir(self.model_dir)):
            return
        if self._fd is not None:
            if create_dir:
                self._write_holder()
            return
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ModelDirInUse(
                    f"{self.name} {self.model_dir} is in use by another live run{holder}: two runs into one "
                    f"directory overwrite each other's checkpoints. Wait for it to end (or stop it), or "
                    f"choose another {self.name}") from None
            if e.errno in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return  # a filesystem without locks: run unlocked, as before
            raise
        self._fd = fd
        if create_dir:
            self._write_holder()
        elif os.fstat(fd).st_size:  # the holder line of a run that was killed: no longer true
            os.ftruncate(fd, 0)

    def _write_holder(self):
        """Who holds the lock, for the refusal's message; written when the run starts writing (the
        lock taken before the checks writes nothing into MODEL_DIR)."""
        holder = f"pid {os.getpid()} on {os.uname().nodename}\n".encode()
        if os.pread(self._fd, 200, 0) != holder:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, holder, 0)

    def release(self):
        if self._fd is not None:
            if os.fstat(self._fd).st_size:  # no holder line once the run is over (a refused run changes nothing)
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    """" (pid P on HOST)" as the holder wrote it, or ""."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


@contextlib.contextmanager
def locked(model_dir: str, name: str = "MODEL_DIR") -> Iterator[ModelDirLock]:
    """The lock of model_dir, released on exit. It is taken at once if MODEL_DIR exists (a second run is
    refused before any work); call `.acquire()` again when the run first writes (it then makes the directory)."""
    lock = ModelDirLock(model_dir, name)
    try:
        lock.acquire(create_dir=False)
        yield lock
    finally:
        lock.release()
