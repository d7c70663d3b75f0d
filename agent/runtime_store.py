"""The agent's store and a full disk: the part of ``agent.runtime.Agent`` that opens the
store, writes events to it, and keeps the agent working when the disk fills
(agent/diskspace.py).

The store is opened and checked at start; on a full disk the reserve is given back first,
and when there is no room even then the agent runs without a store (every card is denied:
nothing can be recorded) and housekeeping opens it once there is room (``_check_disk``).
A write that fails for lack of space gives back the reserve (once), records
``disk_full`` and is retried.

``StoreKeeping`` is a mixin: ``Agent`` sets the attributes it declares.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from agent import __version__
from agent.config import Config
from agent.diskspace import Reserve, free_bytes, looks_full
from agent.resolve import Paths
from agent.site_keys import SITE_STREAM, SiteKeys
from agent.store import Store
from common.sqlite import StoreError
from protocol.chain import Event
from protocol.hashing import SecretError

log = structlog.get_logger()


class StoreKeeping:
    """The store and a full disk, for ``agent.runtime.Agent`` (which sets these
    attributes)."""

    config: Config
    config_path: Path | None
    paths: Paths
    store_path: Path
    store: Store | None
    reserve: Reserve
    site_keys: SiteKeys | None
    _disk_full: str | None
    _disk_lock: threading.Lock
    # From the other parts of the agent (agent/runtime_upkeep.py, agent/runtime.py):
    _check_clock: Callable[[], None]
    _store_ready: Callable[[], None]

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

    # -- events ----------------------------------------------------------------------

    def record_event(self, event: Event) -> None:
        """Append an event for another component (sync); raises StoreError."""
        self._record(event)

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
