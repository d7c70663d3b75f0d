"""Door workers: each owns one relay and watches that door's contact and exit button.

A grant extends one relock deadline. The worker raises ``door_forced`` when the contact
opens while the door is locked and no exit request preceded it, and ``door_held_open``
when an opened door stays open longer than ``held_open_s``. On every exit path (stop, an
exception in the loop) the relay is driven to the door's safe state: locked for a
fail-secure door, unlocked for a fail-safe (egress) door.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from agent.config import DoorConfig
from agent.decision import Mode
from drivers.base import Input, Relay
from protocol.chain import Event

log = structlog.get_logger()

EmitFn = Callable[[Event, str], None]
"""Records a door event together with the door's new state (JSON) for ``status``."""

POLL_S = 0.05
"""Input poll period: 50 ms, well inside the 400 ms input that IEC 60839-11-1 (Table 2,
line 24) requires a grade 2 controller to process."""
RECLAIM_S = 5.0
"""How often a door worker tries again to claim a relay or input that failed to open."""
REX_GRACE_S = 5.0
"""After an exit request the door may open without a forced-door alarm for this long."""


@dataclass(slots=True)
class DoorState:
    """What the worker knows about its door."""

    unlocked: bool = False
    open: bool = False
    held_alarm: bool = False
    forced_alarm: bool = False
    mode: Mode = Mode.NORMAL
    faults: tuple[str, ...] = ()

    def as_json(self) -> str:
        """The state as ``status`` shows it."""
        return json.dumps({
            "lock": "unlocked" if self.unlocked else "locked",
            "contact": "open" if self.open else "closed",
            "alarm": "forced" if self.forced_alarm else "held_open" if self.held_alarm
            else None,
            "mode": self.mode.value,
            "faults": list(self.faults),
        })


