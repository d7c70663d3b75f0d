"""The running agent: wires configuration, store, doors and readers together.

Threads (docs/architecture.md): one per reader, one per door, one for housekeeping
(retention, clock checks), one for the simulation control socket when simulated devices
are configured, and the main thread for start-up, signals and shutdown.

``Agent`` is made of parts, each a mixin in a module of its own that declares the
attributes it uses (as ``agent.lists.ListWrites`` is part of ``agent.store.Store``):

- agent/runtime_cards.py, ``CardReads``: the card path (``handle_read``: hash, look up,
  decide, commit the event durably, and only then unlock; no door opens without a record),
  enrollment captures, and the reader threads with their back-off;
- agent/runtime_store.py, ``StoreKeeping``: opening the store, writing events, a full disk;
- agent/runtime_upkeep.py, ``Upkeep``: the clock judge and the housekeeping thread
  (checkpoints, leases, retention, the outbox cap);
- agent/runtime_control.py, ``ControlHosting``: enrollment and the control sockets.

This module keeps start-up, the doors, modes, sync, shutdown, signals and sd_notify.
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
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from agent.clock import ClockJudge
from agent.config import Config, ReaderConfig
from agent.control import ControlServer
from agent.datalock import DataLock
from agent.decision import Decision, Mode, Passback, Policy
from agent.diskspace import Reserve, free_bytes
from agent.door import DoorWorker
from agent.enroll import Captures, Enroller
from agent.resolve import Secrets, load_secrets, resolve_paths
from agent.runtime_cards import CardReads, ReadTiming
from agent.runtime_control import ControlHosting
from agent.runtime_store import StoreKeeping
from agent.runtime_upkeep import Upkeep
from agent.site_keys import SITE_STREAM, SiteKeys
from agent.store import Store
from agent.sync import SyncWorker
from agent.yielding import CardPath
from common.sqlite import StoreError
from drivers import registry
from drivers.base import Reader
from drivers.simulated import BUS, SimBus
from protocol.chain import Event
from protocol.hashing import CredentialHasher

__all__ = ["SWITCH_INTERVAL_S", "WATCHDOG_PING_S", "Agent", "ReadTiming", "build_policy",
           "check_drivers", "notify"]

log = structlog.get_logger()

WATCHDOG_PING_S = 10.0
"""How often systemd's watchdog is fed (the unit's WatchdogSec is 30 s)."""
SWITCH_INTERVAL_S = 0.0005
"""How long a thread may hold the interpreter lock while another waits for it (CPython's
default is 5 ms): a decision takes the lock back a dozen times, so under list work the
default made single taps wait 100 ms and more."""


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


class Agent(CardReads, StoreKeeping, Upkeep, ControlHosting):
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
        self.card_path = CardPath()
        """Entered by every read: the sync worker steps aside meanwhile (agent/yielding.py)."""
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

    # -- doors and threads ----------------------------------------------------------

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

    # -- sync and modes (``SyncHost``) ----------------------------------------------

    def _start_sync(self, secrets: Secrets) -> None:
        assert self.store is not None and secrets.trusted_keys is not None
        self.sync = SyncWorker(self, self.store, self.config.sync, secrets.trusted_keys,
                               gateway=self.config.site.gateway_id,
                               site=self.config.site.site_id, tls=secrets.tls,
                               password=secrets.password, card_path=self.card_path)
        self.sync.start()

    def current_mode(self) -> Mode:
        """The site mode in force (``SyncHost``)."""
        return self.policy.mode

    def set_stale_cutoff(self, cutoff: int | None) -> None:
        """Apply (or lift) the stale-list policy: grants need ``confirmed_at >= cutoff``."""
        if self.policy.stale_cutoff != cutoff:
            self.policy = replace(self.policy, stale_cutoff=cutoff)

    def set_mode(self, mode: Mode, *, source: str) -> None:
        """Switch the site mode (lockdown, free passage, normal) and record it."""
        self.policy = replace(self.policy, mode=mode)
        for door in self.doors.values():
            door.set_mode(mode)
        self._record(Event("mode_changed", reason=mode.value, data={"source": source}),
                     device=("system", "mode", json.dumps({"mode": mode.value})))
        log.warning("mode_changed", mode=mode.value, source=source)

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
