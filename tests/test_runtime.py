"""The agent in-process: the card path, store failures, reader recovery, modes, clock."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent.config import parse_config
from agent.decision import Decision, Mode, Reason
from agent.runtime import Agent, ReadTiming, clock_state
from agent.store import CredentialEntry, Store
from common.sqlite import StoreError
from drivers.base import CardRead, DeviceError
from drivers.simulated import SimBus, SimulatedReader, SimulatedRelay
from protocol.chain import Event
from protocol.hashing import CredentialHasher, log_prefix
from tests.conftest import wait_for

KEY = bytes(range(32))
CARD = "em4100:67003B51C6"

CONFIG = """
[site]
site_id = "t"
gateway_id = "t-gw"
[store]
path = "{folder}/pg.db"
[keys]
site_key = "{folder}/site.key"
[policy]
anti_passback = "hard"
[[doors]]
id = "front"
unlock_s = 0.3
relay = {{ driver = "simulated" }}
[[readers]]
id = "front-in"
door = "front"
direction = "entry"
driver = "simulated"
debounce_s = 0.5
[[readers]]
id = "front-out"
door = "front"
direction = "exit"
driver = "simulated"
debounce_s = 0.5
"""




class Harness:
    """An agent on a private SimBus with decisions collected."""

    def __init__(self, folder: Path, devices: dict[str, Any] | None = None) -> None:
        (folder / "site.key").write_text(KEY.hex())
        self.bus = SimBus()
        self.config = parse_config(CONFIG.format(folder=folder), "<test>")
        self.agent = Agent(self.config, bus=self.bus, devices=devices)
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
        self.bus.tap(reader, card)
        wait_for(lambda: len(self.decisions) >= count, f"decision {count}")
        return self.decisions[count - 1][1]

    @property
    def store(self) -> Store:
        """The agent's store."""
        assert self.agent.store is not None
        return self.agent.store


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
    """A valid card is granted, its event is stored with the hash prefix only, and the
    relay unlocks and relocks."""
    assert harness.tap("front-in", CARD, 1) == Decision(True, Reason.GRANTED)
    wait_for(lambda: harness.bus.relays.get("front.relay") is True, "the unlock")
    event = next(e for e in harness.store.events() if e.kind == "access_granted")
    assert event.cred == log_prefix(CredentialHasher(KEY).credential(CARD))
    assert event.reader == "front-in" and event.direction == "entry"
    wait_for(lambda: harness.bus.relays.get("front.relay") is False, "the relock")


def test_repeated_frames_of_one_presentation_are_one_decision(harness: Harness) -> None:
    """Repeats of the same card within the debounce time give one decision; after it,
    the card counts again (here: anti-passback denies the second entry)."""
    harness.tap("front-in", CARD, 1)
    for _ in range(3):
        harness.bus.tap("front-in", CARD)
    time.sleep(0.3)
    assert len(harness.decisions) == 1
    time.sleep(0.6)
    assert harness.tap("front-in", CARD, 2) == Decision(False, Reason.ANTI_PASSBACK)
    assert harness.tap("front-out", CARD, 3) == Decision(True, Reason.GRANTED)


def test_unwritable_event_denies_and_keeps_the_door_shut(harness: Harness) -> None:
    """When the event cannot be committed (database full), the card is denied with
    store_error, the relay stays locked, and the agent goes on once space returns."""
    writer: sqlite3.Connection = harness.store._writer  # noqa: SLF001 - fault injection
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(StoreError, match="full"):
        for _ in range(1000):  # fill the last free space in the event table's pages
            harness.store.append(Event("filler", data={"pad": "x" * 500}))
    decision = harness.tap("front-in", CARD, 1)
    assert decision == Decision(False, Reason.STORE_ERROR)
    time.sleep(0.2)
    assert harness.bus.relays.get("front.relay") is False
    writer.execute("PRAGMA max_page_count=1073741823")
    time.sleep(0.6)
    assert harness.tap("front-in", CARD, 2) == Decision(True, Reason.GRANTED)
    assert harness.store.verify_chain().ok


def test_lockdown_denies_and_free_passage_opens(harness: Harness) -> None:
    """Switching the mode records a mode_changed event and changes the next decisions."""
    harness.agent.set_mode(Mode.LOCKDOWN, source="test")
    assert harness.tap("front-in", CARD, 1).reason is Reason.LOCKDOWN
    harness.agent.set_mode(Mode.FREE_PASSAGE, source="test")
    wait_for(lambda: harness.bus.relays.get("front.relay") is True, "free passage unlock")
    assert harness.tap("front-in", "em4100:0000000000", 2).reason is \
        Reason.GRANTED_FREE_PASSAGE
    kinds = [e.reason for e in harness.store.events() if e.kind == "mode_changed"]
    assert kinds == ["lockdown", "free_passage"]


class FlakyReader(SimulatedReader):
    """A simulated reader that fails to open a set number of times, then dies once."""

    def __init__(self, name: str, bus: SimBus, failures: int) -> None:
        super().__init__(name, {}, bus)
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
    bus = SimBus()
    flaky = FlakyReader("front-in", bus, failures=2)
    h = Harness(tmp_path, devices={"front-in": flaky})
    h.bus = bus
    h.agent.bus = bus
    h.start()
    try:
        wait_for(lambda: any(e.kind == "reader_online" and e.reader == "front-in"
                             for e in h.store.events()), "the reader to come online")
        bus.tap("front-in", "unplug")
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


@pytest.mark.parametrize(("now", "last", "expected"), [
    (datetime(2026, 5, 1, tzinfo=ZoneInfo("UTC")), None, "ok"),
    (datetime(1970, 1, 2, tzinfo=ZoneInfo("UTC")), None, "unset"),
    (datetime(2026, 5, 1, tzinfo=ZoneInfo("UTC")),
     int(datetime(2026, 6, 1, tzinfo=ZoneInfo("UTC")).timestamp() * 1000), "behind"),
    (datetime(2026, 5, 1, 12, 0, tzinfo=ZoneInfo("UTC")),
     int(datetime(2026, 5, 1, 12, 3, tzinfo=ZoneInfo("UTC")).timestamp() * 1000), "ok"),
], ids=["ok", "unset", "behind", "small-skew"])
def test_clock_state(now: datetime, last: int | None, expected: str) -> None:
    """A clock before the floor is unset, one well behind recorded events is behind,
    and a few minutes of skew are tolerated."""
    floor = datetime(2026, 1, 1, tzinfo=ZoneInfo("UTC"))
    assert clock_state(int(now.timestamp() * 1000), last, floor) == expected
    assert date(2026, 1, 1) == floor.date()


def test_taps_are_decided_and_recorded_while_a_whole_list_is_applied(
        harness: Harness) -> None:
    """A long whole-list apply does not hold up the card path: a tap made while the apply
    is still running is decided (on the old list) and its event committed before the
    apply finishes."""
    hasher = CredentialHasher(KEY)
    started = threading.Event()

    def big_list() -> Iterator[CredentialEntry]:
        yield CredentialEntry(hasher.credential(CARD))
        started.set()
        for i in range(400_000):
            yield CredentialEntry(i.to_bytes(32, "big"))

    applier = threading.Thread(target=harness.store.replace_allowlist, args=(big_list(), 2))
    applier.start()
    try:
        assert started.wait(10)
        decision = harness.tap("front-in", CARD, 1)
        assert applier.is_alive(), "the apply finished first: make the list longer"
        assert decision == Decision(True, Reason.GRANTED)
        assert any(e.kind == "access_granted" for e in harness.store.events())
    finally:
        applier.join()
    assert harness.store.counts()["credentials"] == 400_001


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
