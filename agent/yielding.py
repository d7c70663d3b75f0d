"""The card path first: background work steps aside while a card is being decided.

On a gateway's few cores a decision competes for the interpreter lock with the sync
worker, which parses and applies list messages in Python. A decision takes the lock back
after each of its SQLite calls; with the worker busy each of those waits up to the switch
interval, and a flood of list work (a million-entry snapshot, a hundred thousand
revocations) made single decisions wait tens of milliseconds (bench/load.py). So the card
path says when it is busy (``CardPath``, entered by every read) and the worker, before
each message and between the steps of a long one, sleeps while it is: sleeping releases
the lock. The wait is bounded (``YIELD_MAX_S``), so a stream of taps cannot stall sync.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

YIELD_MAX_S = 0.005
"""The longest the worker waits for the card path at one step."""
POLL_S = 0.0002


class CardPath:
    """How many card reads are being decided now (a context manager per read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def __enter__(self) -> CardPath:
        with self._lock:
            self._count += 1
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._lock:
            self._count -= 1

    @property
    def busy(self) -> bool:
        """Whether a card is being decided."""
        return self._count > 0

    def wait_idle(self, limit_s: float = YIELD_MAX_S) -> float:
        """Sleep while a card is being decided, at most ``limit_s``; the seconds waited."""
        if not self._count:
            return 0.0
        start = time.monotonic()
        deadline = start + limit_s
        while self._count and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return time.monotonic() - start
