"""The card path and the reader threads: the part of ``agent.runtime.Agent`` that turns a
tap into a decision and an open door.

``handle_read`` hashes the card id, looks it up, decides, commits the event durably, and
only then tells the door to unlock. If the event cannot be written the door stays shut: no
door opens without a record. A tap at a reader with an enrollment capture waiting is taken
for the capture instead (``Captures``, agent/enroll.py). Each reader's thread
(``_reader_loop``) opens its reader, debounces repeats, runs the card path for each read,
records the reader's alarms and state, and reopens it with back-off after a failure.

``CardReads`` is a mixin: ``Agent`` sets the attributes it declares.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from agent.config import Config, ReaderConfig
from agent.decision import Decision, Direction, Policy, Reason, Request, decide
from agent.door import DoorWorker
from agent.enroll import Captures, card_status
from agent.site_keys import SiteKeys
from agent.store import Store
from agent.sync import SyncWorker
from agent.yielding import CardPath
from common.sqlite import StoreError
from drivers import registry
from drivers.base import CardRead, DeviceError, Reader
from protocol.chain import Event
from protocol.hashing import log_prefix

log = structlog.get_logger()

READ_TIMEOUT_S = 0.2
"""How long a reader thread waits in ``read`` before checking for shutdown."""
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Reopen delays after a reader fails; capped at 30 s so a replugged reader returns fast."""
STABLE_S = 30.0
"""A reader open this long counts as recovered: its back-off starts from the beginning
again. A port that opens but fails at once keeps backing off instead of flapping."""


@dataclass(slots=True)
class ReadTiming:
    """Timestamps (``time.perf_counter``) of one card read through the agent."""

    received: float = 0.0
    decided: float = 0.0
    """Looked up and decided (the decision lock taken)."""
    committed: float = 0.0
    granted: float = 0.0


