"""Retention at the office: old events folded into daily counts per gateway, then deleted
(docs/privacy.md, "Retention").

``permitgate-central retention --days N`` does it at once; with ``--auto`` the setting is
kept in ``central.db`` and ``serve`` applies it every hour, one batch of events per turn
of its loop so that receiving never waits long. Events older than the start of the day N
days before today (in the office's time zone) are counted per gateway and day (granted
entries, granted exits, denials, everything else) in ``daily_counts`` and deleted, in one
transaction per batch. Like the gateway's own pruning, only a prefix of each gateway's
chain goes (up to its first recent event), never past ``acked_upto`` and never a tenant
event not yet acted on. Enrollments rejected or ended before the same moment lose their
permit number and its hash.

The gateway's retention is its own (``store.event_retention_days``, default 180, acked
events only, agent/store.py ``prune``): set it to N or less on every gateway and no event
outlives N days anywhere but in the daily counts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from provisioning.db import OfficeDatabase
from provisioning.errors import CentralUsageError

log = structlog.get_logger()

RETENTION_KEY = "retention_days"
"""The setting ``serve`` applies (office settings, ``central.db`` meta)."""
LAST_RUN_KEY = "retention_last_ms"
"""When ``serve`` last finished applying it (wall-clock ms)."""
MIN_DAYS, MAX_DAYS = 1, 3650
FOLD_BATCH = 20_000
"""Events per retention transaction: tens of milliseconds, so ``serve``'s loop, which
runs one batch per turn, keeps receiving in between."""
AUTO_EVERY_S = 3600.0
"""``serve`` applies the setting once an hour."""
CHECK_EVERY_S = 60.0
"""``serve`` reads the setting at most once a minute."""


def local_offset_s(at: float) -> int:
    """The office's time zone offset from UTC at ``at`` (Unix s), in seconds: days are
    counted in that zone (``TZ`` chooses it)."""
    offset = datetime.fromtimestamp(at).astimezone().utcoffset()
    return 0 if offset is None else int(offset.total_seconds())


def check_days(days: int) -> int:
    """``days`` if it is a retention period the office accepts."""
    if not MIN_DAYS <= days <= MAX_DAYS:
        raise CentralUsageError(f"--days {days}: from {MIN_DAYS} to {MAX_DAYS}")
    return days


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """What one application of retention did."""

    days: int
    before_ms: int
    """Events before this instant (the start of a day) went."""
    folded: int
    deleted: int
    erased: int
    """Enrollments whose permit number was dropped."""


class Retention:
    """Retention of events and permit numbers at the office (see the module docstring)."""

    def __init__(self, db: OfficeDatabase, *, clock: Callable[[], float] = time.time,
                 offset_s: Callable[[float], int] = local_offset_s,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._clock = clock
        self._offset_s = offset_s
        self._monotonic = monotonic
        self._next_check = 0.0
        self._pass: _Pass | None = None

    # -- the setting -----------------------------------------------------------------------

    def setting(self) -> int | None:
        """The days ``serve`` keeps events for, or None (``serve`` deletes nothing)."""
        value = self._db.meta(RETENTION_KEY)
        return None if value is None or not value.isdigit() else int(value)

    def set_setting(self, days: int | None) -> None:
        """Keep ``days`` as the setting (None: ``serve`` stops applying one)."""
        self._db.set_meta(RETENTION_KEY, "" if days is None else str(check_days(days)))
        self._next_check = 0.0

    def last_run_ms(self) -> int | None:
        """When ``serve`` last finished applying the setting."""
        value = self._db.meta(LAST_RUN_KEY)
        return int(value) if value else None

    def before_ms(self, days: int) -> int:
        """The start (in the office's zone) of the day ``days`` days before today: events
        before it go. Today and the ``days`` whole days before it stay."""
        now = self._clock()
        offset = self._offset_s(now)
        first_kept = (int(now) + offset) // 86_400 - days
        return (first_kept * 86_400 - offset) * 1000

    # -- applying it -----------------------------------------------------------------------

    def run(self, days: int) -> RetentionResult:
        """Fold and delete every gateway's events older than ``days`` days, and drop the
        permit numbers of enrollments that ended before then; at once."""
        check_days(days)
        before = self.before_ms(days)
        offset = self._offset_s(self._clock())
        folded = deleted = 0
        for gateway in self._db.gateway_ids():
            while True:
                step = self._db.fold_events(gateway, before, offset, FOLD_BATCH)
                folded += step.folded
                deleted += step.deleted
                if not step.more:
                    break
        erased = self._db.erase_ended_permits(before)
        log.info("retention_applied", days=days, folded=folded, deleted=deleted,
                 erased=erased)
        return RetentionResult(days, before, folded, deleted, erased)

    def chore(self) -> None:
        """For ``serve``'s loop: when the setting is on and an hour has passed since the
        last pass, do the next batch of a pass (one transaction), else nothing."""
        if self._pass is None:
            now = self._monotonic()
            if now < self._next_check:
                return
            self._next_check = now + CHECK_EVERY_S
            days = self.setting()
            if days is None:
                return
            last = self.last_run_ms()
            if last is not None and self._clock() * 1000 - last < AUTO_EVERY_S * 1000:
                return
            self._pass = _Pass(days, self.before_ms(days), self._offset_s(self._clock()),
                               deque(self._db.gateway_ids()))
        current = self._pass
        if current.gateways:
            step = self._db.fold_events(current.gateways[0], current.before_ms,
                                        current.offset_s, FOLD_BATCH)
            current.folded += step.folded
            current.deleted += step.deleted
            if not step.more:
                current.gateways.popleft()
            return
        erased = self._db.erase_ended_permits(current.before_ms)
        self._db.set_meta(LAST_RUN_KEY, str(int(self._clock() * 1000)))
        self._pass = None
        log.info("retention_applied", days=current.days, folded=current.folded,
                 deleted=current.deleted, erased=erased, by="serve")


@dataclass(slots=True)
class _Pass:
    """A pass of ``serve``'s retention in progress."""

    days: int
    before_ms: int
    offset_s: int
    gateways: deque[str]
    folded: int = 0
    deleted: int = 0
