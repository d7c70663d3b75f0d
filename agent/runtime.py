"""The running agent: wires configuration, store, doors and readers together.

Threads (docs/architecture.md): one per reader, one per door, one for housekeeping
(retention, clock checks), one for the simulation control socket when simulated devices
are configured, and the main thread for start-up, signals and shutdown.

The card path: ``handle_read`` hashes the card id, looks it up, decides, commits the event
durably, and only then tells the door to unlock. If the event cannot be written the door
stays shut: no door opens without a record.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from agent import __version__
from agent.clock import ClockJudge, ClockState, Judgement
from agent.config import Config, ReaderConfig
from agent.control import ControlServer, simulated_inputs, simulated_readers
from agent.datalock import DataLock
from agent.decision import (
    Decision,
    Direction,
    Mode,
    Passback,
    Policy,
    Reason,
    Request,
    decide,
)
from agent.diskspace import Reserve, free_bytes, looks_full
from agent.door import DoorWorker
from agent.enroll import Captures, Enroller, EnrollError, EnrollmentPolicy, card_status
from agent.resolve import Secrets, load_secrets, resolve_paths
from agent.site_keys import SITE_STREAM, SiteKeys
from agent.store import Store
from agent.sync import SyncWorker
from agent.tenant_ops import TenantOps
from common.sqlite import StoreError
from drivers import registry
from drivers.base import CardRead, DeviceError, Reader
from drivers.simulated import BUS, SimBus
from protocol.chain import Event
from protocol.hashing import CredentialHasher, SecretError, log_prefix
from protocol.messages import Decided

log = structlog.get_logger()

WATCHDOG_PING_S = 10.0
"""How often systemd's watchdog is fed (the unit's WatchdogSec is 30 s)."""
READ_TIMEOUT_S = 0.2
"""How long a reader thread waits in ``read`` before checking for shutdown."""
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Reopen delays after a reader fails; capped at 30 s so a replugged reader returns fast."""
STABLE_S = 30.0
"""A reader open this long counts as recovered: its back-off starts from the beginning
again. A port that opens but fails at once keeps backing off instead of flapping."""
CHECKPOINT_S = 2.0
"""How often the housekeeping thread copies the WAL into the database. Card-path commits
never checkpoint themselves (docs/performance.md): a checkpoint inside a commit costs
several milliseconds and would land on whichever tap triggered it."""
SWITCH_INTERVAL_S = 0.0005
"""How long a thread may hold the interpreter lock while another waits for it (CPython's
default is 5 ms): a decision takes the lock back a dozen times, so under list work the
default made single taps wait 100 ms and more."""
LEASE_CHECK_S = 60.0
"""How often ended leases are marked ended (their access stopped at the lease end by
itself; this records it)."""


def build_policy(config: Config, mode: Mode | None = None) -> Policy:
    """The decision policy from the configuration."""
    p = config.policy
    return Policy(
        mode=mode or Mode(p.mode),
        passback=Passback(p.anti_passback),
        passback_reset_s=int(p.anti_passback_reset_h * 3600),
        holidays=frozenset(p.holidays),
        schedules=dict(p.schedules),
    )


def check_drivers(config: Config) -> None:
    """Validate every driver name and its options before anything opens."""
    for i, door in enumerate(config.doors):
        registry.check_options("relay", door.relay.driver, door.relay.options,
                               f"doors[{i}].relay")
        for what in ("contact", "rex"):
            dev = getattr(door, what)
            if dev is not None:
                registry.check_options("input", dev.driver, dev.options, f"doors[{i}].{what}")
    for i, reader in enumerate(config.readers):
        registry.check_options("reader", reader.driver, reader.options, f"readers[{i}]")


@dataclass(slots=True)
class ReadTiming:
    """Timestamps (``time.perf_counter``) of one card read through the agent."""

    received: float = 0.0
    committed: float = 0.0
    granted: float = 0.0


