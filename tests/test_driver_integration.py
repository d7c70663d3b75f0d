"""A tap through each serial and GPIO driver becomes a decision and an event in a real
agent; a grant through a USB relay board drives the board.

(The OSDP, PN532 and PC/SC drivers have their agent tests next to their peers.)
"""

from __future__ import annotations

import hashlib
import os
import select
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.decision import Decision, Reason
from agent.runtime import Agent, ReadTiming
from agent.store import CredentialEntry
from drivers.base import Reader
from drivers.idcard import IdCardReader
from drivers.simulated import SimBus
from drivers.wiegand import WiegandReader, encode
from protocol.hashing import CredentialHasher
from tests.agentconf import KEY, SIMULATED, DoorSpec, ReaderSpec, agent_config
from tests.conftest import PtyPeer, wait_for
from tests.test_idcard import FOUND, NO_CARD, SELECTED, SERIAL_ID, SamPeer, sam_reply
from tests.test_reader_contract import ReaderContract
from tests.test_wiegand import RecordedLines


class Site:
    """An agent with one door, one reader of the driver under test, one enrolled card."""

    def __init__(self, folder: Path, driver: str, options: Mapping[str, Any] | None = None,
                 relay: Mapping[str, Any] = SIMULATED,
                 devices: dict[str, Any] | None = None) -> None:
        self.bus = SimBus()
        config = agent_config(folder, doors=(DoorSpec(unlock_s=0.3, relay=relay),),
                              readers=(ReaderSpec(driver=driver, debounce_s=0,
                                                  options=options),))
        self.agent = Agent(config, bus=self.bus, devices=devices)
        self.decisions: list[Decision] = []
        self.agent.on_decision = self._collect

    def _collect(self, _r: Any, decision: Decision, _t: ReadTiming) -> None:
        self.decisions.append(decision)

    def start(self, enrolled: str) -> None:
        """Start with ``enrolled`` (a normalised card id) on the allowlist."""
        self.agent.start()
        assert self.agent.store is not None
        self.agent.store.replace_allowlist(
            [CredentialEntry(CredentialHasher(KEY).credential(enrolled))], 1)

    def next_decision(self, count: int) -> Decision:
        """Wait for decision number ``count``."""
        wait_for(lambda: len(self.decisions) >= count, f"decision {count}")
        return self.decisions[count - 1]

    def wait_online(self) -> None:
        """Wait until the reader has opened its device."""
        def online() -> bool:
            assert self.agent.store is not None
            return any(e.kind == "reader_online" for e in self.agent.store.events())
        wait_for(online, "the reader to come online")

    def granted_event(self) -> bool:
        """Whether an access_granted event was committed."""
        assert self.agent.store is not None
        return any(e.kind == "access_granted" for e in self.agent.store.events())


@pytest.fixture
def sites() -> Iterator[list[Site]]:
    """Sites started by a test, stopped at teardown."""
    started: list[Site] = []
    yield started
    for site in started:
        site.agent.stop()


def test_qr_scan_becomes_a_decision(tmp_path: Path, pty_peer: PtyPeer,
                                    sites: list[Site]) -> None:
    """A QR code scanned on a serial scanner is granted when its hashed text is enrolled,
    and an unknown code is denied; both are recorded."""
    site = Site(tmp_path, "qr", {"port": pty_peer.path})
    sites.append(site)
    text = "RP-2026-000123"
    site.start(f"qr:{hashlib.sha256(text.encode()).hexdigest()}")
    site.wait_online()  # pyserial drops what arrives before the port is open
    pty_peer.write(text.encode() + b"\r\n")
    assert site.next_decision(1).granted
    pty_peer.write(b"SOMETHING-ELSE\r\n")
    assert site.next_decision(2).reason is Reason.UNKNOWN_CARD
    assert site.granted_event()


def test_idcard_module_serial_becomes_a_decision(tmp_path: Path, pty_peer: PtyPeer,
                                                 sites: list[Site]) -> None:
    """A residence-permit card on an ID-card reader module is granted by its chip serial
    number alone."""
    peer = SamPeer(pty_peer)
    try:
        site = Site(tmp_path, "idcard", {"port": pty_peer.path, "poll_interval": 0.05})
        sites.append(site)
        site.start(SERIAL_ID)
        peer.card = SELECTED
        assert site.next_decision(1) == Decision(True, Reason.GRANTED)
        assert site.granted_event()
    finally:
        # Its thread reads the pty's descriptor number, which the next test's pty reuses.
        peer.stop()


