"""Tests for the door worker in :mod:`agent.door`.

Each test drives a real ``DoorWorker`` thread over simulated devices on its own ``SimBus``.
Most tests inject a ``StepClock``: the worker judges every deadline (relock, exit-request
grace, held-open) by that clock, so the test decides exactly when time passes, and
``settle()`` waits until the worker has run whole ticks at the current time before a
test asserts that something did *not* happen. Waiting is always "poll until true, fail
after a generous deadline"; nothing asserts how long anything took.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.config import DoorConfig
from agent.decision import Mode
from agent.door import RECLAIM_S, DoorWorker
from drivers.base import DeviceError
from drivers.simulated import SimBus, SimulatedInput, SimulatedRelay
from protocol.chain import Event
from tests.conftest import wait_for

UNLOCK_S = 0.3
HELD_OPEN_S = 0.3
START = 100.0
"""Where every StepClock starts; the tests place events at ``START + offset``."""
WAIT_S = 5.0
"""Generous bound for a condition the worker reaches within a few 50 ms ticks."""

EventRecord = tuple[str, str | None]
SHUTDOWN_LOCKED: EventRecord = ("door_locked", "shutdown")
SHUTDOWN_UNLOCKED: EventRecord = ("door_unlocked", "shutdown")


class StepClock:
    """A monotonic clock that moves only when the test says so, counting its reads."""

    def __init__(self, start: float = START) -> None:
        self._now = start
        self._reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self._reads += 1
            return self._now

    @property
    def reads(self) -> int:
        """How often the clock has been read."""
        with self._lock:
            return self._reads

    def set(self, now: float) -> None:
        """Move time to ``now`` (never backwards)."""
        with self._lock:
            assert now >= self._now
            self._now = now


class FlakyRelay(SimulatedRelay):
    """A simulated relay whose ``set`` raises while ``fail_unlock`` (on unlock) or
    ``fail_all`` is set, as a relay board that stops answering would."""

    def __init__(self, name: str, bus: SimBus) -> None:
        super().__init__(name, {}, bus)
        self.fail_unlock = threading.Event()
        self.fail_all = threading.Event()
        self.attempts: list[bool] = []
        self.closed = 0
        self.fail_open = False

    def open(self) -> None:
        """Fail while ``fail_open`` is set, as an unplugged board does."""
        if self.fail_open:
            raise DeviceError(f"relay {self.name}: no such device")

    def set(self, unlocked: bool) -> None:
        """Record the attempt, then fail or drive the simulated lock."""
        self.attempts.append(unlocked)
        if self.fail_all.is_set() or (unlocked and self.fail_unlock.is_set()):
            raise OSError(f"relay {self.name}: I/O error")
        super().set(unlocked)

    def close(self) -> None:
        """Count releases."""
        self.closed += 1


class FlakyInput(SimulatedInput):
    """A simulated input whose ``active`` raises while ``fail`` is set."""

    def __init__(self, name: str, bus: SimBus) -> None:
        super().__init__(name, {}, bus)
        self.fail = threading.Event()
        self.fail_open = False

    def open(self) -> None:
        """Claim the input, or fail as a missing GPIO line would."""
        if self.fail_open:
            raise DeviceError(f"input {self.name}: no such line")

    def active(self) -> bool:
        """The bus level, or an error while failing."""
        if self.fail.is_set():
            raise OSError(f"input {self.name}: read failed")
        return super().active()


@dataclass
class Door:
    """One door under test: its worker, devices, bus, clock and recorded events."""

    worker: DoorWorker
    relay: SimulatedRelay
    bus: SimBus
    clock: StepClock | None
    events: list[EventRecord] = field(default_factory=list)

    # -- the outside world -----------------------------------------------------------

    def set_contact(self, is_open: bool) -> None:
        """Open or close the door leaf."""
        self.bus.set_level("d1.contact", is_open)

    def set_rex(self, pressed: bool) -> None:
        """Press or release the exit button."""
        self.bus.set_level("d1.rex", pressed)

    def at(self, offset: float) -> None:
        """Move the worker's clock to ``START + offset``, computed as the worker computes
        its deadlines so that an exact deadline compares equal."""
        assert self.clock is not None
        self.clock.set(START + offset)

    # -- observation -------------------------------------------------------------------

    @property
    def unlocked(self) -> bool:
        """The relay's current output as the bus sees it."""
        return self.bus.relays.get(self.relay.name, False)

    def kinds(self) -> list[str]:
        """Kinds of the events emitted so far."""
        return [kind for kind, _ in list(self.events)]

    def count(self, kind: str) -> int:
        """How many events of ``kind`` were emitted."""
        return self.kinds().count(kind)

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        """``wait_for`` the condition, failing with the events seen so far."""
        wait_for(condition, lambda: f"{what}; events: {self.events}", WAIT_S, interval=0.005)

    def wait_event(self, kind: str, reason: str | None = None, *, count: int = 1) -> None:
        """Wait until ``count`` events of ``kind`` (with ``reason``, when given) exist."""
        self.wait(lambda: sum(1 for k, r in list(self.events) if k == kind and
                                  (reason is None or r == reason)) >= count,
                      f"{count} x {kind}" + (f" ({reason})" if reason else ""))

    def settle(self) -> None:
        """Wait until the worker has completed at least one whole tick at the current time.

        The worker reads the clock once at the start of every tick, so after three more reads
        the tick that read the current time has finished.
        """
        assert self.clock is not None
        clock = self.clock
        target = clock.reads + 3
        self.wait(lambda: clock.reads >= target, "the worker to tick")


