"""The PC/SC reader driver against a real pcscd with the vpcd reader driver and a virtual
card (tests/vcard.py): pyscard -> libpcsclite -> pcscd -> vpcd -> TCP -> our card.

Each test gets its own pcscd (it starts in about 15 ms), in a private mount namespace so a
system pcscd is left alone; this needs root (as CI runs) and the Debian packages pcscd,
vsmartcard-vpcd and libpcsclite1, plus util-linux's ``unshare``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from smartcard import scard  # type: ignore[import-untyped]  # pyscard ships no stubs
from structlog.testing import capture_logs

from agent.decision import Decision, Reason
from agent.runtime import Agent, ReadTiming
from agent.store import CredentialEntry
from drivers import registry
from drivers.base import CardRead, DeviceError, Reader
from drivers.pcsc import PcscReader
from drivers.simulated import SimBus
from protocol.hashing import CredentialHasher
from tests.agentconf import KEY, DoorSpec, ReaderSpec, agent_config
from tests.conftest import wait_for
from tests.test_reader_contract import READ_TIMEOUT, ReaderContract
from tests.vcard import (
    GET_UID,
    READER_NAMES,
    VPCD_LIBRARY,
    PcscDaemon,
    Tapper,
    VirtualCard,
    reader_states,
)

UID = bytes.fromhex("04A1B2C3D4E5F6")
OTHER_UID = bytes.fromhex("08112233")



@pytest.fixture(scope="session")
def pcsc_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder that stands in for /run/pcscd, for every pcscd of this session.

    libpcsclite reads ``PCSCLITE_CSOCK_NAME`` once per process and keeps it, so the folder
    (and the variable) must not change between tests.
    """
    missing = [what for what, ok in (
        ("pcscd (apt-get install pcscd)", shutil.which("pcscd")),
        ("unshare (util-linux)", shutil.which("unshare")),
        (f"{VPCD_LIBRARY} (apt-get install vsmartcard-vpcd)", VPCD_LIBRARY.exists()),
        ("root (pcscd runs in a private mount namespace)", os.geteuid() == 0),
    ) if not ok]
    assert not missing, f"the PC/SC tests need: {', '.join(missing)}"
    run_dir = tmp_path_factory.mktemp("pcscd-run")
    previous = os.environ.get("PCSCLITE_CSOCK_NAME")
    os.environ["PCSCLITE_CSOCK_NAME"] = str(run_dir / "pcscd.comm")
    try:
        yield run_dir
    finally:
        if previous is None:
            os.environ.pop("PCSCLITE_CSOCK_NAME", None)
        else:
            os.environ["PCSCLITE_CSOCK_NAME"] = previous


@pytest.fixture
def pcscd(pcsc_run_dir: Path, tmp_path: Path) -> Iterator[PcscDaemon]:
    """A running private pcscd listing vpcd's two readers; stopped after the test."""
    daemon = PcscDaemon(pcsc_run_dir, tmp_path / "pcscd")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


class Cards:
    """Virtual cards put on vpcd's slots by a test; all taken away at teardown."""

    def __init__(self, daemon: PcscDaemon) -> None:
        self.daemon = daemon
        self._inserted: list[VirtualCard] = []

    def insert(self, uid: bytes, slot: int = 0, **kwargs: Any) -> VirtualCard:
        """Put a card with ``uid`` on slot ``slot`` (``Virtual PCD 00 0<slot>``)."""
        card = VirtualCard(self.daemon.port + slot, uid, **kwargs)
        card.insert()
        self._inserted.append(card)
        return card

    def close(self) -> None:
        """Take every card away."""
        for card in self._inserted:
            card.remove()


@pytest.fixture
def cards(pcscd: PcscDaemon) -> Iterator[Cards]:
    """Puts virtual cards on the readers; removes them before pcscd stops."""
    placed = Cards(pcscd)
    try:
        yield placed
    finally:
        placed.close()


@pytest.fixture
def reader(pcscd: PcscDaemon) -> Iterator[PcscReader]:
    """An opened PC/SC reader on ``Virtual PCD 00 00``; closed after the test."""
    opened = PcscReader("pcsc-front", {"reader": READER_NAMES[0], "poll_s": 0.1})
    opened.open()
    try:
        yield opened
    finally:
        opened.close()