class Agent:
    """One running agent."""

    def __init__(self, config: Config, *, config_path: Path | None = None,
                 bus: SimBus | None = None,
                 devices: dict[str, Any] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.bus = bus or BUS
        self._devices = devices or {}
        self.paths = resolve_paths(config, config_path)
        self.store_path = self.paths.store
        self.config_dir = self.paths.config_dir
        self.store: Store | None = None
        self._lock: DataLock | None = None
        self.reserve = Reserve(self.paths.data_dir, 0)
        self._disk_full: str | None = None
        """Why the disk is known full ("at_start", "running"), until it has room again."""
        self._disk_lock = threading.Lock()
        self._secrets: Secrets | None = None
        self.clock: ClockJudge | None = None
        self._prune_held = False
        self._decide_lock = threading.Lock()
        self.captures = Captures()
        """Open enrollment captures: a tap at a capturing reader is taken, not decided."""
        self._enroller: Enroller | None = None
        self._servers: list[ControlServer] = []
        self.hasher: CredentialHasher | None = None
        self.site_keys: SiteKeys | None = None
        """The site keys in force (agent/site_keys.py); also ``hasher``."""
        self.policy = build_policy(config)
        self.doors: dict[str, DoorWorker] = {}
        self.readers: dict[str, Reader] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._sim_socket: socket.socket | None = None
        self.on_decision: Callable[[ReaderConfig, Decision, ReadTiming], None] | None = None
        self._door_schedule = {d.id: d.schedule for d in config.doors}
        self.failed = False
        """Set when the agent stopped because a worker died (exit status 1)."""
        self.keep_unacked = config.sync.enabled
        """Never prune events the office has not acknowledged (when sync is on)."""
        self.sync: SyncWorker | None = None
        self._high_water = False

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Resolve paths and secrets, lock the data folder, open the store, lock every
        door, start readers. Raises on unusable set-ups; a start that fails before the
        store opens records nothing."""
        check_drivers(self.config)
        # The card path's threads each take the interpreter lock back after every SQLite
        # call; while the sync worker parses and stages a list they would wait up to the
        # default 5 ms switch interval for it each time (bench/load.py).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        secrets = load_secrets(self.config, self.paths)
        lock = self._lock = DataLock.acquire(self.paths.lock)
        self.reserve = Reserve(self.paths.data_dir, self.config.store.reserve_mb << 20)
        try:
            self.hasher = self.site_keys = SiteKeys(secrets.site_key, secrets.gateway_seal,
                                                    self.config.site.gateway_id)
            self.store = self._open_store()
            if self.store is not None:
                self.site_keys.load(self.store.stream_detail(SITE_STREAM))
        except BaseException:
            if self.store is not None:
                self.store.close()
                self.store = None
            lock.release()
            self._lock = None
            raise
        self._secrets = secrets
        if self.store is not None:
            self._record_start()
        for door in self.config.doors:
            self._start_door(door.id)
        for reader in self.config.readers:
            self._spawn(f"reader-{reader.id}", self._reader_loop, reader)
        if self.store is not None:
            self._store_ready()
        else:
            # The disk is full and no reserve was left to open the store: decide anyway
            # (every card is denied: nothing can be recorded; egress works), and open it
            # as soon as there is room (housekeeping).
            log.error("store_unavailable", reason="disk_full",
                      free_bytes=free_bytes(self.paths.data_dir),
                      hint="free space on the data folder's file system; the agent opens "
                      "the store and records everything from then on by itself")
        self._spawn("housekeeping", self._housekeeping)
        if self._uses_simulation() or self.config.enrollment.enabled:
            self._start_sim_socket()
        log.info("agent_started", site=self.config.site.site_id,
                 gateway=self.config.site.gateway_id, doors=len(self.doors),
                 readers=len(self.config.readers), store=str(self.store_path),
                 degraded=self.store is None)

    def _open_store(self) -> Store | None:
        """The store, opened and checked; on a full disk the reserve is given back first,
        and None means there is no room even then."""
        try:
            return self._open_checked()
        except StoreError as exc:
            if not looks_full(exc, self.paths.data_dir):
                raise
            first = exc
        self._disk_full = "at_start"
        if not self.reserve.release():
            log.error("disk_full", error=str(first), reserve="none left")
            return None
        log.error("disk_full", error=str(first), reserve="released")
        try:
            return self._open_checked()
        except StoreError as exc:
            if not looks_full(exc, self.paths.data_dir):
                raise
            return None

    def _open_checked(self) -> Store:
        store = Store(self.store_path, background_checkpoint=True)
        try:
            check = store.quick_check()
        except BaseException:
            store.close()
            raise
        if check != "ok":
            store.close()
            raise StoreError(f"{self.store_path}: integrity check failed: {check}")
        return store

    def _record_start(self) -> None:
        self._record(Event("agent_started", data={
            "version": __version__, "pid": os.getpid(),
            "config": str(self.config_path or "<embedded defaults>")}),
            device=("system", "agent", json.dumps({"state": "running", "pid": os.getpid(),
                                                   "version": __version__})))
        self._check_clock()
        if self._disk_full:
            self._record_disk_full()

    def _store_ready(self) -> None:
        """What needs the store, once it is open (at start, or later after a full disk)."""
        assert self.store is not None and self._secrets is not None
        # A mode the office commanded outlives a restart; otherwise the configured mode.
        commanded = (self.store.stream_detail("mode") or {}).get("mode")
        if commanded in {m.value for m in Mode}:
            self.set_mode(Mode(commanded), source="central command (restored)")
        elif self.policy.mode is not Mode.NORMAL:
            self.set_mode(self.policy.mode, source="config")
        if self.config.enrollment.enabled:
            self._start_enrollment(self._secrets)
        if self.config.sync.enabled:
            self._start_sync(self._secrets)

    # -- a full disk (agent/diskspace.py) ------------------------------------------------

    def _record_disk_full(self) -> None:
        assert self.store is not None
        data = {"free_bytes": free_bytes(self.paths.data_dir), "when": self._disk_full}
        self.store.append(Event("disk_full", data=data),
                          device=("system", "disk", json.dumps({"state": "full", **data})))
        log.error("disk_full", **data)

    def _space_hit(self, exc: StoreError) -> bool:
        """A write failed: if the disk is full, give back the reserve (once) and record
        the alarm. True when there is room again to retry the write."""
        if self.store is None or not looks_full(exc, self.paths.data_dir):
            return False
        with self._disk_lock:
            first = not self._disk_full
            self._disk_full = self._disk_full or "running"
            released = self.reserve.release()
            if first or released:
                try:
                    self._record_disk_full()
                except StoreError as again:
                    log.error("disk_full", error=str(again), recorded=False)
                    return False
            return released

    def _check_disk(self) -> None:
        """In housekeeping: open a store that could not be opened, and once the disk has
        room again take the reserve back and record it."""
        if self.store is None:
            try:
                store = self._open_store()
            except StoreError as exc:
                log.error("store_unavailable", error=str(exc))
                return
            if store is None:
                return
            assert self.site_keys is not None
            try:
                self.site_keys.load(store.stream_detail(SITE_STREAM))
            except SecretError as exc:
                # Cards hashed under the wrong key would be denied without a reason.
                log.error("site_keys_unavailable", error=str(exc))
                store.close()
                return
            self.store = store
            self._record_start()
            self._store_ready()
            return
        if (self._disk_full and self.reserve.ensure()) or (
                self._disk_full and self.reserve.size == 0
                and free_bytes(self.paths.data_dir) > (1 << 20)):
            self._disk_full = None
            free = free_bytes(self.paths.data_dir)
            self._record(Event("disk_space_restored", data={"free_bytes": free}),
                         device=("system", "disk", json.dumps({"state": "ok",
                                                               "free_bytes": free})))
            log.warning("disk_space_restored", free_bytes=free)
        elif not self._disk_full:
            self.reserve.ensure()

    def _device(self, kind: registry.Kind, key: str, driver: str, options: dict[str, Any]
                ) -> Any:
        if key in self._devices:
            return self._devices[key]
        dev = registry.create(kind, driver, key, options)
        if hasattr(dev, "bus"):
            dev.bus = self.bus
        return dev

    def _start_door(self, door_id: str) -> None:
        cfg = self.config.door(door_id)
        relay = self._device("relay", f"{door_id}.relay", cfg.relay.driver, cfg.relay.options)
        contact = (self._device("input", f"{door_id}.contact", cfg.contact.driver,
                                cfg.contact.options) if cfg.contact else None)
        rex = (self._device("input", f"{door_id}.rex", cfg.rex.driver, cfg.rex.options)
               if cfg.rex else None)
        worker = DoorWorker(cfg, relay, self._door_emit, contact=contact, rex=rex)
        worker.start()
        self.doors[door_id] = worker

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- events ----------------------------------------------------------------------

    def _start_sync(self, secrets: Secrets) -> None:
        assert self.store is not None and secrets.trusted_keys is not None
        self.sync = SyncWorker(self, self.store, self.config.sync, secrets.trusted_keys,
                               gateway=self.config.site.gateway_id,
                               site=self.config.site.site_id, tls=secrets.tls,
                               password=secrets.password)
        self.sync.start()

    def current_mode(self) -> Mode:
        """The site mode in force (``SyncHost``)."""
        return self.policy.mode

    def record_event(self, event: Event) -> None:
        """Append an event for another component (sync); raises StoreError."""
        self._record(event)

    def set_stale_cutoff(self, cutoff: int | None) -> None:
        """Apply (or lift) the stale-list policy: grants need ``confirmed_at >= cutoff``."""
        if self.policy.stale_cutoff != cutoff:
            self.policy = replace(self.policy, stale_cutoff=cutoff)

    def _record(self, event: Event, *, device: tuple[str, str, str] | None = None) -> None:
        store = self.store
        if store is None:
            raise StoreError(f"{self.store_path}: not open (the disk is full)")
        try:
            store.append(event, device=device)
        except StoreError as exc:
            if not self._space_hit(exc):
                raise
            store.append(event, device=device)

    def _door_emit(self, event: Event, state: str) -> None:
        assert event.door is not None
        self._record(event, device=("door", event.door, state))
        level = "warning" if event.kind in {"door_forced", "door_held_open"} or \
            event.kind.endswith("_fault") else "info"
        getattr(log, level)(event.kind, door=event.door, reason=event.reason, **event.data)

    # -- the card path ---------------------------------------------------------------

    def handle_read(self, reader: ReaderConfig, read: CardRead) -> Decision:
        """Decide on one card read, commit the event, then drive the door."""
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
        keys = self.site_keys
        cred = keys.credential(read.card_id)
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
            cred, matched = keys.match(read.card_id, store.lookup)
            decision = decide(request, matched.lookup, self.policy)
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
                 ms=round((timing.granted - timing.received) * 1000, 3))
        if self.on_decision is not None:
            self.on_decision(reader, decision, timing)
        if matched.rekey is not None and self.sync is not None:
            # Known only under the previous site key: the office moves it to the new one.
            self.sync.report_rekey(keys.ring.generation, *matched.rekey)
        return decision

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

    # -- modes, housekeeping, clock --------------------------------------------------

    def set_mode(self, mode: Mode, *, source: str) -> None:
        """Switch the site mode (lockdown, free passage, normal) and record it."""
        self.policy = replace(self.policy, mode=mode)
        for door in self.doors.values():
            door.set_mode(mode)
        self._record(Event("mode_changed", reason=mode.value, data={"source": source}),
                     device=("system", "mode", json.dumps({"mode": mode.value})))
        log.warning("mode_changed", mode=mode.value, source=source)

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
        stored = self.store.counts()["events"]
        high = stored >= 0.8 * self.config.store.max_events
        if high and not self._high_water:
            self._record(Event("event_store_high_water", data={
                "events": stored, "max_events": self.config.store.max_events}))
            log.error("event_store_high_water", events=stored,
                      max_events=self.config.store.max_events)
        self._high_water = high

    # -- enrollment (agent/enroll.py, agent/tenant_ops.py) ---------------------------

    def _start_enrollment(self, secrets: Secrets) -> None:
        assert self.store is not None and self.hasher is not None
        cfg = self.config.enrollment
        policy = EnrollmentPolicy(units=cfg.units, provisional_s=int(cfg.provisional_h * 3600),
                                  max_lease_days=cfg.max_lease_days,
                                  gateway=self.config.site.gateway_id)
        self._enroller = Enroller(self.store, self.hasher, policy, secrets.seal_key,
                                  signing_key=secrets.signing_key)
        if secrets.signing_key is None:
            log.warning("enrollment_signing_key_missing", path=str(self.paths.signing_key),
                        hint="enrollments go unsigned; an office that recorded this "
                        "gateway's signing key rejects them (install the key made by "
                        "'permitgate provision')")
        if secrets.seal_key is None:
            log.warning("enrollment_seal_key_missing", path=str(self.paths.seal_key),
                        hint="install the office's seal key; enrollments are refused "
                        "until then")
        server = ControlServer(self.paths.web_socket, None,
                               extra=TenantOps(self).handlers(),
                               mode=0o660 if secrets.web_group is not None else 0o600,
                               group=secrets.web_group)
        server.bind()
        self._servers.append(server)
        self._spawn("web-control", server.serve, self._stopping)

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

    def enrollment_decided(self, decided: Decided) -> None:
        """The office's answer to an enrollment (``SyncHost``)."""
        if self._enroller is None:
            log.warning("enrollment_decision_ignored", enrollment=decided.enrollment,
                        hint="enrollment is not enabled on this gateway")
            return
        if self._enroller.apply_decision(decided.enrollment,
                                         confirmed=decided.status == "confirmed",
                                         list_version=decided.list_version,
                                         reason=decided.reason) is None:
            log.info("enrollment_decision_moot", enrollment=decided.enrollment,
                     status=decided.status)

    def tenant_store(self) -> Store:
        """The open store (``TenantHost``)."""
        assert self.store is not None
        return self.store

    def enroller(self) -> Enroller:
        """The enroller (``TenantHost``)."""
        if self._enroller is None:
            raise EnrollError("enrollment", "disabled", "enrollment is not enabled on this "
                              "gateway ([enrollment] enabled = true)")
        return self._enroller

    def record(self, event: Event) -> None:
        """Append an event to the chain (``TenantHost``)."""
        self._record(event)

    # -- simulation control ----------------------------------------------------------

    def _uses_simulation(self) -> bool:
        return any(r.driver == "simulated" for r in self.config.readers) or any(
            dev is not None and dev.driver == "simulated"
            for d in self.config.doors for dev in (d.contact, d.rex))

    @property
    def sim_socket_path(self) -> Path:
        """Where ``permitgate sim`` reaches this agent."""
        return self.store_path.parent / "sim.sock"

    def _start_sim_socket(self) -> None:
        """Serve the control socket (agent/control.py), which sees this agent only as its
        ``ControlTarget``: the ``sim_*`` methods below."""
        extra = TenantOps(self).handlers() if self.config.enrollment.enabled else None
        server = ControlServer(self.sim_socket_path,
                               self if self._uses_simulation() else None, extra=extra)
        server.bind()
        self._sim_socket = server.bound_socket
        self._sim_close = server.close
        earlier = self.on_decision

        def answer_taps(reader: ReaderConfig, decision: Decision, timing: ReadTiming) -> None:
            server.decided(reader.id, decision.granted, decision.reason.value)
            if earlier is not None:
                earlier(reader, decision, timing)

        self.on_decision = answer_taps
        self._spawn("sim-control", self._sim_loop, server)

    def _sim_loop(self, server: ControlServer) -> None:
        server.serve(self._stopping)

    def sim_readers(self) -> frozenset[str]:
        """Ids of the readers whose cards come from simulated taps."""
        return simulated_readers(self.config)

    def sim_inputs(self) -> frozenset[str]:
        """Names of the simulated inputs ``permitgate sim input`` may set."""
        return simulated_inputs(self.config)

    def sim_queued(self, reader: str) -> int:
        """Taps waiting at the simulated ``reader``."""
        return self.bus.tap_queue(reader).qsize()

    def sim_tap(self, reader: str, card: str) -> None:
        """Present ``card`` at the simulated ``reader``."""
        self.bus.tap(reader, card)

    def sim_set_input(self, name: str, active: bool) -> None:
        """Set the simulated input ``name``."""
        self.bus.set_level(name, active)

    # -- stop ------------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """Stop readers, lock doors, record the stop; bounded by about ``timeout``."""
        if self._stopped.is_set():
            return
        self._stopping.set()
        deadline = time.monotonic() + timeout
        if self.sync is not None:
            self.sync.stop()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for door in self.doors.values():
            door.stop(timeout=max(0.5, deadline - time.monotonic()))
        if self._sim_socket is not None:
            # Closes the socket; removes sim.sock only if it is still the file bound here.
            self._sim_close()
        for server in self._servers:
            server.close()  # web.sock, likewise only if it is still the one bound here
        if self.store is not None:
            try:
                self._record(Event("agent_stopped"), device=(
                    "system", "agent", json.dumps({"state": "stopped"})))
            except StoreError as exc:
                log.error("event_not_recorded", kind="agent_stopped", error=str(exc))
            self.store.close()
            log.info("agent_stopped")
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._stopped.set()

    def run_forever(self) -> None:
        """Start, then serve until SIGTERM or SIGINT; always stops cleanly."""
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self._stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            self.start()
            notify("READY=1")
            last_ping = 0.0
            while not self._stopping.wait(1.0):
                dead = self.dead_workers()
                if dead:
                    # A door whose worker died no longer drives its relay (it was left in
                    # its safe state): stop and let systemd restart the whole agent rather
                    # than keep granting at a door that cannot open.
                    log.error("worker_died", workers=dead)
                    self.failed = True
                    break
                if time.monotonic() - last_ping >= WATCHDOG_PING_S:
                    notify("WATCHDOG=1")
                    last_ping = time.monotonic()
        finally:
            notify("STOPPING=1")
            self.stop()

    def dead_workers(self) -> list[str]:
        """Names of worker threads that have ended while the agent runs."""
        dead = [f"door-{d}" for d, w in self.doors.items() if not w.alive]
        dead += [t.name for t in self._threads if not t.is_alive()]
        if self.sync is not None and not self.sync.alive:
            dead.append("sync")
        return dead


def notify(state: str) -> None:
    """Tell systemd (``Type=notify``) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), addr)
    except OSError as exc:
        log.warning("sd_notify_failed", error=str(exc))