DoorFactory = Callable[..., Door]


@pytest.fixture
def make_door() -> Iterator[DoorFactory]:
    """Builds started doors on private buses; every worker is stopped after the test."""
    doors: list[Door] = []

    def make(*, relay: SimulatedRelay | None = None, contact: SimulatedInput | None = None,
             bus: SimBus | None = None, real_clock: bool = False, start: bool = True,
             **config: Any) -> Door:
        bus = bus or SimBus()
        relay = relay or SimulatedRelay("d1.relay", {}, bus)
        contact = contact or SimulatedInput("d1.contact", {}, bus)
        rex = SimulatedInput("d1.rex", {}, bus)
        clock = None if real_clock else StepClock()
        cfg = DoorConfig(id="d1", unlock_s=UNLOCK_S, held_open_s=HELD_OPEN_S, **config)
        events: list[EventRecord] = []

        def emit(event: Event, state: str) -> None:
            assert event.door == "d1"
            assert state.startswith("{")
            events.append((event.kind, event.reason))

        worker = DoorWorker(cfg, relay, emit, contact=contact, rex=rex,
                            clock=clock or time.monotonic)
        door = Door(worker, relay, bus, clock, events)
        doors.append(door)
        if start:
            worker.start()
        return door

    yield make
    for door in doors:
        door.worker.stop()


def test_grant_unlocks_then_relocks_in_real_time(make_door: DoorFactory) -> None:
    """With the real clock a grant unlocks the relay and it locks again by itself."""
    door = make_door(real_clock=True)
    door.worker.grant()
    # The relock event, not the relay level: a poll could miss the unlocked 0.3 s.
    door.wait_event("door_locked", count=2)
    assert not door.unlocked
    assert door.relay.history == [False, True, False]
    assert door.events == [("door_locked", "startup"), ("door_unlocked", None),
                           ("door_locked", None)]


def test_grant_relocks_exactly_after_unlock_s(make_door: DoorFactory) -> None:
    """The relay stays unlocked until unlock_s has passed since the grant, then locks."""
    door = make_door()
    door.worker.grant()
    door.wait_event("door_unlocked")
    door.at(UNLOCK_S - 0.01)
    door.settle()
    assert door.unlocked
    door.at(UNLOCK_S)
    door.wait_event("door_locked", count=2)
    assert not door.unlocked
    assert door.relay.history == [False, True, False]


def test_second_grant_extends_the_deadline(make_door: DoorFactory) -> None:
    """A grant during an unlock moves the one relock deadline: the relay stays unlocked past
    the first deadline, without relocking in between, and locks after the second."""
    door = make_door()
    door.worker.grant()
    door.wait_event("door_unlocked")
    door.at(0.2)
    door.worker.grant()  # new deadline: START + 0.2 + UNLOCK_S
    door.at(0.4)  # past the first deadline (0.3), before the second (0.5)
    door.settle()
    assert door.unlocked
    assert door.clock is not None
    door.clock.set((START + 0.2) + UNLOCK_S)  # exactly the second deadline
    door.wait_event("door_locked", count=2)
    assert door.relay.history == [False, True, False]
    assert door.count("door_unlocked") == 1