def read_nothing(reader: Reader, card: VirtualCard, polls: int = 2) -> list[CardRead]:
    """Everything ``reader`` reports while ``card`` stays on it for ``polls`` more of
    pcscd's presence polls (expected: nothing).

    That a card left on the reader is not read again needs time to pass; it is counted in
    pcscd's own polls (vpcd asks the card for its ATR on each), not in seconds.
    """
    got: list[CardRead] = []
    target = card.presence_checks + polls

    def polled() -> bool:
        read = reader.read(0.1)
        if read is not None:
            got.append(read)
        return card.presence_checks >= target

    wait_for(polled, f"pcscd to poll the card {polls} more times", interval=0)
    return got


def test_card_left_on_the_reader_is_read_once(reader: PcscReader, cards: Cards) -> None:
    """An inserted card becomes one CardRead "uid:<hex>", and no more while it stays."""
    card = cards.insert(UID)
    got = reader.read(READ_TIMEOUT)
    assert got is not None and got.card_id == "uid:04A1B2C3D4E5F6"
    assert read_nothing(reader, card) == []
    assert card.apdus == [GET_UID]
    assert reader.rejected == 0


def test_removal_and_reinsertion_reads_again(reader: PcscReader, cards: Cards) -> None:
    """A card taken away and put back is a second read, even when the driver was not
    reading while it was away (pcsc-lite's insertion counter tells the two apart)."""
    first = cards.insert(UID)
    assert reader.read(READ_TIMEOUT) is not None
    count = reader_states()[READER_NAMES[0]] >> 16
    first.remove()
    second = cards.insert(UID)
    # pcscd has seen the removal and the new insertion before the driver looks again: to
    # the driver the reader went from PRESENT to PRESENT, with a count 2 higher.
    wait_for(lambda: reader_states()[READER_NAMES[0]] >> 16 >= count + 2
             and bool(reader_states()[READER_NAMES[0]] & scard.SCARD_STATE_PRESENT),
             "pcscd to see the card away and back")
    got = reader.read(READ_TIMEOUT)
    assert got is not None and got.card_id == "uid:04A1B2C3D4E5F6"
    assert second.apdus == [GET_UID]
    assert read_nothing(reader, second) == []


def test_card_refused_by_get_data_is_logged_not_reported(reader: PcscReader,
                                                         cards: Cards) -> None:
    """A card whose GET DATA answers 6A 81 is counted and logged once, never reported."""
    with capture_logs() as logs:
        card = cards.insert(UID, uid_sw=b"\x6a\x81")
        reads: list[CardRead] = []

        def refused() -> bool:
            if reader.rejected:
                return True
            read = reader.read(0.1)
            if read is not None:
                reads.append(read)
            return False

        wait_for(refused, "the card to be refused", READ_TIMEOUT, interval=0)
        reads += read_nothing(reader, card)
    assert reads == []
    assert reader.rejected == 1
    assert card.apdus == [GET_UID]  # refused once, not retried while the card stays
    rejected = [e for e in logs if e["event"] == "reader_card_rejected"]
    assert rejected == [{"event": "reader_card_rejected", "log_level": "warning",
                         "reader": "pcsc-front", "reason": "status", "sw": "6A81"}]
    assert UID.hex().upper() not in repr(logs)


def test_pcscd_stopped_raises_device_error_and_reopen_recovers(
        pcscd: PcscDaemon, reader: PcscReader) -> None:
    """With pcscd gone, read() and open() raise DeviceError naming the reader; once pcscd
    is back, a reopened reader reads cards again."""
    pcscd.stop()
    with pytest.raises(DeviceError, match=r"pcsc-front \(Virtual PCD 00 00\): cannot watch"):
        reader.read(READ_TIMEOUT)
    with pytest.raises(DeviceError,
                       match=r"pcsc-front \(reader 'Virtual PCD 00 00'\): cannot reach pcscd"):
        reader.open()
    pcscd.start()
    reader.open()
    card = VirtualCard(pcscd.port, UID)
    card.insert()
    try:
        got = reader.read(READ_TIMEOUT)
    finally:
        card.remove()
    assert got is not None and got.card_id == "uid:04A1B2C3D4E5F6"


def test_pcscd_without_readers_raises_device_error(pcsc_run_dir: Path, tmp_path: Path) -> None:
    """A running pcscd with no reader attached makes open() raise DeviceError naming the
    configured reader."""
    daemon = PcscDaemon(pcsc_run_dir, tmp_path / "pcscd", vpcd=False)
    daemon.start()
    try:
        with pytest.raises(DeviceError, match=r"pcsc-front \(reader 'ACR122'\): pcscd has no "
                           r"reader attached"):
            PcscReader("pcsc-front", {"reader": "ACR122"}).open()
    finally:
        daemon.stop()


