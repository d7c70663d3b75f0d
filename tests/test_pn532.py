"""The PN532 reader (HSU) against a scripted PN532 on a real pseudo-terminal.

The peer (tests/pn532_peer.py) is a fake, so it is first checked against two hosts written
by others, byte for byte the same code a gateway would run: nfcpy 1.0.4's PN532 driver
(through nfcpy's own serial transport) and libnfc 1.8.0's ``nfc-list``. Both must read the
card's UID through it; only then do the tests of our driver against the peer count.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nfc  # type: ignore[import-untyped]  # nfcpy 1.0.4 ships no type information
import nfc.clf  # type: ignore[import-untyped]
import nfc.clf.pn532  # type: ignore[import-untyped]
import nfc.clf.transport  # type: ignore[import-untyped]
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from agent.decision import Decision, Reason
from agent.runtime import Agent, ReadTiming
from agent.store import CredentialEntry
from drivers.base import DeviceError, Reader
from drivers.pn532 import (
    ACK,
    NACK,
    WAKE_UP,
    Ack,
    ErrorFrame,
    FrameDecoder,
    Nack,
    Pn532Reader,
    Rejected,
    Response,
    TargetA,
    command_frame,
    parse_list_106a,
)
from drivers.registry import DriverError, check_options, driver_class
from drivers.simulated import SimBus
from protocol.hashing import CredentialHasher
from tests.agentconf import KEY, DoorSpec, ReaderSpec, agent_config
from tests.conftest import wait_for
from tests.pn532_peer import CLASSIC, NTAG, Card, Pn532Peer, extended_frame, host_frame
from tests.test_reader_contract import ReaderContract

READ_TIMEOUT = 5.0
"""Generous: a card in the field is found within one poll; this only bounds a failure."""
WAIT_S = 10.0
"""Bound on waiting for the peer to have answered enough polls."""

MANUAL = {
    "wake_up": "5555" + "00" * 14,
    "sam_configuration": "0000ff03fdd414011700",
    "get_firmware_version": "0000ff02fed4022a00",
    "max_retries": "0000ff06fad43205000102f200",
    "in_list_passive_target": "0000ff04fcd44a0100e100",
    "field_off": "0000ff04fcd4320100f900",
}
"""Host frames as the PN532 User Manual builds them. The wake-up, SAMConfiguration,
GetFirmwareVersion and InListPassiveTarget bytes are the ones nfc-list and nfcpy were
captured sending to real chips (and are checked against them below); the two
RFConfiguration frames carry libnfc's parameters."""


@pytest.fixture
def peer() -> Iterator[Pn532Peer]:
    """A scripted PN532 on a fresh pty, closed after the test."""
    chip = Pn532Peer()
    try:
        yield chip
    finally:
        chip.close()


OpenReader = Callable[..., Pn532Reader]


@pytest.fixture
def open_reader(peer: Pn532Peer) -> Iterator[OpenReader]:
    """Open Pn532Readers on the peer's pty with the given options; all closed afterwards."""
    readers: list[Pn532Reader] = []

    def _open(**options: Any) -> Pn532Reader:
        reader = Pn532Reader("front", {"port": peer.path, "poll_ms": 10, **options})
        readers.append(reader)
        reader.open()
        return reader

    yield _open
    for reader in readers:
        reader.close()


def uid_of(card: Card) -> str:
    """The card id our driver reports for ``card``."""
    return f"uid:{card.uid.hex().upper()}"


def read_nothing_until(reader: Reader, condition: Callable[[], bool], what: str,
                       read_timeout: float = 0.02) -> None:
    """Read, each read expected to give nothing, until ``condition`` holds (the driver
    polls the chip only inside ``read``)."""
    def reached() -> bool:
        if condition():
            return True
        assert reader.read(read_timeout) is None
        return False

    wait_for(reached, what, WAIT_S, interval=0)


def polls_until(reader: Reader, peer: Pn532Peer, answers: int) -> None:
    """Read (expecting nothing) until the peer has sent ``answers`` more poll answers."""
    target = peer.list_answers + answers
    read_nothing_until(reader, lambda: peer.list_answers >= target,
                       f"the peer to see {answers} more polls")


