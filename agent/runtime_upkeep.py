"""The clock and housekeeping: the part of ``agent.runtime.Agent`` that judges the wall
clock (agent/clock.py) and runs the ``housekeeping`` thread.

The clock is judged at start and again every housekeeping round; a change of state is
recorded (``clock_changed``), and while the clock cannot be believed nothing is pruned by
age (``prune_held``). Every ``CHECKPOINT_S`` housekeeping checks the disk (opening a store
a full disk kept shut), copies the WAL into the database, records ended leases, and every
``store.prune_interval_s`` applies event retention, the outbox cap (``events_dropped``)
and the high-water alarm.

``Upkeep`` is a mixin: ``Agent`` sets the attributes it declares.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import datetime

import structlog

from agent.clock import ClockJudge, ClockState, Judgement
from agent.config import Config
from agent.decision import Policy
from agent.enroll import Enroller
from agent.store import Store
from common.sqlite import StoreError
from protocol.chain import Event

log = structlog.get_logger()

CHECKPOINT_S = 2.0
"""How often the housekeeping thread copies the WAL into the database. Card-path commits
never checkpoint themselves (docs/performance.md): a checkpoint inside a commit costs
several milliseconds and would land on whichever tap triggered it."""
LEASE_CHECK_S = 60.0
"""How often ended leases are marked ended (their access stopped at the lease end by
itself; this records it)."""


class Upkeep:
    """The clock judge and housekeeping of ``agent.runtime.Agent`` (which sets these
    attributes)."""

    config: Config
    store: Store | None
    policy: Policy
    clock: ClockJudge | None
    keep_unacked: bool
    _prune_held: bool
    _high_water: bool
    _enroller: Enroller | None
    _stopping: threading.Event
    # From the other parts of the agent (agent/runtime_store.py):
    _record: Callable[..., None]
    _check_disk: Callable[[], None]

    # -- the clock -------------------------------------------------------------------

    def _check_clock(self) -> None:
        """Judge the clock at start (agent/clock.py) and record what was found."""
        assert self.store is not None
        cfg = self.config.policy
        self.clock = ClockJudge(
            self.store, floor=datetime.combine(cfg.clock_floor, datetime.min.time(),
                                               self.config.zone),
            max_ahead_s=cfg.clock_max_ahead_days * 86_400, trust_ntp=cfg.clock_trust_ntp)
        judgement = self.clock.judge()
        self.store.clock_tag = self._clock_tag
        self._clock_event("clock_checked", judgement)

    def _clock_tag(self) -> str | None:
        state = self.clock.state if self.clock is not None else ClockState.OK
        return None if state is ClockState.OK else state.value

    def _clock_event(self, kind: str, judgement: Judgement) -> None:
        state = judgement.state.value
        self._record(Event(kind, reason=state, data={
            "now_ms": judgement.now_ms, "trusted_ms": judgement.trusted_ms,
            "source": judgement.source}),
            device=("system", "clock", json.dumps({
                "state": state, "trusted_ms": judgement.trusted_ms,
                "offset_s": judgement.offset_s})))
        if judgement.state is not ClockState.OK:
            log.error("clock_suspect", state=state, offset_s=judgement.offset_s,
                      now=datetime.now(self.config.zone).isoformat(),
                      hint="set the time (NTP or an RTC); until then nothing is pruned by "
                      "age and the lists count as stale")
        elif kind == "clock_changed":
            log.warning("clock_recovered", offset_s=judgement.offset_s)

    def rejudge_clock(self) -> ClockState:
        """Judge the clock again; a change of state is recorded (``clock_changed``)."""
        if self.clock is None:
            return ClockState.OK
        before = self.clock.state
        judgement = self.clock.judge()
        if judgement.state is not before:
            self._clock_event("clock_changed", judgement)
        return judgement.state

    def clock_observed(self, trusted_ms: int, source: str) -> None:
        """A trusted time source (the office's signed time) was seen (``SyncHost``)."""
        if self.clock is not None:
            self.clock.observe(trusted_ms, source)
            self.rejudge_clock()

    def clock_ok(self) -> bool:
        """Whether the clock is judged right (``SyncHost``)."""
        return self.clock is None or self.clock.state is ClockState.OK

    # -- housekeeping ----------------------------------------------------------------

    def _housekeeping(self) -> None:
        next_prune = time.monotonic() + self.config.store.prune_interval_s
        next_leases = 0.0
        while not self._stopping.wait(CHECKPOINT_S):
            try:
                self._check_disk()
                if self.store is None:
                    continue
                self.store.checkpoint()
                self.rejudge_clock()
                if self._enroller is not None and time.monotonic() >= next_leases:
                    next_leases = time.monotonic() + LEASE_CHECK_S
                    self._enroller.expire_leases()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.config.store.prune_interval_s
                    self.prune()
            except Exception as exc:  # noqa: BLE001 - housekeeping's one broad boundary
                log.error("housekeeping_failed", error=str(exc))

    def prune(self) -> int:
        """Apply event retention now; returns the number of events deleted."""
        assert self.store is not None
        clock = self.rejudge_clock()
        held = clock is not ClockState.OK
        if held != self._prune_held:
            self._prune_held = held
            if held:
                # Retention by age is suspended while the clock cannot be believed: a
                # clock far ahead would make every event look old.
                self._record(Event("prune_held", reason=f"clock_{clock.value}"))
                log.error("prune_held", clock=clock.value)
        try:
            deleted = self.store.prune(
                retention_days=self.config.store.event_retention_days,
                max_events=self.config.store.max_events,
                keep_unacked=self.keep_unacked,
                by_age=not held,
                presence_max_age_s=(self.policy.passback_reset_s
                                    or self.config.store.event_retention_days * 86_400))
        except StoreError as exc:
            log.error("prune_failed", error=str(exc))
            return 0
        if deleted:
            log.info("events_pruned", count=deleted)
        if self.keep_unacked:
            deleted += self._drop_overflow()
        self._check_high_water()
        return deleted

    def _drop_overflow(self) -> int:
        """The cap (docs/events.md, "The cap"): past ``max_events`` with every delivered
        event gone, the oldest undelivered ones are dropped, and ``events_dropped``
        records which, so the office sees an explained gap rather than a full disk that
        would stop every decision."""
        assert self.store is not None
        cap = self.config.store.max_events
        over = self.store.overflow(cap)
        if over is None:
            return 0
        first, last = over
        dropped = self.store.prune(retention_days=self.config.store.event_retention_days,
                                   max_events=cap, keep_unacked=False, by_age=False)
        anchor = self.store.meta("chain_anchor_hash")
        self._record(Event("events_dropped", reason="outbox_full", data={
            "first_seq": first, "last_seq": last, "count": dropped, "anchor_hash": anchor}),
            device=("system", "outbox", json.dumps({"state": "overflow", "dropped": dropped,
                                                    "last_seq": last})))
        log.error("events_dropped", first_seq=first, last_seq=last, count=dropped,
                  hint="the office has not acknowledged events for a long time: check the "
                  "uplink; the oldest undelivered events were dropped to stay under "
                  "[store] max_events")
        return dropped

    def _check_high_water(self) -> None:
        """Alarm once when the stored events pass 80 % of ``max_events`` (with sync on,
        undelivered events are never pruned, so a silent office could fill the disk)."""
        assert self.store is not None
        stored = self.store.counts("events")["events"]
        high = stored >= 0.8 * self.config.store.max_events
        if high and not self._high_water:
            self._record(Event("event_store_high_water", data={
                "events": stored, "max_events": self.config.store.max_events}))
            log.error("event_store_high_water", events=stored,
                      max_events=self.config.store.max_events)
        self._high_water = high