@pytest.mark.parametrize("fail_mode", ["secure", "safe"])
def test_start_drives_the_relay_locked_first(make_door: DoorFactory, fail_mode: str) -> None:
    """start() locks the relay before anything else, whatever the bus said before and
    whatever the fail mode, and reports it."""
    bus = SimBus()
    bus.relays["d1.relay"] = True
    door = make_door(bus=bus, fail_mode=fail_mode, start=False)
    assert door.relay.history == []
    door.worker.start()
    assert door.relay.history == [False]
    assert not door.unlocked
    assert door.events[0] == ("door_locked", "startup")


def test_device_that_cannot_be_claimed_is_a_fault_claimed_again(
        make_door: DoorFactory) -> None:
    """An input that fails to open at start is reported once as a fault, the door still
    starts locked and works, and the worker claims the input again later, after which the
    door is watched as usual."""
    bus = SimBus()
    contact = FlakyInput("d1.contact", bus)
    contact.fail_open = True
    door = make_door(contact=contact, bus=bus)
    door.wait_event("contact_fault")
    assert door.relay.history == [False]
    assert door.worker.state.faults == ("contact",)
    door.worker.grant()
    door.wait_event("door_unlocked")
    contact.fail_open = False
    door.at(RECLAIM_S + UNLOCK_S)
    door.wait(lambda: door.worker.state.faults == (), "the contact to be claimed")
    door.wait_event("contact_restored")
    door.settle()
    door.set_contact(True)
    door.wait_event("door_forced")
    assert door.count("contact_fault") == 1


def test_relay_that_cannot_be_claimed_is_retried(make_door: DoorFactory) -> None:
    """A relay whose open() fails is a relay_fault, the worker keeps running, and once the
    relay can be claimed it is locked and grants drive it."""
    bus = SimBus()
    relay = FlakyRelay("d1.relay", bus)
    relay.fail_open = True
    door = make_door(relay=relay, bus=bus)
    door.wait_event("relay_fault")
    assert door.worker.alive
    relay.fail_open = False
    door.at(RECLAIM_S)
    door.wait_event("door_locked", "startup")
    door.wait_event("relay_restored")
    door.worker.grant()
    door.wait_event("door_unlocked")


def test_stop_leaves_a_fail_secure_door_locked(make_door: DoorFactory) -> None:
    """stop() of a fail-secure door, even mid-unlock, leaves the relay locked and emits a
    final door_locked(shutdown)."""
    door = make_door()
    door.worker.grant()
    door.wait_event("door_unlocked")
    door.worker.stop()
    assert door.relay.history[-1] is False
    assert not door.unlocked
    assert door.events[-1] == SHUTDOWN_LOCKED
    assert door.worker.state.unlocked is False


def test_stop_leaves_a_fail_safe_door_unlocked(make_door: DoorFactory) -> None:
    """stop() of a fail-safe door leaves the relay unlocked and emits a final
    door_unlocked(shutdown)."""
    door = make_door(fail_mode="safe")
    door.settle()
    assert door.worker.safe_unlocked
    door.worker.stop()
    assert door.relay.history == [False, True]
    assert door.unlocked
    assert door.events[-1] == SHUTDOWN_UNLOCKED


def test_contact_opening_while_locked_is_forced(make_door: DoorFactory) -> None:
    """The contact opening while locked with no exit request raises door_forced, and the
    door closing again emits door_closed with reason alarm_cleared."""
    door = make_door()
    door.set_contact(True)
    door.wait_event("door_forced")
    assert door.worker.state.forced_alarm
    assert not door.unlocked
    door.set_contact(False)
    door.wait_event("door_closed")
    assert door.events[-2:] == [("door_forced", None), ("door_closed", "alarm_cleared")]
    assert not door.worker.state.forced_alarm


def test_granted_opening_is_not_forced(make_door: DoorFactory) -> None:
    """Opening the door while a grant holds it unlocked is door_opened, and closing it
    clears nothing."""
    door = make_door()
    door.worker.grant()
    door.wait_event("door_unlocked")
    door.set_contact(True)
    door.wait_event("door_opened")
    door.set_contact(False)
    door.wait_event("door_closed")
    assert door.count("door_forced") == 0
    assert door.events[-1] == ("door_closed", None)