def empty_polls_until(reader: Reader, peer: Pn532Peer, answers: int) -> None:
    """Read (expecting nothing) until the peer has answered ``answers`` more polls empty."""
    target = peer.empty_answers + answers
    read_nothing_until(reader, lambda: peer.empty_answers >= target,
                       f"the peer to answer {answers} polls empty")


# --- the peer against independent hosts -------------------------------------------------


def nfcpy_sense(peer: Pn532Peer) -> tuple[list[str | None], list[bytes]]:
    """Open nfcpy's PN532 driver on the peer's pty and sense a 106A target with the
    resting card, then without it; the UIDs found (hex) and the commands nfcpy sent.

    nfcpy's ``tty:<name>:pn532`` path only finds names directly in /dev, so its TTY
    transport is opened on the pts path and handed to ``nfc.clf.pn532.init``: the same two
    calls nfcpy's device lookup makes once it has found the port.
    """
    transport = nfc.clf.transport.TTY(peer.path)
    clf = nfc.ContactlessFrontend()
    clf.device = nfc.clf.pn532.init(transport)
    try:
        found: list[str | None] = []
        for present in (True, False):
            if not present:
                peer.remove()
            target = clf.sense(nfc.clf.RemoteTarget("106A"))
            found.append(None if target is None else bytes(target.sdd_res).hex().upper())
        return found, list(peer.commands)
    finally:
        clf.close()


@pytest.mark.parametrize("card", [NTAG, CLASSIC], ids=["7-byte", "4-byte"])
def test_peer_passes_nfcpy(peer: Pn532Peer, card: Card) -> None:
    """nfcpy's own PN532 driver initialises against the peer (extended-frame line test,
    baud-rate switch, RF settings) and reads the card's UID, then finds none once removed."""
    peer.place(card)
    found, commands = nfcpy_sense(peer)
    assert found == [card.uid.hex().upper(), None]
    assert peer.host_errors == []
    diagnose = [c for c in commands if c[0] == 0x00]
    assert [len(c) for c in diagnose] == [264]  # 265-byte frame body: only fits extended
    assert bytes.fromhex(MANUAL["get_firmware_version"]) in peer.received


