"""What the data readers skip: counted by kind, the first of each kind said in one line, and one
summary line for a run to print.

Data problems repeat: a corpus can hold hundreds of unreadable tables, and every epoch meets them
again. One warning per item buried the progress lines of `ul2lab demo` (173 of them), so each kind of
skip is said once, with its first example, and counted; every item is still logged at debug level.
"""
import collections
import logging
import threading
from typing import MutableMapping, Optional

_lock = threading.Lock()
COUNTS: collections.Counter = collections.Counter()  # kind -> items skipped in this process


def skipped(kind: str, detail: str, counter: Optional[MutableMapping] = None,
            key: Optional[str] = None, count: int = 1) -> None:
    """Counts `count` skipped items of `kind` (a plural noun phrase: "unreadable tables"), also in
    `counter[key]` when given (the reader's own statistics); warns on the first of its kind."""
    with _lock:
        first = COUNTS[kind] == 0
        COUNTS[kind] += count
        if counter is not None:
            counter[key or kind] += count
    if first:
        logging.warning("Skipping %s, e.g. %s (more are counted, not listed: see the summary line)",
                        kind, detail)
    else:
        logging.debug("Skipping %s: %s", kind, detail)


def reset() -> None:
    """Forgets the counts (a new run in the same process, a test)."""
    with _lock:
        COUNTS.clear()


def summary() -> str:
    """One line naming every kind of skip and its count, or "" when nothing was skipped."""
    with _lock:
        counts = sorted(COUNTS.items(), key=lambda item: (-item[1], item[0]))
    if not counts:
        return ""
    return "skipped while reading the data: " + ", ".join(f"{n:,} {kind}" for kind, n in counts)
