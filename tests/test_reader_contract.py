"""The contract every card reader driver passes, run for each driver.

A driver's test class subclasses ``ReaderContract`` and provides ``make_reader()`` (a new,
unopened reader) and ``present(value)`` (make a card with that value appear at the reader
the way the real device would). ``kind`` is the id kind the reader reports, so a presented
value comes back as ``f"{kind}:{value}"``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import pytest

from drivers.base import CardRead, DeviceError, Reader
from drivers.qr import QrReader
from drivers.serial_reader import SerialReader, em4100_frame
from drivers.simulated import SimBus, SimulatedReader

if TYPE_CHECKING:
    from tests.conftest import PtyPeer

CARD_A = "67003B51C6"
CARD_B = "67003BA86C"
READ_TIMEOUT = 5.0
"""Generous: a card already presented arrives in milliseconds; this only bounds a failure."""


class ReaderContract:
    """Tests every reader driver must pass; subclass and provide the hooks below."""

    kind: ClassVar[str] = "em4100"

    def make_reader(self) -> Reader:
        """A new, unopened reader of the driver under test."""
        raise NotImplementedError

    def expected_id(self, value: str) -> str:
        """The normalised id a card presented with ``value`` comes back as."""
        return f"{self.kind}:{value}"

    def present(self, value: str) -> None:
        """Make a card with ``value`` appear at the reader made by ``make_reader``."""
        raise NotImplementedError

    @pytest.fixture
    def reader(self) -> Iterator[Reader]:
        """An opened reader, closed after the test."""
        reader = self.make_reader()
        reader.open()
        try:
            yield reader
        finally:
            reader.close()

    def test_idle_read_returns_none(self, reader: Reader) -> None:
        """With no card presented, read(timeout) returns None rather than blocking or raising."""
        assert reader.read(0.05) is None

    def test_presented_card_is_read_normalised(self, reader: Reader) -> None:
        """A presented card comes back once as a CardRead with the normalised id."""
        before = time.monotonic()
        self.present(CARD_A)
        got = reader.read(READ_TIMEOUT)
        assert isinstance(got, CardRead)
        assert got.card_id == self.expected_id(CARD_A)
        assert before <= got.at <= time.monotonic()
        assert reader.read(0.05) is None

    def test_cards_come_back_in_order(self, reader: Reader) -> None:
        """Two cards presented one after the other are read in that order, repeats included."""
        for value in (CARD_A, CARD_B, CARD_B):
            self.present(value)
        got = [reader.read(READ_TIMEOUT) for _ in range(3)]
        assert [r.card_id if r else None for r in got] == [
            self.expected_id(CARD_A), self.expected_id(CARD_B), self.expected_id(CARD_B)]

    def test_rejected_starts_at_zero(self, reader: Reader) -> None:
        """A freshly opened reader has refused nothing yet."""
        assert reader.rejected == 0

    def test_feedback_does_not_raise(self, reader: Reader) -> None:
        """Showing an outcome is safe on every reader, whether or not it has an LED."""
        reader.feedback(True)
        reader.feedback(False)

    def test_close_twice_is_safe(self, reader: Reader) -> None:
        """close() may be called again on a closed reader."""
        reader.close()
        reader.close()

    def test_close_without_open_is_safe(self) -> None:
        """close() on a reader that was never opened does nothing."""
        self.make_reader().close()

    def test_read_after_close_raises_device_error_or_returns_none(self, reader: Reader) -> None:
        """After close(), read() raises DeviceError or (for a self-reopening driver) is idle."""
        reader.close()
        try:
            got = reader.read(0.05)
        except DeviceError:
            return
        assert got is None

    def test_reopen_after_close_reads_again(self, reader: Reader) -> None:
        """A closed reader opens again and reads cards presented after the reopen."""
        reader.close()
        reader.open()
        self.present(CARD_B)
        got = reader.read(READ_TIMEOUT)
        assert got is not None
        assert got.card_id == self.expected_id(CARD_B)


class TestSimulatedReaderContract(ReaderContract):
    """The simulated reader, fed through its own SimBus."""

    @pytest.fixture(autouse=True)
    def _bus(self) -> None:
        self.bus = SimBus()

    def make_reader(self) -> Reader:
        """A simulated reader on this test's bus."""
        return SimulatedReader("sim-front", {}, bus=self.bus)

    def present(self, value: str) -> None:
        """Tap the card on the bus."""
        self.bus.tap("sim-front", f"{self.kind}:{value}")


class TestSerialReaderContract(ReaderContract):
    """The serial reader in EM4100 mode, over a real pseudo-terminal."""

    @pytest.fixture(autouse=True)
    def _pty(self, pty_peer: PtyPeer) -> None:
        self.pty = pty_peer

    def make_reader(self) -> Reader:
        """A serial reader on this test's pty."""
        return SerialReader("serial-front", {"port": self.pty.path})

    def present(self, value: str) -> None:
        """Write the RDM6300 frame for the card to the device end of the pty."""
        self.pty.write(em4100_frame(value))


class TestQrScannerContract(ReaderContract):
    """The contract for the QR scanner driver over a pseudo-terminal."""

    @pytest.fixture(autouse=True)
    def _peer(self, pty_peer: PtyPeer) -> None:
        self.peer = pty_peer

    def make_reader(self) -> Reader:
        """A QR scanner reader on the pty."""
        return QrReader("qr-front", {"port": self.peer.path})

    def present(self, value: str) -> None:
        """Scan a code holding ``value``: the scanner sends the text and CR LF."""
        self.peer.write(value.encode() + b"\r\n")

    def expected_id(self, value: str) -> str:
        """The scanned text arrives only as its SHA-256."""
        return f"qr:{hashlib.sha256(value.encode()).hexdigest()}"