def test_rex_unlocks_and_the_following_open_is_not_forced(make_door: DoorFactory) -> None:
    """With rex_unlocks an exit request unlocks the door, and the opening that follows is a
    door_opened, not door_forced."""
    door = make_door(rex_unlocks=True)
    door.set_rex(True)
    door.wait_event("door_unlocked")
    door.set_rex(False)
    assert door.kinds()[1:3] == ["rex_pressed", "door_unlocked"]
    door.set_contact(True)
    door.wait_event("door_opened")
    door.at(UNLOCK_S + 0.1)
    door.wait_event("door_locked", count=2)
    door.set_contact(False)
    door.wait_event("door_closed")
    assert door.count("door_forced") == 0
    assert door.count("rex_pressed") == 1


def test_rex_without_unlock_still_excuses_the_open(make_door: DoorFactory) -> None:
    """With rex_unlocks=False an exit request leaves the relay locked, yet the opening that
    follows (mechanical egress) is not forced."""
    door = make_door(rex_unlocks=False)
    door.set_rex(True)
    door.wait_event("rex_pressed")
    door.set_rex(False)
    door.settle()
    door.set_contact(True)
    door.wait_event("door_opened")
    door.settle()
    assert door.relay.history == [False]
    assert door.count("door_unlocked") == 0
    assert door.count("door_forced") == 0


def test_held_open_after_relock_alarms_once(make_door: DoorFactory) -> None:
    """A door opened on a grant and still open held_open_s after it opened, once relocked,
    raises door_held_open exactly once; closing it clears the alarm."""
    door = make_door()
    door.worker.grant()
    door.wait_event("door_unlocked")
    door.set_contact(True)
    door.wait_event("door_opened")
    door.at(HELD_OPEN_S - 0.1)  # open but still unlocked: no alarm
    door.settle()
    assert door.count("door_held_open") == 0
    door.at(max(UNLOCK_S, HELD_OPEN_S) + 0.05)  # past the relock deadline and held_open_s
    door.wait_event("door_held_open")
    assert door.kinds()[-2:] == ["door_locked", "door_held_open"]
    for step in range(2, 5):
        door.at(step * (UNLOCK_S + HELD_OPEN_S))
        door.settle()
    assert door.count("door_held_open") == 1
    assert door.count("door_forced") == 0
    assert door.worker.state.held_alarm
    door.set_contact(False)
    door.wait_event("door_closed")
    assert door.events[-1] == ("door_closed", "alarm_cleared")


def test_lockdown_keeps_the_door_locked_despite_grant(make_door: DoorFactory) -> None:
    """In lockdown a grant does not unlock the door, neither during lockdown nor when
    lockdown ends before the grant's unlock time would have run out."""
    door = make_door()
    door.worker.set_mode(Mode.LOCKDOWN)
    door.settle()
    door.worker.grant()
    door.settle()
    assert not door.unlocked
    assert door.worker.state.mode is Mode.LOCKDOWN
    door.worker.set_mode(Mode.NORMAL)
    door.settle()
    assert door.relay.history == [False]
    assert door.count("door_unlocked") == 0


def test_lockdown_relocks_a_door_unlocked_by_grant(make_door: DoorFactory) -> None:
    """Lockdown locks a door that a grant had unlocked, at once."""
    door = make_door()
    door.worker.grant()
    door.wait_event("door_unlocked")
    door.worker.set_mode(Mode.LOCKDOWN)
    door.wait_event("door_locked", count=2)
    assert not door.unlocked


def test_rex_in_lockdown_releases_for_egress_only(make_door: DoorFactory) -> None:
    """During lockdown an exit request still releases the door for unlock_s (egress is never
    blocked), and nothing of it is left to unlock the door again when lockdown ends."""
    door = make_door(rex_unlocks=True)
    door.worker.set_mode(Mode.LOCKDOWN)
    door.settle()
    door.set_rex(True)
    door.wait_event("rex_pressed")
    door.wait_event("door_unlocked")
    door.set_rex(False)
    door.at(UNLOCK_S + 0.1)
    door.wait_event("door_locked", count=2)
    door.worker.set_mode(Mode.NORMAL)
    door.settle()
    assert door.relay.history == [False, True, False]


def test_grant_always_pulses_the_relay(make_door: DoorFactory) -> None:
    """A grant whose unlock time has already run out when the worker wakes still drives
    the relay once: a grant never passes without the door being released."""
    door = make_door()
    door.settle()
    # Hold the worker's lock so it cannot tick between the grant and the clock jump.
    with door.worker._cond:  # noqa: SLF001 - orders the worker's wake-up after the jump
        door.worker.grant()
        door.at(UNLOCK_S * 10)
    door.wait_event("door_unlocked")
    door.wait_event("door_locked", count=2)
    assert door.relay.history == [False, True, False]