class CardReads:
    """The card path and the reader threads of ``agent.runtime.Agent`` (which sets these
    attributes)."""

    config: Config
    store: Store | None
    site_keys: SiteKeys | None
    policy: Policy
    doors: dict[str, DoorWorker]
    readers: dict[str, Reader]
    captures: Captures
    card_path: CardPath
    sync: SyncWorker | None
    on_decision: Callable[[ReaderConfig, Decision, ReadTiming], None] | None
    _decide_lock: threading.Lock
    _door_schedule: dict[str, str]
    _stopping: threading.Event
    # From the other parts of the agent (agent/runtime_store.py, agent/runtime.py):
    _record: Callable[..., None]
    _space_hit: Callable[[StoreError], bool]
    _device: Callable[[registry.Kind, str, str, dict[str, Any]], Any]

    def handle_read(self, reader: ReaderConfig, read: CardRead) -> Decision:
        """Decide on one card read, commit the event, then drive the door."""
        with self.card_path:
            return self._handle_read(reader, read)

    def _handle_read(self, reader: ReaderConfig, read: CardRead) -> Decision:
        assert self.site_keys is not None
        timing = ReadTiming(received=time.perf_counter())
        store = self.store
        if store is None:
            # No store (a full disk at start): nothing can be recorded, so nothing opens.
            decision = Decision(False, Reason.STORE_ERROR)
            log.error("access_denied", reader=reader.id, reason=decision.reason.value,
                      detail="store unavailable (disk full)")
            if self.on_decision is not None:
                self.on_decision(reader, decision, timing)
            return decision
        ring = self.site_keys.ring  # one ring for the whole read, whatever sync changes
        cred = ring.current.credential(read.card_id)
        direction = Direction(reader.direction)
        request = Request(reader.door, direction, datetime.now(self.config.zone),
                          self._door_schedule[reader.door],
                          door_fault=self.doors[reader.door].relay_faulted)
        prefix = log_prefix(cred)
        if self.captures.waiting(reader.id):
            captured = self._capture(reader, cred)
            if captured is not None:
                if self.on_decision is not None:
                    self.on_decision(reader, captured, timing)
                return captured
        seq: int | None = None
        # Lookup, decision and the commit of its event (with the presence it sets) happen
        # under one lock: two readers deciding on one card at the same instant would both
        # read "outside" and both grant, defeating hard anti-passback (198 of 200
        # simultaneous pairs did before this lock). A decision takes about 1 ms, so taps
        # at different readers wait at most that for each other.
        with self._decide_lock:
            matched = ring.match(read.card_id, cred, store.lookup)
            decision = decide(request, matched.lookup, self.policy)
            timing.decided = time.perf_counter()
            event = Event("access_granted" if decision.granted else "access_denied",
                          door=reader.door, reader=reader.id, direction=direction.value,
                          reason=decision.reason.value, cred=prefix)
            presence = (cred, direction) if decision.granted else None
            try:
                try:
                    seq = store.append(event, presence=presence).seq
                except StoreError as exc:
                    if not self._space_hit(exc):
                        raise
                    seq = store.append(event, presence=presence).seq
            except StoreError as exc:
                log.error("event_not_recorded", reader=reader.id, cred=prefix,
                          error=str(exc))
                decision = Decision(False, Reason.STORE_ERROR)
        timing.committed = time.perf_counter()
        if decision.granted:
            self.doors[reader.door].grant()
        timing.granted = time.perf_counter()
        log.info("access_granted" if decision.granted else "access_denied",
                 door=reader.door, reader=reader.id, direction=direction.value,
                 reason=decision.reason.value, cred=prefix, seq=seq,
                 ms=round((timing.granted - timing.received) * 1000, 3),
                 decide_ms=round((timing.decided - timing.received) * 1000, 3),
                 commit_ms=round((timing.committed - timing.decided) * 1000, 3))
        if self.on_decision is not None:
            self.on_decision(reader, decision, timing)
        if matched.rekey is not None and self.sync is not None:
            # Known only under the previous site key: the office moves it to the new one.
            self.sync.report_rekey(ring.generation, *matched.rekey)
        return decision

    def _capture(self, reader: ReaderConfig, cred: bytes) -> Decision | None:
        """Hand a tap to the capture waiting at ``reader``; the door stays shut."""
        assert self.store is not None
        capture = self.captures.take(reader.id, cred, card_status(self.store, cred))
        if capture is None:
            return None
        try:
            self._record(Event("card_captured", door=reader.door, reader=reader.id,
                               cred=log_prefix(cred), reason=capture.status.value
                               if capture.status else None,
                               data={"account": capture.account} if capture.account else {}))
        except StoreError as exc:
            log.error("event_not_recorded", kind="card_captured", error=str(exc))
        log.info("card_captured", reader=reader.id, cred=log_prefix(cred))
        return Decision(False, Reason.CAPTURED)

    # -- the reader threads ----------------------------------------------------------

    def _reader_loop(self, cfg: ReaderConfig) -> None:
        reader: Reader = self._device("reader", cfg.id, cfg.driver, cfg.options)
        self.readers[cfg.id] = reader
        attempt = 0
        online: bool | None = None
        last_card: str | None = None
        last_seen = 0.0
        alarms: dict[str, bool] = {}
        while not self._stopping.is_set():
            try:
                reader.open()
                if online is not True:
                    self._reader_state(cfg, "online", attempt)
                online = True
                opened_at = time.monotonic()
                while not self._stopping.is_set():
                    read = reader.read(READ_TIMEOUT_S)
                    alarms = self._reader_alarms(cfg, reader, alarms)
                    if attempt and time.monotonic() - opened_at >= STABLE_S:
                        attempt = 0  # stayed up: the next failure starts a fresh back-off
                    if read is None:
                        continue
                    # Readers repeat a card while it stays in the field (an RDM6300 about
                    # every 100 ms); one presentation is one decision.
                    repeat = read.card_id == last_card and read.at - last_seen < cfg.debounce_s
                    last_card, last_seen = read.card_id, read.at
                    if repeat:
                        continue
                    decision = self.handle_read(cfg, read)
                    try:
                        reader.feedback(decision.granted)
                    except DeviceError as exc:
                        log.warning("reader_feedback_failed", reader=cfg.id, error=str(exc))
            except Exception as exc:  # noqa: BLE001 - the reader loop's one broad boundary
                if online is not False:
                    self._reader_state(cfg, "offline", attempt, error=str(exc))
                online = False
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                attempt += 1
                log.warning("reader_retry", reader=cfg.id, in_s=delay, attempt=attempt)
                self._stopping.wait(delay)
            finally:
                try:
                    reader.close()
                except Exception as exc:  # noqa: BLE001 - closing must not stop the loop
                    log.warning("reader_close_failed", reader=cfg.id, error=str(exc))

    def _reader_alarms(self, cfg: ReaderConfig, reader: Reader, known: dict[str, bool]
                       ) -> dict[str, bool]:
        """Record a reader_tamper / reader_power event when a device alarm changes."""
        current = reader.alarms()
        for name, active in current.items():
            if known.get(name, False) != active:
                event = Event(f"reader_{name}", door=cfg.door, reader=cfg.id,
                              reason="raised" if active else "cleared")
                try:
                    self._record(event)
                except StoreError as exc:
                    log.error("event_not_recorded", kind=event.kind, error=str(exc))
                (log.warning if active else log.info)(event.kind, reader=cfg.id,
                                                      active=active)
        return current

    def _reader_state(self, cfg: ReaderConfig, state: str, attempt: int,
                      error: str | None = None) -> None:
        data: dict[str, Any] = {"attempt": attempt}
        if error:
            data["error"] = error
        event = Event(f"reader_{state}", door=cfg.door, reader=cfg.id,
                      direction=cfg.direction, data=data)
        try:
            self._record(event, device=("reader", cfg.id, json.dumps({"state": state})))
        except StoreError as exc:
            log.error("event_not_recorded", kind=event.kind, error=str(exc))
        (log.info if state == "online" else log.warning)(event.kind, reader=cfg.id, **data)
