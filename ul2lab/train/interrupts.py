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
    """Items of `iterator`, drawn in order by a daemon thread, so the consumer can stop while waiting.

    `get(stop)` returns the next item, or None when `stop.requested` became true while waiting;
    the iterator's end is StopIteration and its errors are raised here, in the consumer's thread.
    With depth N > 0 the thread draws up to N items ahead; with depth 0 it draws one only when asked
    (`get`), so between two `get`s the iterator has given out exactly the items consumed: the trainer
    saves the iterator's position with a step. `busy` is true while an asked-for item is being drawn.
    """
    _END = object()

    def __init__(self, iterator: Iterator, depth: int = 2):
        self._iterator = iterator
        self._on_demand = depth == 0
        self._queue = queue.Queue(maxsize=max(depth, 1))
        self._wanted = threading.Semaphore(0)
        self._asked = False  # on demand: an item was asked for and not yet handed out
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ul2lab-data-feed", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._asked

    def _run(self):
        try:
            while True:
                if self._on_demand:
                    while not self._wanted.acquire(timeout=0.1):
                        if self._closed.is_set():
                            return
                try:
                    item = next(self._iterator)
                except StopIteration:
                    self._put((self._END, None))
                    return
                if not self._put((item, None)):
                    return
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
        if self._on_demand and not self._asked:
            self._asked = True
            self._wanted.release()
        while True:
            if stop is not None and stop.requested:
                return None
            try:
                item, error = self._queue.get(timeout=poll_seconds)
            except queue.Empty:
                continue
            self._asked = False
            if error is not None:
                raise error
            if item is self._END:
                raise StopIteration
            return item

    def close(self):
        """Stop drawing; a thread blocked inside the iterator is left to end with the process."""
        self._closed.set()