class DoorWorker:
    """The only owner of a door's relay; runs one thread."""

    def __init__(self, config: DoorConfig, relay: Relay, emit: EmitFn, *,
                 contact: Input | None = None, rex: Input | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.relay = relay
        self.contact = contact
        self.rex = rex
        self._emit_fn = emit
        self._clock = clock
        self._cond = threading.Condition()
        self._deadline = 0.0
        self._egress_until = 0.0
        self._pulse = False
        self._rex_until = 0.0
        self._opened_at: float | None = None
        self._stop = False
        self._mode = Mode.NORMAL
        self._thread: threading.Thread | None = None
        self.state = DoorState()
        self._faults: set[str] = set()
        self._claimed = {"relay": False, "contact": contact is None, "rex": rex is None}
        self._next_claim = 0.0

    @property
    def relay_faulted(self) -> bool:
        """Whether the relay is unclaimed or failing: a grant could not open the door."""
        return "relay" in self._faults

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (False before start and after it ended)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def safe_unlocked(self) -> bool:
        """The relay state this door is left in when the agent stops or fails."""
        return self.config.fail_mode == "safe"

    # -- commands from other threads ---------------------------------------------------

    def grant(self) -> None:
        """Unlock now (or keep unlocked) until ``unlock_s`` from now.

        Ignored in lockdown: a grant kept for later would unlock the door when lockdown
        ends within ``unlock_s`` of it, with nobody at the door.
        """
        with self._cond:
            if self._mode is Mode.LOCKDOWN:
                log.info("door_grant_ignored", door=self.config.id, mode=self._mode.value)
                return
            self._deadline = max(self._deadline, self._clock() + self.config.unlock_s)
            # Every grant drives the relay at least once, even if the worker only gets to
            # run after a very short unlock_s has already passed.
            self._pulse = True
            self._cond.notify()

    def set_mode(self, mode: Mode) -> None:
        """Follow a site mode: free passage holds the door unlocked, lockdown locks it."""
        with self._cond:
            self._mode = mode
            if mode is Mode.LOCKDOWN:
                self._deadline = 0.0
            self._cond.notify()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Claim the devices, lock the door, and start the worker thread.

        A device that cannot be claimed (a relay board unplugged, an OSDP reader offline at
        boot) is a fault, reported as ``relay_fault``/``contact_fault``/``rex_fault`` and
        claimed again every ``RECLAIM_S`` by the worker: one broken door never stops the
        agent, and the other doors go on working.
        """
        self._claim()
        self._thread = threading.Thread(target=self._run, name=f"door-{self.config.id}",
                                        daemon=True)
        self._thread.start()

    def _claim(self) -> None:
        if not self._claimed["relay"]:
            try:
                self.relay.open()
                self.relay.set(False)
            except Exception as exc:  # noqa: BLE001 - reported as a fault, claimed again
                self._fault("relay", exc)
            else:
                self._claimed["relay"] = True
                self._clear("relay")
                self.state.unlocked = False
                self._emit("door_locked", reason="startup")
        for what, dev in (("contact", self.contact), ("rex", self.rex)):
            if dev is None or self._claimed[what]:
                continue
            try:
                dev.open()
            except Exception as exc:  # noqa: BLE001 - reported as a fault, claimed again
                self._fault(what, exc)
            else:
                self._claimed[what] = True
                self._clear(what)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread; the loop's ``finally`` leaves the relay in its safe state."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("door_worker_stuck", door=self.config.id)
                self._to_safe_state()

    def _to_safe_state(self) -> None:
        try:
            self.relay.set(self.safe_unlocked)
        except Exception as exc:  # broad on purpose: cleanup must go on to close
            log.exception("relay_safe_state_failed", door=self.config.id, error=str(exc))
        for dev in (self.relay, self.contact, self.rex):
            if dev is None:
                continue
            try:
                dev.close()
            except Exception as exc:  # broad on purpose: each resource closes on its own
                log.exception("door_device_close_failed", door=self.config.id,
                              error=str(exc))

    # -- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stop:
                        break
                    # Wake at the relock deadline when it comes before the next input poll,
                    # so the door relocks at unlock_s, not up to one poll period later.
                    pending = self._deadline - self._clock()
                    self._cond.wait(min(POLL_S, pending) if pending > 0 else POLL_S)
                    if self._stop:
                        break
                    deadline, mode, pulse = self._deadline, self._mode, self._pulse
                    self._pulse = False
                self._tick(deadline, mode, pulse)
        except Exception as exc:  # the worker's one broad boundary
            log.exception("door_worker_failed", door=self.config.id, error=str(exc))
        finally:
            self._to_safe_state()
            self.state.unlocked = self.safe_unlocked
            self._emit("door_unlocked" if self.safe_unlocked else "door_locked",
                       reason="shutdown")

    def _tick(self, deadline: float, mode: Mode, pulse: bool = False) -> None:
        now = self._clock()
        if not all(self._claimed.values()) and now >= self._next_claim:
            self._next_claim = now + RECLAIM_S
            self._claim()
        if mode is not self.state.mode:
            self.state.mode = mode
        rex = self._read(self.rex, "rex") is True
        if rex and now >= self._rex_until:
            self._rex_until = now + REX_GRACE_S
            self._emit("rex_pressed")
            if self.config.rex_unlocks:
                # Egress: an exit request releases the door in every mode, lockdown
                # included; it never extends the card-grant deadline, so nothing of it is
                # left to open the door when lockdown ends.
                self._egress_until = now + self.config.unlock_s
        want = (mode is Mode.FREE_PASSAGE or now < self._egress_until
                or (mode is not Mode.LOCKDOWN and (now < deadline or pulse)))
        if want != self.state.unlocked and self._claimed["relay"]:
            try:
                self.relay.set(want)
            except Exception as exc:  # noqa: BLE001 - a relay fault is reported, retried
                self._fault("relay", exc)
            else:
                self._clear("relay")
                self.state.unlocked = want
                self._emit("door_unlocked" if want else "door_locked")
        self._watch_contact(now)

    def _watch_contact(self, now: float) -> None:
        if self.contact is None:
            return
        is_open = self._read(self.contact, "contact")
        if is_open is None:
            # A failed read says nothing about the door: keep the last known state rather
            # than take it for "closed", which would clear a forced alarm that still holds.
            return
        if is_open and not self.state.open:
            self.state.open = True
            self._opened_at = now
            authorised = self.state.unlocked or now < self._rex_until
            if not authorised:
                self.state.forced_alarm = True
                self._emit("door_forced")
            else:
                self._emit("door_opened")
        elif not is_open and self.state.open:
            self.state.open = False
            self._opened_at = None
            cleared = self.state.held_alarm or self.state.forced_alarm
            self.state.held_alarm = self.state.forced_alarm = False
            self._emit("door_closed", reason="alarm_cleared" if cleared else None)
        elif (is_open and not self.state.held_alarm and not self.state.forced_alarm
              and self._opened_at is not None and not self.state.unlocked
              and now - self._opened_at >= self.config.held_open_s):
            self.state.held_alarm = True
            self._emit("door_held_open")

    def _read(self, dev: Input | None, what: str) -> bool | None:
        """The input's level: False without a device, None when the read failed or the
        device is not claimed yet."""
        if dev is None:
            return False
        if not self._claimed[what]:
            return None
        try:
            level = dev.active()
        except Exception as exc:  # noqa: BLE001 - an input fault is reported, retried
            self._fault(what, exc)
            return None
        self._clear(what)
        return level

    def _clear(self, what: str) -> None:
        if what in self._faults:
            self._faults.discard(what)
            self.state.faults = tuple(sorted(self._faults))
            self._emit(f"{what}_restored")

    def _fault(self, what: str, exc: Exception) -> None:
        if what not in self._faults:
            self._faults.add(what)
            self.state.faults = tuple(sorted(self._faults))
            self._emit(f"{what}_fault", error=str(exc))

    def _emit(self, kind: str, reason: str | None = None, error: str | None = None) -> None:
        data = {"error": error} if error else {}
        try:
            self._emit_fn(Event(kind, door=self.config.id, reason=reason, data=data),
                          self.state.as_json())
        except Exception as exc:  # noqa: BLE001 - never let a failed record stop the door
            log.error("door_event_not_recorded", door=self.config.id, kind=kind,
                      error=str(exc))
