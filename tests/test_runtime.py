"""The agent in-process: the card path, store failures, reader recovery, modes, clock.

The readers are simulated readers whose reads carry a time the test sets (``ReadClock``):
the agent's debounce compares those times, so a test moves time on instead of sleeping.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.decision import Decision, Mode, Reason
from agent.runtime import Agent, ReadTiming
from agent.store import CredentialEntry, Store
from common.sqlite import StoreError
from drivers.base import CardRead, DeviceError
from drivers.simulated import SimBus, SimulatedReader, SimulatedRelay
from protocol.chain import Event
from protocol.hashing import CredentialHasher, log_prefix
from tests.agentconf import KEY, DoorSpec, ReaderSpec, agent_config
from tests.conftest import wait_for

CARD = "em4100:67003B51C6"
UNKNOWN = "em4100:0000000000"
DEBOUNCE_S = 0.5
GRANTED = Decision(True, Reason.GRANTED)


class ReadClock:
    """The time the test's readers stamp on each card read; it moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds``."""
        self.now += seconds


class ClockedReader(SimulatedReader):
    """A simulated reader whose reads carry the ``ReadClock``'s time when presented."""

    def __init__(self, name: str, bus: SimBus, clock: ReadClock) -> None:
        super().__init__(name, {}, bus)
        self.clock = clock
        self._reads: queue.Queue[CardRead] = queue.Queue()

    def present(self, card_id: str) -> None:
        """Present ``card_id`` now, by the test's clock."""
        self._reads.put(CardRead(card_id, self.clock.now))

    def read(self, timeout: float) -> CardRead | None:
        """The next card presented, or None after ``timeout``."""
        if not self._open:
            raise DeviceError(f"clocked reader {self.name}: not open")
        try:
            return self._reads.get(timeout=timeout)
        except queue.Empty:
            return None


class Harness:
    """An agent on a private SimBus, its readers clocked by the test, decisions collected."""

    def __init__(self, folder: Path, devices: dict[str, Any] | None = None, *,
                 bus: SimBus | None = None, clock: ReadClock | None = None) -> None:
        self.bus = bus or SimBus()
        self.clock = clock or ReadClock()
        self.config = agent_config(
            folder, site_id="t", gateway_id="t-gw", policy={"anti_passback": "hard"},
            doors=(DoorSpec(unlock_s=0.3),),
            readers=(ReaderSpec("front-in", debounce_s=DEBOUNCE_S),
                     ReaderSpec("front-out", direction="exit", debounce_s=DEBOUNCE_S)))
        chosen: dict[str, Any] = {
            **{r: ClockedReader(r, self.bus, self.clock) for r in ("front-in", "front-out")},
            **(devices or {})}
        self.readers = {k: v for k, v in chosen.items() if isinstance(v, ClockedReader)}
        self.agent = Agent(self.config, bus=self.bus, devices=chosen)
        self.decisions: list[tuple[str, Decision]] = []
        self.agent.on_decision = self._collect

    def _collect(self, reader: Any, decision: Decision, _t: ReadTiming) -> None:
        self.decisions.append((reader.id, decision))

    def start(self, cards: tuple[str, ...] = (CARD,)) -> None:
        """Start the agent with ``cards`` on the allowlist."""
        self.agent.start()
        assert self.agent.store is not None
        hasher = CredentialHasher(KEY)
        self.agent.store.replace_allowlist(
            [CredentialEntry(hasher.credential(c)) for c in cards], 1)

    def tap(self, reader: str, card: str, count: int) -> Decision:
        """Present ``card`` and wait until the agent has made ``count`` decisions."""
        self.readers[reader].present(card)
        wait_for(lambda: len(self.decisions) >= count, f"decision {count}")
        return self.decisions[count - 1][1]

    @property
    def store(self) -> Store:
        """The agent's store."""
        assert self.agent.store is not None
        return self.agent.store

    def door_events(self) -> list[tuple[str, str | None]]:
        """(kind, reason) of the lock events the door worker recorded, oldest first."""
        return [(e.kind, e.reason) for e in self.store.events(door="front")
                if e.kind in ("door_locked", "door_unlocked")]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """A started agent with one card enrolled."""
    h = Harness(tmp_path)
    h.start()
    try:
        yield h
    finally:
        h.agent.stop()


def test_grant_commits_the_event_before_the_relay_unlocks(harness: Harness) -> None:
    """A valid card is granted, its event is stored with the hash prefix only before the
    relay unlocks, and the relay unlocks and relocks."""
    assert harness.tap("front-in", CARD, 1) == GRANTED
    wait_for(lambda: harness.door_events() == [
        ("door_locked", "startup"), ("door_unlocked", None), ("door_locked", None)],
        "the unlock, then the relock")
    assert harness.bus.relays.get("front.relay") is False
    kinds = [e.kind for e in harness.store.events()]
    assert kinds.index("access_granted") < kinds.index("door_unlocked")
    event = next(e for e in harness.store.events() if e.kind == "access_granted")
    assert event.cred == log_prefix(CredentialHasher(KEY).credential(CARD))
    assert event.reader == "front-in" and event.direction == "entry"