def test_reader_option_selects_the_reader(pcscd: PcscDaemon, cards: Cards) -> None:
    """``reader`` picks the first reader whose name contains it; without it the first
    reader is used; a name matching none is a DeviceError listing the readers."""
    cards.insert(UID, slot=0)
    other = cards.insert(OTHER_UID, slot=1)
    second = PcscReader("pcsc-second", {"reader": "00 01", "poll_s": 0.1})
    first = PcscReader("pcsc-first", {})
    missing = PcscReader("pcsc-missing", {"reader": "ACR122"})
    try:
        second.open()
        first.open()
        got_second = second.read(READ_TIMEOUT)
        got_first = first.read(READ_TIMEOUT)
        assert got_second is not None and got_second.card_id == "uid:08112233"
        assert got_first is not None and got_first.card_id == "uid:04A1B2C3D4E5F6"
        assert read_nothing(second, other) == []
        with pytest.raises(DeviceError, match=r"no reader name contains 'ACR122' \(attached: "
                           r"'Virtual PCD 00 00', 'Virtual PCD 00 01'\)"):
            missing.open()
    finally:
        for each in (first, second, missing):
            each.close()


def test_options_are_checked_before_opening() -> None:
    """Unknown keys, an empty reader name and a non-positive poll interval are refused."""
    registry.check_options("reader", "pcsc", {"reader": "ACR122", "poll_s": 1}, "readers[0]")
    for options, message in (({"port": "/dev/ttyUSB0"}, "readers[0].options.port: unknown"),
                             ({"reader": ""}, "readers[0].options.reader"),
                             ({"poll_s": 0}, "readers[0].options.poll_s")):
        with pytest.raises(registry.DriverError, match=re.escape(message)):
            registry.check_options("reader", "pcsc", options, "readers[0]")


class TestPcscReaderContract(ReaderContract):
    """The PC/SC reader through real pcscd and vpcd; each tap holds the card until read."""

    kind = "uid"

    @pytest.fixture(autouse=True)
    def _stack(self, pcscd: PcscDaemon) -> Iterator[None]:
        self.tapper = Tapper(pcscd.port)
        try:
            yield
        finally:
            self.tapper.close()

    def make_reader(self) -> Reader:
        """A PC/SC reader on vpcd's first slot."""
        return PcscReader("pcsc-front", {"reader": READER_NAMES[0], "poll_s": 0.1})

    def present(self, value: str) -> None:
        """Tap a card whose UID is ``value``: on the reader until read, then away."""
        self.tapper.tap(bytes.fromhex(value))


def test_agent_grants_a_card_read_through_pcsc(pcscd: PcscDaemon, cards: Cards,
                                               tmp_path: Path) -> None:
    """The agent with a "pcsc" reader grants an enrolled card (event committed, door
    unlocked) and denies an unknown one."""
    bus = SimBus()
    agent = Agent(agent_config(tmp_path, doors=(DoorSpec(unlock_s=0.3),), readers=(ReaderSpec(
        driver="pcsc", debounce_s=0.5,
        options={"reader": READER_NAMES[0], "poll_s": 0.1}),)), bus=bus)
    decisions: list[Decision] = []

    def collect(_reader: Any, decision: Decision, _timing: ReadTiming) -> None:
        decisions.append(decision)

    agent.on_decision = collect
    agent.start()
    try:
        assert agent.store is not None
        agent.store.replace_allowlist(
            [CredentialEntry(CredentialHasher(KEY).credential("uid:04A1B2C3D4E5F6"))], 1)
        wait_for(lambda: "front-in" in agent.readers, "the reader thread")
        enrolled = cards.insert(UID)
        wait_for(lambda: len(decisions) >= 1, "the first decision")
        assert decisions == [Decision(True, Reason.GRANTED)]
        wait_for(lambda: agent.store is not None and agent.store.events(kind="door_unlocked"),
                 "the unlock")
        granted = agent.store.events(kind="access_granted")
        assert [(e.reader, e.door, e.direction) for e in granted] == [
            ("front-in", "front", "entry")]
        enrolled.remove()
        cards.insert(OTHER_UID)
        wait_for(lambda: len(decisions) >= 2, "the second decision")
        assert decisions[1].granted is False
        assert [e.kind for e in agent.store.events(kind="reader_offline")] == []
    finally:
        agent.stop()