def test_wiegand_frame_becomes_a_decision(tmp_path: Path, sites: list[Site]) -> None:
    """A 26-bit Wiegand frame (FC 118, CN 1603) arriving as edges on D0/D1 is granted when
    that card is enrolled."""
    lines = RecordedLines(17, 18)
    reader = WiegandReader("front-in", {"chip": "/dev/gpiochip0", "d0": 17, "d1": 18,
                                        "format": "h10301"},
                           open_lines=lambda _o, _c: lines)
    site = Site(tmp_path, "wiegand", {"chip": "/dev/gpiochip0", "d0": 17, "d1": 18,
                                      "format": "h10301"}, devices={"front-in": reader})
    sites.append(site)
    site.start("wiegand26:118:1603")
    wait_for(lambda: reader._source is not None, "the lines")  # noqa: SLF001 - opened
    lines.present(encode("h10301", 1603, facility=118))
    assert site.next_decision(1).granted
    lines.present(encode("h10301", 1604, facility=118))
    assert site.next_decision(2).reason is Reason.UNKNOWN_CARD


def test_grant_drives_the_usb_relay_board(tmp_path: Path, pty_peer: PtyPeer,
                                          sites: list[Site]) -> None:
    """A grant makes the agent switch the LCUS relay board's channel on, then off after
    the unlock time, with the board's exact command frames."""
    site = Site(tmp_path, "simulated", relay={
        "driver": "relay_board", "options": {"port": pty_peer.path, "channel": 1}})
    sites.append(site)
    site.start("em4100:67003B51C6")
    received = bytearray()

    def drain() -> bytes:
        while select.select([pty_peer.master], [], [], 0)[0]:
            received.extend(os.read(pty_peer.master, 64))
        return bytes(received)

    wait_for(lambda: drain().endswith(b"\xa0\x01\x00\xa1"), "the start-up lock command")
    received.clear()
    site.bus.tap("front-in", "em4100:67003B51C6")
    assert site.next_decision(1).granted
    wait_for(lambda: drain() == b"\xa0\x01\x01\xa2\xa0\x01\x00\xa1", "on, then off")


class TestIdCardReaderContract(ReaderContract):
    """The ID-card module reader runs the shared reader contract against the scripted
    module: each presentation is find → select with the card's serial, then 'no card'."""

    @pytest.fixture(autouse=True)
    def _module(self, pty_peer: PtyPeer) -> Iterator[None]:
        self.pty = pty_peer
        self.module = SamPeer(pty_peer)
        yield
        self.module.stop()

    def make_reader(self) -> Reader:
        """An ID-card reader on the pty, polling fast."""
        return IdCardReader("desk", {"port": self.pty.path, "poll_interval": 0.02})

    def present(self, value: str) -> None:
        """Put a card with serial ``value`` (padded to 8 bytes) in the field, then take it
        away after it was selected."""
        serial = bytes.fromhex(value.ljust(16, "0"))
        with self.module.lock:
            self.module.script.extend([FOUND, sam_reply(0x90, serial), NO_CARD])

    def expected_id(self, value: str) -> str:
        """The serial as 16 upper-case hex digits."""
        return f"idcard:{value.ljust(16, '0').upper()}"


class TestWiegandReaderContract(ReaderContract):
    """The Wiegand reader runs the shared reader contract on recorded D0/D1 edges (GPIO
    cannot be simulated on this kernel): a card value maps to an H10301 frame."""

    def make_reader(self) -> Reader:
        """A Wiegand reader whose line request is a recorded edge source."""
        self.lines = RecordedLines(17, 18)
        return WiegandReader("gate", {"chip": "/dev/gpiochip0", "d0": 17, "d1": 18,
                                      "format": "h10301"},
                             open_lines=lambda _o, _c: self.lines)

    def present(self, value: str) -> None:
        """Send the H10301 frame of facility = first byte, card = last two bytes."""
        self.lines.present(encode("h10301", int(value[-4:], 16),
                                  facility=int(value[:2], 16)))

    def expected_id(self, value: str) -> str:
        """Facility and card number in decimal."""
        return f"wiegand26:{int(value[:2], 16)}:{int(value[-4:], 16)}"
