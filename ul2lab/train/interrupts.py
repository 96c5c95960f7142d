"""Stopping a run cleanly at any point: SIGTERM (preemption) and SIGINT (Ctrl-C) become a request to
save and stop, and the loop waits for data in a way a signal can interrupt.

A Python signal handler only runs between bytecodes of the main thread; a main thread blocked in
the data pipeline's C++ (tf.data producing an example, or never producing one) would never run it.
So batches are drawn by a background thread (`DataFeed`) and the loop waits on a queue with a short
timeout, checking the stop request between waits. A second Ctrl-C interrupts at once (the usual
"I mean it"), raising KeyboardInterrupt.
"""
import queue
import signal
import threading
from typing import Iterator, Optional

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}


class StopRequests:
    """Installs SIGTERM and SIGINT handlers (main thread only) that record a request to stop;
    `restore()` gives the previous handlers back."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}
        for signum in SIGNAL_NAMES:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handlers, a signal then stops the process
                pass

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return SIGNAL_NAMES.get(self.signal, f"signal {self.signal}")

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        if self.signal is None:
            self.signal = signum
            print(f"{SIGNAL_NAMES[signum]} received: stopping after the current step (saving it)"
                  + ("; press Ctrl-C again to stop at once without saving" if signum == signal.SIGINT else ""),
                  flush=True)

    def restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class DataFeed:
    """Items of `iterator`, drawn in order by a daemon thread `depth` ahead of the consumer.

    `get(stop)` returns the next item, or None when `stop.requested` became true while waiting;
    the iterator's end is StopIteration and its errors are raised here, in the consumer's thread.
    """
    _END = object()

    def __init__(self, iterator: Iterator, depth: int = 2):
        self._iterator = iterator
        self._queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ul2lab-data-feed", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for item in self._iterator:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # noqa: BLE001  handed to the consumer, which raises it
            self._put((None, e))

    def _put(self, entry) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, stop: Optional[StopRequests] = None, poll_seconds: float = 0.1):
        while True:
            if stop is not None and stop.requested:
                return None
            try:
                item, error = self._queue.get(timeout=poll_seconds)
            except queue.Empty:
                continue
            if error is not None:
                raise error
            if item is self._END:
                raise StopIteration
            return item

    def close(self):
        """Stop drawing; a thread blocked inside the iterator is left to end with the process."""
        self._closed.set()