def test_repeated_frames_of_one_presentation_are_one_decision(harness: Harness) -> None:
    """Repeats of the same card less than the debounce time apart give one decision; a
    presentation after it counts again (here: anti-passback denies the second entry)."""
    assert harness.tap("front-in", CARD, 1) == GRANTED
    for _ in range(3):
        harness.clock.advance(0.1)  # an RDM6300 repeats a card in its field every ~100 ms
        harness.readers["front-in"].present(CARD)
    harness.clock.advance(DEBOUNCE_S + 0.1)
    assert harness.tap("front-in", CARD, 2) == Decision(False, Reason.ANTI_PASSBACK)
    # The reader hands reads on in order: once this card is decided, so was every repeat.
    assert harness.tap("front-in", UNKNOWN, 3).reason is Reason.UNKNOWN_CARD
    assert [d for r, d in harness.decisions if r == "front-in"] == [
        GRANTED, Decision(False, Reason.ANTI_PASSBACK), Decision(False, Reason.UNKNOWN_CARD)]
    assert harness.tap("front-out", CARD, 4) == GRANTED


def test_unwritable_event_denies_and_keeps_the_door_shut(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the event cannot be committed (database full), the card is denied with
    store_error, the door is never asked to open, and the agent goes on once space
    returns."""
    door = harness.agent.doors["front"]
    grant = door.grant
    grants: list[None] = []

    def counted_grant() -> None:
        grants.append(None)
        grant()

    monkeypatch.setattr(door, "grant", counted_grant)
    writer: sqlite3.Connection = harness.store._writer  # noqa: SLF001 - fault injection
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(StoreError, match="full"):
        for _ in range(1000):  # fill the last free space in the event table's pages
            harness.store.append(Event("filler", data={"pad": "x" * 500}))
    decision = harness.tap("front-in", CARD, 1)
    assert decision == Decision(False, Reason.STORE_ERROR)
    # The card path asks the door to open before it reports a decision, and only for a
    # grant: with no request made, the relay stays as the start left it.
    assert grants == []
    assert harness.bus.relays.get("front.relay") is False
    writer.execute("PRAGMA max_page_count=1073741823")
    harness.clock.advance(DEBOUNCE_S + 0.1)  # the same card, presented anew
    assert harness.tap("front-in", CARD, 2) == GRANTED
    assert len(grants) == 1
    assert harness.store.verify_chain().ok


def test_lockdown_denies_and_free_passage_opens(harness: Harness) -> None:
    """Switching the mode records a mode_changed event and changes the next decisions."""
    harness.agent.set_mode(Mode.LOCKDOWN, source="test")
    assert harness.tap("front-in", CARD, 1).reason is Reason.LOCKDOWN
    harness.agent.set_mode(Mode.FREE_PASSAGE, source="test")
    wait_for(lambda: harness.bus.relays.get("front.relay") is True, "free passage unlock")
    assert harness.tap("front-in", UNKNOWN, 2).reason is Reason.GRANTED_FREE_PASSAGE
    kinds = [e.reason for e in harness.store.events() if e.kind == "mode_changed"]
    assert kinds == ["lockdown", "free_passage"]


class FlakyReader(ClockedReader):
    """A clocked reader that fails to open a set number of times, then dies once."""

    def __init__(self, name: str, bus: SimBus, clock: ReadClock, failures: int) -> None:
        super().__init__(name, bus, clock)
        self.failures = failures
        self.opens = 0

    def open(self) -> None:
        """Fail the first ``failures`` opens."""
        self.opens += 1
        if self.opens <= self.failures:
            raise DeviceError(f"{self.name}: unplugged")
        super().open()

    def read(self, timeout: float) -> CardRead | None:
        """Die with the device once a card id 'unplug' is presented."""
        read = super().read(timeout)
        if read is not None and read.card_id == "unplug":
            raise DeviceError(f"{self.name}: device vanished")
        return read


def test_reader_failure_is_reported_and_reopened(tmp_path: Path) -> None:
    """A reader that fails to open and later vanishes gives reader_offline events and
    comes back online by itself, and its next card is decided."""
    bus, clock = SimBus(), ReadClock()
    flaky = FlakyReader("front-in", bus, clock, failures=2)
    h = Harness(tmp_path, devices={"front-in": flaky}, bus=bus, clock=clock)
    h.start()
    try:
        wait_for(lambda: any(e.kind == "reader_online" and e.reader == "front-in"
                             for e in h.store.events()), "the reader to come online")
        flaky.present("unplug")
        wait_for(lambda: [e.kind for e in h.store.events() if e.reader == "front-in"]
                 [-2:] == ["reader_offline", "reader_online"], "offline then online again",
                 timeout=15)
        assert h.tap("front-in", CARD, 1).granted
        offline = [e for e in h.store.events() if e.kind == "reader_offline"]
        assert len(offline) == 2
        assert "unplugged" in offline[0].data["error"]
        assert flaky.opens >= 4
    finally:
        h.agent.stop()


def test_relay_that_cannot_be_claimed_does_not_stop_the_agent(tmp_path: Path) -> None:
    """A relay failing at start is recorded as a relay_fault and shown in the door's state;
    the agent still starts, decides and records taps (a valid card is denied as door_fault,
    since the door cannot open), and stops cleanly."""

    class BrokenRelay(SimulatedRelay):
        def open(self) -> None:
            raise DeviceError("relay board not found on /dev/ttyUSB9")

    h = Harness(tmp_path, devices={"front.relay": BrokenRelay("front.relay", {})})
    h.start()
    try:
        faults = [e for e in h.store.events() if e.kind == "relay_fault"]
        assert len(faults) == 1 and "ttyUSB9" in faults[0].data["error"]
        assert h.tap("front-in", CARD, 1) == Decision(False, Reason.DOOR_FAULT)
        state = next(json.loads(d["state"]) for d in h.store.device_states()
                     if d["kind"] == "door")
        assert state["faults"] == ["relay"]
    finally:
        h.agent.stop()
    store = Store(tmp_path / "pg.db")
    assert [e.kind for e in store.events()][-1] == "agent_stopped"
    store.close()


def test_taps_are_decided_and_recorded_while_a_whole_list_is_applied(
        harness: Harness) -> None:
    """A whole-list apply does not hold up the card path: a tap made while the apply is
    in progress is decided on the old list and its event committed before the apply
    finishes; after it, the new list decides."""
    total = 2_000
    half_consumed = threading.Event()
    tap_recorded = threading.Event()
    applied = threading.Event()

    def new_list() -> Iterator[CredentialEntry]:
        # The store consumes this inside its apply transaction; at the halfway entry the
        # apply is certainly in progress, and it stays so until the tap is recorded.
        for i in range(total):
            if i == total // 2:
                half_consumed.set()
                if not tap_recorded.wait(60):
                    raise RuntimeError("the test never released the apply")
            yield CredentialEntry((i + 1).to_bytes(32, "big"))

    def apply() -> None:
        try:
            harness.store.replace_allowlist(new_list(), 2)
        finally:
            applied.set()

    applier = threading.Thread(target=apply)
    applier.start()
    try:
        wait_for(half_consumed.is_set, "the apply to be half way")
        assert harness.tap("front-in", CARD, 1) == GRANTED  # CARD is only on the old list
        assert [e.kind for e in harness.store.events(kind="access_granted")] == [
            "access_granted"]
        assert not applied.is_set()
    finally:
        tap_recorded.set()
        applier.join()
    assert harness.store.counts()["credentials"] == total
    harness.clock.advance(DEBOUNCE_S + 0.1)
    assert harness.tap("front-in", CARD, 2).reason is Reason.UNKNOWN_CARD


def test_event_store_high_water_alarm(tmp_path: Path) -> None:
    """When stored events pass 80 % of max_events and cannot be pruned, one
    event_store_high_water alarm is recorded, not one per housekeeping run."""
    h = Harness(tmp_path)
    h.config = h.config.model_copy(update={"store": h.config.store.model_copy(
        update={"max_events": 1000})})
    h.agent = Agent(h.config, bus=h.bus)
    h.agent.keep_unacked = True  # as with sync on: nothing acknowledged, nothing pruned
    h.start()
    try:
        for _ in range(800):
            h.store.append(Event("filler"))
        h.agent.prune()
        h.agent.prune()
        kinds = [e.kind for e in h.store.events()]
        assert kinds.count("event_store_high_water") == 1
    finally:
        h.agent.stop()


def test_reader_tamper_becomes_an_event(harness: Harness) -> None:
    """A tamper alarm a reader reports is recorded as reader_tamper raised, and its end as
    reader_tamper cleared, once each."""
    harness.bus.set_level("front-in.tamper", True)

    def tamper_events() -> list[str | None]:
        return [e.reason for e in harness.store.events() if e.kind == "reader_tamper"]

    wait_for(lambda: tamper_events() == ["raised"], "the tamper alarm")
    harness.bus.set_level("front-in.tamper", False)
    wait_for(lambda: tamper_events() == ["raised", "cleared"], "the alarm cleared")