def run_nfc_list(peer: Pn532Peer) -> str:
    """Run libnfc's nfc-list for ISO 14443-A on the peer's pty; its standard output."""
    env = {**os.environ, "LIBNFC_DEVICE": f"pn532_uart:{peer.path}",
           "LIBNFC_AUTO_SCAN": "false", "LIBNFC_INTRUSIVE_SCAN": "false",
           "LIBNFC_LOG_LEVEL": "1"}
    done = subprocess.run(["nfc-list", "-t", "1"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("card", [NTAG, CLASSIC], ids=["7-byte", "4-byte"])
def test_peer_passes_nfc_list(peer: Pn532Peer, card: Card) -> None:
    """libnfc's nfc-list opens the peer as pn532_uart and lists the card with its UID,
    ATQA and SAK."""
    peer.place(card)
    out = run_nfc_list(peer)
    flat = re.sub(r"\s+", " ", out)
    spaced = " ".join(f"{b:02x}" for b in card.uid)
    assert "1 ISO14443A passive target(s) found" in flat
    assert f"UID (NFCID1): {spaced}" in flat
    assert f"ATQA (SENS_RES): {card.sens_res[0]:02x} {card.sens_res[1]:02x}" in flat
    assert f"SAK (SEL_RES): {card.sel_res:02x}" in flat
    assert peer.host_errors == []


def test_nfc_list_finds_nothing_in_an_empty_field(peer: Pn532Peer) -> None:
    """With no card at the peer, nfc-list opens the device, polls, and lists no target."""
    out = run_nfc_list(peer)
    assert "NFC device: user defined device opened" in out
    assert "target(s) found" not in out
    assert any(c[:3] == b"\x4a\x01\x00" for c in peer.commands)
    assert peer.host_errors == []


def test_our_frames_are_the_ones_libnfc_and_nfcpy_send(peer: Pn532Peer,
                                                       open_reader: OpenReader) -> None:
    """Our wake-up + SAMConfiguration is byte for byte libnfc's opening, and our
    GetFirmwareVersion and InListPassiveTarget frames are those nfcpy and libnfc send."""
    run_nfc_list(peer)
    libnfc = bytes(peer.received)
    peer.received.clear()
    found, _ = nfcpy_sense(peer)
    nfcpy_bytes = bytes(peer.received)
    peer.received.clear()
    assert found == [None, None]
    reader = open_reader()
    polls_until(reader, peer, 2)  # the 2nd poll follows the answered RF-off
    ours = bytes(peer.received)
    opening = WAKE_UP + command_frame(0x14, b"\x01")
    assert libnfc.startswith(opening) and ours.startswith(opening)
    for frame in (command_frame(0x02), command_frame(0x4A, b"\x01\x00")):
        assert frame in libnfc and frame in nfcpy_bytes and frame in ours
    for name in ("max_retries", "field_off"):
        assert bytes.fromhex(MANUAL[name]) in libnfc and bytes.fromhex(MANUAL[name]) in ours


# --- our driver: frames on the wire -----------------------------------------------------


def test_driver_writes_the_manual_frames(peer: Pn532Peer, open_reader: OpenReader) -> None:
    """Open and the first poll write exactly the wake-up, SAMConfiguration,
    GetFirmwareVersion, RFConfiguration (retries), InListPassiveTarget and RF-off frames."""
    reader = open_reader()
    polls_until(reader, peer, 1)
    read_nothing_until(reader, lambda: len(peer.commands) >= 5, "the RF-off after the first poll",
                       read_timeout=0.001)
    order = ["wake_up", "sam_configuration", "get_firmware_version", "max_retries",
             "in_list_passive_target", "field_off"]
    expected = "".join(MANUAL[k] for k in order)
    assert bytes(peer.received).hex()[:len(expected)] == expected
    assert reader.firmware == "PN532 v1.6"


def test_command_frames_match_the_manual() -> None:
    """command_frame builds normal frames with LCS/DCS as in the manual, and an extended
    frame for a body over 255 bytes."""
    assert command_frame(0x14, b"\x01").hex() == MANUAL["sam_configuration"]
    assert command_frame(0x4A, b"\x01\x00").hex() == MANUAL["in_list_passive_target"]
    long = command_frame(0x00, bytes(range(256)) + bytes(7))
    assert long[:8].hex() == "0000ffffff0109f6"
    assert long == host_frame(b"\xd4\x00" + bytes(range(256)) + bytes(7))


# --- our driver: the frame decoder ------------------------------------------------------


def test_decoder_takes_ack_nack_error_and_responses_byte_by_byte() -> None:
    """ACK, NACK, the error frame and a normal response are decoded even when they arrive
    one byte at a time, with noise and postambles between them."""
    stream = (ACK + b"\x55\x13" + NACK + bytes.fromhex("0000ff01ff7f8100")
              + host_frame(bytes.fromhex("d50332010607")))
    decoder = FrameDecoder()
    events = [e for byte in stream for e in decoder.feed(bytes([byte]))]
    assert events == [Ack(), Nack(), ErrorFrame(), Response(0x03, bytes.fromhex("32010607"))]


def test_decoder_takes_extended_frames() -> None:
    """An extended frame (265-byte body, as nfcpy's Diagnose echo) and a short body in
    extended form both decode; the length checksum covers LENm and LENl."""
    body = b"\xd5\x01\x00" + bytes(x & 0xFF for x in range(262))
    decoder = FrameDecoder()
    assert decoder.feed(host_frame(body)) == [Response(0x01, body[2:])]
    short = bytes.fromhex("d54b0101004400070416c6c2d73881")
    assert decoder.feed(extended_frame(short)) == [Response(0x4B, short[2:])]
    bad = bytearray(extended_frame(short))
    bad[7] ^= 0x01
    assert decoder.feed(bytes(bad)) == [Rejected("length_checksum", 8)]


def test_decoder_resyncs_after_bad_frames() -> None:
    """A bad length checksum, a bad data checksum and a wrong frame identifier are refused
    with their reasons, and the next good frame decodes."""
    good = host_frame(bytes.fromhex("d51500"))
    bad_lcs = bytearray(good)
    bad_lcs[4] ^= 0x01
    bad_dcs = bytearray(good)
    bad_dcs[-2] ^= 0x01
    wrong_tfi = host_frame(bytes.fromhex("d414"))
    decoder = FrameDecoder()
    events = decoder.feed(bytes(bad_lcs) + bytes(bad_dcs) + wrong_tfi + good)
    assert events == [Rejected("length_checksum", 5), Rejected("data_checksum", 9),
                      Rejected("bad_tfi", 8), Response(0x15, b"\x00")]


def test_target_data_parses_as_in_nfcpy_vectors() -> None:
    """nfcpy's InListPassiveTarget vector (NTAG, 7-byte UID) parses into SENS_RES,
    SEL_RES and UID; NbTg 0 is no target; a UID longer than the frame is refused."""
    target = parse_list_106a(bytes.fromhex("0101004400070416c6c2d73881"))
    assert target == TargetA(1, b"\x00\x44", 0x00, bytes.fromhex("0416c6c2d73881"))
    assert parse_list_106a(b"\x00") is None
    with pytest.raises(ValueError, match="bad_uid_length"):
        parse_list_106a(bytes.fromhex("01010044000704a1"))


# --- our driver: cards ------------------------------------------------------------------


@pytest.mark.parametrize("card", [NTAG, CLASSIC], ids=["7-byte", "4-byte"])
def test_driver_reads_the_uid(peer: Pn532Peer, open_reader: OpenReader, card: Card) -> None:
    """A card in the field is read as uid: plus its UID in upper-case hex."""
    reader = open_reader()
    peer.place(card)
    got = reader.read(READ_TIMEOUT)
    assert got is not None and got.card_id == uid_of(card)
    assert reader.rejected == 0


def test_card_resting_in_the_field_is_one_read(peer: Pn532Peer,
                                                open_reader: OpenReader) -> None:
    """A card that stays in the field through many polls is reported once."""
    reader = open_reader()
    peer.place(NTAG)
    got = reader.read(READ_TIMEOUT)
    assert got is not None and got.card_id == uid_of(NTAG)
    polls_until(reader, peer, 5)


def test_removal_then_re_presentation_is_a_second_read(peer: Pn532Peer,
                                                      open_reader: OpenReader) -> None:
    """Once a poll finds the field empty, the same card presented again is read again."""
    reader = open_reader()
    peer.place(CLASSIC)
    first = reader.read(READ_TIMEOUT)
    assert first is not None and first.card_id == uid_of(CLASSIC)
    peer.remove()
    empty_polls_until(reader, peer, 1)
    peer.place(CLASSIC)
    second = reader.read(READ_TIMEOUT)
    assert second is not None and second.card_id == uid_of(CLASSIC)
    assert second.at > first.at


def test_another_card_without_gap_is_a_new_read(peer: Pn532Peer,
                                               open_reader: OpenReader) -> None:
    """A different UID found by the next poll is a new presentation even with no empty
    poll between."""
    reader = open_reader()
    peer.place(NTAG)
    assert (got := reader.read(READ_TIMEOUT)) is not None and got.card_id == uid_of(NTAG)
    peer.place(CLASSIC)
    assert (got := reader.read(READ_TIMEOUT)) is not None and got.card_id == uid_of(CLASSIC)


def test_field_is_switched_off_between_polls(peer: Pn532Peer,
                                             open_reader: OpenReader) -> None:
    """After every InListPassiveTarget the driver turns the RF field off again."""
    reader = open_reader()
    polls_until(reader, peer, 4)  # the 4th poll is sent after the 3rd RF-off was answered
    polls = [c for c in peer.commands if c[0] in (0x4A, 0x32)][1:]  # after MaxRetries
    assert [c.hex() for c in polls[:6]] == ["4a0100", "320100"] * 3


@pytest.mark.parametrize("where", ["dcs", "lcs"])
def test_garbled_response_is_refused_nacked_and_resent(
        peer: Pn532Peer, open_reader: OpenReader, where: str) -> None:
    """A response with a bad checksum is counted and logged without card data, a NACK
    asks for it again, and the resent frame gives the read."""
    reader = open_reader()
    peer.garble_next(0x4A, where)
    peer.place(NTAG)
    with capture_logs() as logs:
        got = reader.read(READ_TIMEOUT)
    assert got is not None and got.card_id == uid_of(NTAG)
    assert reader.rejected == 1
    assert NACK in peer.received
    rejected = [e for e in logs if e["event"] == "reader_frame_rejected"]
    assert [e["reason"] for e in rejected] == [
        "data_checksum" if where == "dcs" else "length_checksum"]
    assert "A1B2C3" not in repr(logs).upper()
    peer.remove()
    empty_polls_until(reader, peer, 1)
    peer.place(CLASSIC)
    assert (got := reader.read(READ_TIMEOUT)) is not None and got.card_id == uid_of(CLASSIC)


def test_noise_and_a_false_start_are_skipped(peer: Pn532Peer,
                                             open_reader: OpenReader) -> None:
    """Line noise is dropped, a false start code with a bad length is counted, and the
    card is still read."""
    reader = open_reader()
    peer.write(b"\x55\x13\x37" + b"\x00\xff\x10\x10" + b"\xaa")
    peer.place(NTAG)
    got = reader.read(READ_TIMEOUT)
    assert got is not None and got.card_id == uid_of(NTAG)
    assert reader.rejected == 1


def test_error_frame_is_logged_and_polling_goes_on(peer: Pn532Peer,
                                                   open_reader: OpenReader) -> None:
    """An error frame in answer to a poll is logged and the next poll reads the card."""
    reader = open_reader()
    peer.refuse_next(0x4A)
    peer.place(NTAG)
    with capture_logs() as logs:
        got = reader.read(READ_TIMEOUT)
    assert got is not None and got.card_id == uid_of(NTAG)
    assert {"event": "reader_command_refused", "log_level": "warning", "reader": "front",
            "command": "InListPassiveTarget"} in logs


# --- our driver: failures ---------------------------------------------------------------


def test_no_answer_to_the_wake_up_is_a_device_error(peer: Pn532Peer) -> None:
    """A port where no chip answers the wake-up raises DeviceError naming the command and
    the port, after sending the wake-up."""
    peer.answering = False
    reader = Pn532Reader("front", {"port": peer.path})
    with pytest.raises(DeviceError, match=r"no answer to SAMConfiguration .*" +
                       re.escape(peer.path)):
        reader.open()
    assert bytes(peer.received).startswith(WAKE_UP)
    reader.close()


def test_refused_firmware_version_is_a_device_error(peer: Pn532Peer) -> None:
    """A chip that answers GetFirmwareVersion with the error frame does not open."""
    peer.refuse_next(0x02)
    reader = Pn532Reader("front", {"port": peer.path})
    with pytest.raises(DeviceError, match="GetFirmwareVersion refused"):
        reader.open()


def test_chip_going_silent_is_a_device_error(peer: Pn532Peer,
                                             open_reader: OpenReader) -> None:
    """A chip that stops answering polls makes read raise DeviceError within a bound."""
    reader = open_reader()
    peer.answering = False
    with pytest.raises(DeviceError, match="no answer to"):
        for _ in range(100):
            reader.read(0.2)


def test_hang_up_is_a_device_error(peer: Pn532Peer, open_reader: OpenReader) -> None:
    """A vanished device (pty master closed) makes read raise DeviceError."""
    reader = open_reader()
    peer.hang_up()
    with pytest.raises(DeviceError, match="failed"):
        for _ in range(100):
            reader.read(0.2)


def test_missing_port_is_a_device_error(tmp_path: Path) -> None:
    """A port that does not exist raises DeviceError naming it."""
    reader = Pn532Reader("front", {"port": str(tmp_path / "ttyNone")})
    with pytest.raises(DeviceError, match="ttyNone"):
        reader.open()


def test_a_poll_in_flight_outlives_a_read_that_returned(
        peer: Pn532Peer, open_reader: OpenReader) -> None:
    """read returns at its timeout while the chip is still busy with a poll, and that poll's
    answer is taken by a later read instead of the poll being sent again."""
    reader = open_reader()
    peer.hold()
    peer.place(NTAG)
    assert reader.read(0) is None
    wait_for(lambda: [c[0] for c in peer.commands].count(0x4A) == 1, "the first poll")
    assert reader.read(0.05) is None
    peer.release()
    got = reader.read(READ_TIMEOUT)
    assert got is not None and got.card_id == uid_of(NTAG)
    assert [c[0] for c in peer.commands].count(0x4A) == 1


# --- options and the registry -------------------------------------------------------------


def test_registry_knows_pn532() -> None:
    """The registry maps driver "pn532" to Pn532Reader."""
    assert driver_class("reader", "pn532") is Pn532Reader


@pytest.mark.parametrize(("options", "key"), [
    ({"port": "/dev/ttyS0", "poll_ms": 5}, "poll_ms"),
    ({"port": "/dev/ttyS0", "poll_ms": 5000}, "poll_ms"),
    ({"port": "/dev/ttyS0", "baudrate": 11520}, "baudrate"),
    ({"port": "/dev/ttyS0", "speed": 1}, "speed"),
    ({}, "port"),
])
def test_bad_options_name_the_key(options: dict[str, Any], key: str) -> None:
    """Out-of-range polling, a speed the PN532 lacks, unknown keys and a missing port are
    errors on that key."""
    with pytest.raises(ValidationError) as info:
        Pn532Reader("front", options)
    assert [e["loc"] for e in info.value.errors()] == [(key,)]
    with pytest.raises(DriverError, match=rf"readers\[0\]\.options\.{key}"):
        check_options("reader", "pn532", options, "readers[0]")


# --- the contract -------------------------------------------------------------------------


class TestPn532ReaderContract(ReaderContract):
    """The PN532 reader on the scripted peer: each presented card is a tap (one poll with
    the card, one without)."""

    kind = "uid"

    @pytest.fixture(autouse=True)
    def _peer(self, peer: Pn532Peer) -> None:
        self.peer = peer

    def make_reader(self) -> Reader:
        """A PN532 reader on this test's peer, polling every 10 ms."""
        return Pn532Reader("pn532-front", {"port": self.peer.path, "poll_ms": 10})

    def present(self, value: str) -> None:
        """Tap a card whose UID is ``value``."""
        self.peer.tap(Card(bytes.fromhex(value)))


# --- the agent ----------------------------------------------------------------------------

def test_agent_decides_cards_read_by_pn532(peer: Pn532Peer, tmp_path: Path) -> None:
    """An agent configured with driver "pn532" grants an enrolled card presented at the
    chip, unlocks the door, and denies an unknown card."""
    config = agent_config(tmp_path, doors=(DoorSpec(unlock_s=0.3),), readers=(ReaderSpec(
        driver="pn532", debounce_s=None, options={"port": peer.path, "poll_ms": 20}),))
    bus = SimBus()
    agent = Agent(config, bus=bus)
    decisions: list[Decision] = []

    def collect(_reader: Any, decision: Decision, _timing: ReadTiming) -> None:
        decisions.append(decision)

    agent.on_decision = collect
    agent.start()
    try:
        assert agent.store is not None
        agent.store.replace_allowlist(
            [CredentialEntry(CredentialHasher(KEY).credential(uid_of(NTAG)))], 1)
        peer.place(NTAG)
        wait_for(lambda: len(decisions) >= 1, "the first decision")
        assert decisions[0] == Decision(True, Reason.GRANTED)
        wait_for(lambda: agent.store is not None and agent.store.events(kind="door_unlocked"),
                 "the unlock")
        peer.place(CLASSIC)
        wait_for(lambda: len(decisions) >= 2, "the second decision")
        assert not decisions[1].granted
        assert [e.kind for e in agent.store.events() if e.reader == "front-in"][:1] == [
            "reader_online"]
    finally:
        agent.stop()

