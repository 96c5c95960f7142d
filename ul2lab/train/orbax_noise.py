"""Quieting what orbax prints around a failure that ul2lab already reports in one line.

A failed save: each of orbax's writer threads logs the error with a traceback (`silence_failed_writes`).
A failed restore: orbax abandons the sibling reads, and each prints a traceback later, as an unraisable
exception or an asyncio report (`AbandonedReadsQuieted`, active only around that one restore).
"""
import gc
import logging
import os
import sys
import time
import traceback
from typing import Callable


class _FailedWrites(logging.Filter):
    """Drops orbax's (and asyncio's) error records of a failed save, one per writer thread, each with a
    traceback: the trainer reports the failure in one line (SaveFailed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + (str(error) if error is not None else "")
        return not (record.levelno >= logging.ERROR and ".orbax-checkpoint-tmp" in text)


def silence_failed_writes():
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _FailedWrites) for f in logger.filters):
            logger.addFilter(_FailedWrites())


_ORBAX_CODE = f"{os.sep}orbax{os.sep}"


def _is_abandoned_read(unraisable) -> bool:
    """An exception Python cannot raise anywhere, of the kind an orbax restore that failed leaves: the
    sibling reads' coroutines (orbax turns their GeneratorExit into an Exception when they are closed)
    and tensorstore's callbacks into the event loop orbax closed ("Event loop is closed", reported with
    no object: an object's __del__ that raises it names the __del__ and is never taken for one)."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and _ORBAX_CODE in code.co_filename:
        return True
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed")


class _AbandonedReadTasks(logging.Filter):
    """asyncio's reports of the reads of an orbax restore that failed: a task whose exception nobody
    awaited (gather raised the first one) or one still pending when orbax closed its loop."""
    REPORTS = ("Task exception was never retrieved", "Future exception was never retrieved",
               "Task was destroyed but it is pending")

    def __init__(self, quieted: "AbandonedReadsQuieted"):
        super().__init__()
        self.quieted = quieted

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(self.REPORTS) and _ORBAX_CODE in message:
            self.quieted.dropped += 1
            self.quieted.last_drop = time.monotonic()
            return False
        return True


class AbandonedReadsQuieted:
    """Around one orbax restore: when one read fails to decode, orbax abandons the others, and each
    later prints a traceback (hundreds of lines) that says nothing the one-line error does not. While
    the restore runs, and briefly after it failed (until its abandoned reads stop reporting: SETTLE_S
    without one, at most MAX_WAIT_S), those reports are dropped and counted; then every report passes
    again, and one line says how many were dropped. Other unraisable exceptions always pass."""
    SETTLE_S = 1.0  # 0.2 s let a late report through in 1 of 5 runs beside a busy test suite
    MAX_WAIT_S = 5.0

    def __init__(self, log: Callable[[str], None] = None, what: str = "reads that the failed checkpoint restore"):
        self.what = what
        self.dropped = 0
        self.last_drop = 0.0
        self.active = False
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def _hook(self, unraisable):
        if self.active and _is_abandoned_read(unraisable):
            self.dropped += 1
            self.last_drop = time.monotonic()
            return
        self._previous(unraisable)

    def __enter__(self):
        self._previous = sys.unraisablehook
        self._filter = _AbandonedReadTasks(self)
        self.active = True
        sys.unraisablehook = self._hook
        logging.getLogger("asyncio").addFilter(self._filter)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:  # the abandoned reads end now (their coroutines collected) or shortly after
                _release_frames(exc)
                gc.collect()
                self.last_drop = max(self.last_drop, time.monotonic())
                deadline = time.monotonic() + self.MAX_WAIT_S
                while time.monotonic() < deadline and time.monotonic() - self.last_drop < self.SETTLE_S:
                    time.sleep(0.02)
                    gc.collect()
        finally:
            self.active = False  # a hook installed over ours keeps calling it: it only passes reports on
            if sys.unraisablehook == self._hook:
                sys.unraisablehook = self._previous
            logging.getLogger("asyncio").removeFilter(self._filter)
        if self.dropped:
            self._log(f"note: dropped {self.dropped} report{'s' if self.dropped != 1 else ''} of {self.what} "
                      "abandoned (the error says what failed)")
        return False


def _release_frames(error: BaseException):
    """Clears the locals of the finished frames in `error`'s tracebacks (and its causes'): they hold the
    restore's abandoned read coroutines, which would otherwise be closed -- and report -- only when the
    caller lets go of the exception, after the quieting ended. The tracebacks still print as before."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # frames still running (the callers) are left alone
        error = error.__cause__ or error.__context__

