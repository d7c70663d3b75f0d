"""The sync worker's inbox: what paho's network thread hands over, in the order to take it.

Two lanes. The **urgent** lane holds connection changes and the small messages that take
access away or confirm delivery (revocations on ``rev`` and ``all``, commands, enrollment
decisions, event acks, the gateway's own status echo); the worker always takes them
first. The **bulk** lane holds the ``list`` stream (snapshot manifests, chunks, deltas)
and heartbeats (which vouch for list versions, so they stay behind the list messages that
came before them), in arrival order.

A snapshot of a million entries arrives as hundreds of chunks within seconds, far faster
than the worker stages them. Held in memory they cost the agent 130 MB and more; blocking
paho's thread instead would hold back the revocations queued behind them on the same
connection (MQTT delivers one connection's messages in order). So the bulk lane keeps at
most ``memory_bytes`` of payloads in memory and writes the rest to files in ``spool``
(page cache, not the agent's resident set; no fsync: a spooled message lost in a crash is
a chunk lost, and the snapshot it belongs to is asked for again, docs/protocol.md). Files
left by an earlier run are deleted when the inbox is made. If a file cannot be written
(a full disk), the payload stays in memory: nothing is dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()

BULK_STREAMS = frozenset({"list", "hb"})
"""Streams that take the bulk lane (``protocol.topics.stream_of`` names)."""
MEMORY_BYTES = 2 * 1024 * 1024
"""The default bound on bulk payloads held in memory (more goes to the spool)."""


class Inbox:
    """A two-lane queue: ``put`` from paho's thread, ``get`` from the worker's."""

    def __init__(self, spool: Path | None, *, memory_bytes: int = MEMORY_BYTES) -> None:
        self._urgent: deque[tuple[Any, ...]] = deque()
        self._bulk: deque[tuple[str, bytes | Path]] = deque()
        self._held = 0
        """Bytes of bulk payloads in memory."""
        self._memory_bytes = memory_bytes
        self._spool = spool
        self._names = itertools.count()
        self._cond = threading.Condition()
        self.spooled = 0
        """Messages written to the spool since the inbox was made (for tests and status)."""
        self.bulk_taken = 0
        """Bulk messages taken since the inbox was made."""
        if spool is not None:
            self._clear_spool(spool)

    @staticmethod
    def _clear_spool(spool: Path) -> None:
        try:
            spool.mkdir(mode=0o700, exist_ok=True)
            for leftover in spool.glob("*.msg"):
                leftover.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("sync_spool_unusable", path=str(spool), error=str(exc))

    def put(self, item: tuple[Any, ...]) -> None:
        """An urgent item: a connection change or an urgent message."""
        with self._cond:
            self._urgent.append(item)
            self._cond.notify()

    def put_bulk(self, topic: str, payload: bytes) -> None:
        """A bulk message: in memory while under the bound, else spooled to a file."""
        spooled: Path | None = None
        with self._cond:
            keep = self._held + len(payload) <= self._memory_bytes or self._spool is None
        if not keep and self._spool is not None:
            spooled = self._write(self._spool, payload)
        with self._cond:
            if spooled is None:
                self._held += len(payload)
                self._bulk.append((topic, payload))
            else:
                self.spooled += 1
                self._bulk.append((topic, spooled))
            self._cond.notify()

    def _write(self, spool: Path, payload: bytes) -> Path | None:
        path = spool / f"{next(self._names):012d}.msg"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            log.warning("sync_spool_write_failed", path=str(path), error=str(exc))
            return None
        return path

    def get(self, timeout: float) -> tuple[Any, ...] | None:
        """The next item, urgent first; None if there was none within ``timeout``."""
        with self._cond:
            if not self._urgent and not self._bulk:
                self._cond.wait(timeout)
            if self._urgent:
                return self._urgent.popleft()
            if not self._bulk:
                return None
            self.bulk_taken += 1
            topic, held = self._bulk.popleft()
            if isinstance(held, bytes):
                self._held -= len(held)
                return ("message", topic, held)
        return ("message", topic, self._read(held))

    def take_urgent(self) -> tuple[Any, ...] | None:
        """The next urgent item if it is a message, without waiting; None otherwise (for
        the worker between the steps of a long bulk item)."""
        with self._cond:
            if self._urgent and self._urgent[0][0] == "message":
                return self._urgent.popleft()
            return None

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            # The payload is gone; an empty one is refused as malformed by the applier,
            # which then treats it as any lost chunk (the snapshot is asked for again).
            log.error("sync_spool_read_failed", path=str(path), error=str(exc))
            return b""
        finally:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def pending(self) -> tuple[int, int]:
        """``(urgent, bulk)`` items waiting."""
        with self._cond:
            return len(self._urgent), len(self._bulk)

    def held_bytes(self) -> int:
        """Bulk payload bytes held in memory."""
        with self._cond:
            return self._held
