"""Judging the wall clock on a gateway with no real-time clock: one place, used by the
agent, ``status`` and ``doctor``.

A Pi without an RTC starts at whatever time it last saved, or at 1970; NTP may be
unreachable; a wrong clock makes validity dates, schedules, retention and message expiry
all wrong. The clock is therefore judged against a **trusted floor**: the highest time
ever seen from a trusted source, persisted in the event database (meta
``clock_trusted_ms``):

- the office's signed times (a heartbeat's ``issued_at``; any validly signed message's
  ``issued_at`` when it is ahead of us),
- the kernel's NTP sync state (``adjtimex``: synchronised means the wall clock is right),
- the agent's own clock while it is judged ``ok`` (so a standalone gateway's floor
  follows the days that pass).

While a process runs, the floor is carried forward with the monotonic clock from the last
trusted reading, so a jump of the wall clock (either way) is seen at once; across a
restart only the persisted floor is known, and a clock more than ``max_ahead_s`` past it
is judged ``ahead`` until a trusted source confirms it. States: ``ok``, ``unset`` (before
the configured floor date), ``behind`` (earlier than the trusted floor), ``ahead``
(far past it). Anything but ``ok`` stops pruning by age, raises a clock alarm and counts
as stale lists for the offline policy; validity checks keep using the wall clock
(docs/security.md, "A clock attack").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

BEHIND_TOLERANCE_MS = 5 * 60_000
"""A clock this far behind the trusted floor is ``behind`` (the office's own skew
tolerance, protocol.messages.MAX_CLOCK_SKEW_S, is the same)."""
AHEAD_TOLERANCE_MS = 5 * 60_000
"""While running: a clock this far ahead of the floor carried forward is ``ahead``."""
PERSIST_EVERY_MS = 60_000
"""The floor is written back at most once a minute (it only moves forward)."""


class ClockState(StrEnum):
    """How far the wall clock can be believed."""

    OK = "ok"
    UNSET = "unset"
    BEHIND = "behind"
    AHEAD = "ahead"


class FloorStore(Protocol):
    """Where the trusted floor is kept (the event database's meta table)."""

    def meta(self, key: str) -> str | None:
        """A stored value."""
        ...

    def set_meta(self, key: str, value: str) -> None:
        """Store a value."""
        ...


@dataclass(frozen=True, slots=True)
class Judgement:
    """The clock's state and what it was judged against."""

    state: ClockState
    now_ms: int
    trusted_ms: int | None
    """The trusted floor (carried forward while running), or None if never seen."""
    source: str | None

    @property
    def offset_s(self) -> int | None:
        """How far the wall clock is from the trusted floor (positive: ahead)."""
        return None if self.trusted_ms is None else (self.now_ms - self.trusted_ms) // 1000


def ntp_synchronised() -> bool | None:
    """Whether the kernel says its clock is NTP-synchronised (``adjtimex``), or None when
    that cannot be asked."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None

    class Timex(ctypes.Structure):
        # struct timex (linux/timex.h): the fields up to status, then room for the rest.
        _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long),
                    ("freq", ctypes.c_long), ("maxerror", ctypes.c_long),
                    ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                    ("rest", ctypes.c_byte * 256)]

    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        tx = Timex()
        state = int(libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
        return None
    sta_unsync, time_error = 0x0040, 5
    return state != time_error and not tx.status & sta_unsync


class ClockJudge:
    """The one judge of the wall clock (thread-safe)."""

    def __init__(self, store: FloorStore, *, floor: datetime, max_ahead_s: int,
                 trust_ntp: bool = True, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 ntp: Callable[[], bool | None] = ntp_synchronised) -> None:
        self._store = store
        self._floor_ms = int(floor.timestamp() * 1000)
        self._max_ahead_ms = max_ahead_s * 1000
        self._trust_ntp = trust_ntp
        self._wall = wall
        self._mono = monotonic
        self._ntp = ntp
        self._lock = threading.Lock()
        stored = store.meta("clock_trusted_ms")
        self._trusted = int(stored) if stored and stored.isdigit() else None
        self._source = store.meta("clock_trusted_source")
        self._persisted = self._trusted
        self._anchor: tuple[int, float] | None = None
        """(trusted ms, monotonic s) of the last trusted reading in this process."""
        self.last: Judgement | None = None

    def observe(self, trusted_ms: int, source: str) -> None:
        """A trusted source (``office``, ``ntp``) says the time is ``trusted_ms``: it
        replaces the floor, even a lower one (a floor raised by a clock that was wrong
        must not outlive the correction)."""
        with self._lock:
            self._trusted, self._source = trusted_ms, source
            self._anchor = (trusted_ms, self._mono())
            # NTP is asked at every judgement: its readings are written once a minute.
            if source != "ntp" or self._persisted is None or \
                    abs(trusted_ms - self._persisted) >= PERSIST_EVERY_MS:
                self._persist()

    def _persist(self) -> None:
        self._store.set_meta("clock_trusted_ms", str(self._trusted))
        self._store.set_meta("clock_trusted_source", self._source or "")
        self._persisted = self._trusted

    def _raise(self, ms: int, source: str) -> None:
        if self._trusted is None or ms > self._trusted:
            self._trusted, self._source = ms, source
        if self._persisted is None or (self._trusted or 0) - self._persisted >= \
                PERSIST_EVERY_MS:
            self._persist()

    def expected_ms(self) -> int | None:
        """The trusted floor carried forward to now (None if never seen)."""
        if self._anchor is not None:
            ms, at = self._anchor
            return max(ms + int((self._mono() - at) * 1000), self._trusted or 0)
        return self._trusted

    def judge(self) -> Judgement:
        """Judge the wall clock now (and move the floor forward when it is ``ok``)."""
        now = int(self._wall() * 1000)
        if self._trust_ntp and self._ntp():
            self.observe(now, "ntp")
        with self._lock:
            expected = self.expected_ms()
            if now < self._floor_ms:
                state = ClockState.UNSET
            elif expected is not None and now < expected - BEHIND_TOLERANCE_MS:
                state = ClockState.BEHIND
            elif expected is not None and now > expected + (
                    AHEAD_TOLERANCE_MS if self._anchor is not None else self._max_ahead_ms):
                # Running, the floor moves with the monotonic clock and any jump shows;
                # after a restart only a clock far past the stored floor is suspect.
                state = ClockState.AHEAD
            else:
                state = ClockState.OK
                self._raise(now, "own")
                if self._anchor is None:
                    # From here on a jump is measured against the monotonic clock.
                    self._anchor = (now, self._mono())
            self.last = Judgement(state, now, expected, self._source)
            return self.last

    @property
    def state(self) -> ClockState:
        """The state of the latest judgement (``ok`` before the first)."""
        return ClockState.OK if self.last is None else self.last.state