def test_free_passage_holds_the_door_unlocked(make_door: DoorFactory) -> None:
    """Free passage unlocks the door and keeps it unlocked however long it stays open,
    without forced or held-open alarms; normal mode locks it again."""
    door = make_door()
    door.worker.set_mode(Mode.FREE_PASSAGE)
    door.wait_event("door_unlocked")
    door.set_contact(True)
    door.wait_event("door_opened")
    for step in range(1, 4):
        door.at(step * 10 * max(UNLOCK_S, HELD_OPEN_S))
        door.settle()
    assert door.unlocked
    assert door.count("door_held_open") == 0
    assert door.count("door_forced") == 0
    door.set_contact(False)
    door.wait_event("door_closed")
    door.worker.set_mode(Mode.NORMAL)
    door.wait_event("door_locked", count=2)
    assert door.relay.history == [False, True, False]


def test_relay_fault_is_reported_once_and_retried(make_door: DoorFactory) -> None:
    """A relay whose set() raises yields one relay_fault event; the worker keeps running,
    retries, and unlocks once the relay answers again."""
    bus = SimBus()
    relay = FlakyRelay("d1.relay", bus)
    relay.fail_unlock.set()
    door = make_door(relay=relay, bus=bus)
    door.worker.grant()
    door.wait_event("relay_fault")
    attempts = relay.attempts.count(True)
    door.settle()
    door.settle()
    assert relay.attempts.count(True) > attempts  # retried on later ticks
    assert door.count("relay_fault") == 1
    assert not door.unlocked
    assert door.worker.state.unlocked is False
    relay.fail_unlock.clear()
    door.wait_event("door_unlocked")
    assert door.unlocked
    door.at(2 * UNLOCK_S)
    door.wait_event("door_locked", count=2)


def test_relay_fault_while_locking_keeps_retrying(make_door: DoorFactory) -> None:
    """A relay that fails while relocking is retried until it locks; the fault is reported
    once."""
    bus = SimBus()
    relay = FlakyRelay("d1.relay", bus)
    door = make_door(relay=relay, bus=bus)
    door.worker.grant()
    door.wait_event("door_unlocked")
    relay.fail_all.set()
    door.at(UNLOCK_S)
    door.wait_event("relay_fault")
    door.settle()
    door.settle()
    assert door.count("relay_fault") == 1
    relay.fail_all.clear()
    door.wait_event("door_locked", count=2)
    assert not door.unlocked


def test_contact_fault_does_not_clear_a_forced_alarm(make_door: DoorFactory) -> None:
    """A contact input that fails to read is reported as contact_fault and is not taken for
    the door closing: no door_closed, and the forced alarm stays until it really closes."""
    bus = SimBus()
    contact = FlakyInput("d1.contact", bus)
    door = make_door(contact=contact, bus=bus)
    door.set_contact(True)
    door.wait_event("door_forced")
    contact.fail.set()
    door.wait_event("contact_fault")
    door.settle()
    assert door.count("door_closed") == 0
    assert door.worker.state.forced_alarm
    assert door.worker.state.open
    contact.fail.clear()
    door.settle()
    assert door.count("door_forced") == 1
    door.set_contact(False)
    door.wait_event("door_closed")
    assert door.events[-1] == ("door_closed", "alarm_cleared")
    assert door.count("contact_fault") == 1


@pytest.mark.parametrize(("fail_mode", "final"), [("secure", SHUTDOWN_LOCKED),
                                                  ("safe", SHUTDOWN_UNLOCKED)])
def test_exception_in_the_loop_leaves_the_safe_state(
        make_door: DoorFactory, monkeypatch: pytest.MonkeyPatch, fail_mode: str,
        final: EventRecord) -> None:
    """An exception escaping the worker's loop ends it with the relay in the door's safe
    state (locked for fail-secure even mid-unlock, unlocked for fail-safe) and a final
    event."""
    door = make_door(fail_mode=fail_mode)
    door.worker.grant()
    door.wait_event("door_unlocked")

    def broken_tick(deadline: float, mode: Mode) -> None:
        raise RuntimeError("bug in the loop")

    monkeypatch.setattr(door.worker, "_tick", broken_tick)
    door.wait_event(final[0], final[1])
    assert door.events[-1] == final
    assert door.unlocked is door.worker.safe_unlocked
    assert door.relay.history[-1] is door.worker.safe_unlocked
    door.worker.stop()  # returns at once: the thread has already ended
    assert door.events.count(final) == 1
