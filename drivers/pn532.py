"""NXP PN532 NFC reader over its UART (HSU), via pyserial: the UID of ISO 14443-A cards.

Frames (PN532 User Manual UM0701-02, as nfcpy 1.0.4 and libnfc 1.8.0 implement it):

- normal ``00 00 FF LEN LCS TFI PD0..PDn DCS 00`` and extended
  ``00 00 FF FF FF LENm LENl LCS TFI ... DCS 00``; LEN counts TFI and data,
  ``LCS = -LEN`` (extended: ``-(LENm + LENl)``), ``DCS = -(TFI + data)``, mod 256; TFI is
  ``D4`` from host to chip and ``D5`` back, and a response's code is its command's + 1;
- the chip answers a command with ACK ``00 00 FF 00 FF 00``, then the response; a NACK
  ``00 00 FF FF 00 00`` from the host asks for the last response again, an ACK from the host
  aborts the command in progress; ``00 00 FF 01 FF 7F 81 00`` is the chip's error frame
  (syntax error in the host's command).

Start-up (``open``): the HSU wake-up ``55 55`` and 14 bytes ``00`` followed at once by
SAMConfiguration in normal mode, exactly as libnfc 1.8.0 sends it (a PN532 C106 powers up
in LowVbat mode and leaves it through SAMConfiguration: NXP's application note, as quoted
in libnfc's source); then GetFirmwareVersion; then RFConfiguration
MaxRetries with libnfc's values (``MxRtyATR 00, MxRtyPSL 01, MxRtyPassiveActivation 02``):
the default of ``FF`` makes InListPassiveTarget wait for a card forever.

Polling (``read``): InListPassiveTarget for one 106 kbps Type A target, then
RFConfiguration to switch the RF field off until the next poll, ``poll_ms`` later (nfcpy
also switches it off before every sense). A field reset puts every card back to IDLE, so a
card left selected by the previous poll answers the next REQA (ISO/IEC 14443-3 state
machine; not observed on hardware here); it also saves power. A command in flight survives
``read``'s return, so ``read(timeout)`` returns within about ``timeout``; a command not
answered within ``ANSWER_S`` (``FIRST_ANSWER_S`` for the wake-up) is a ``DeviceError``.

Presentation: a card is reported once, as ``"uid:<hex upper>"``, when a poll finds a UID
the previous poll did not; a poll that finds no target ends the presentation. (Plain UIDs
are clonable, and 4-byte UIDs starting 0x08 are random per presentation: treat them like
125 kHz ids.)

A frame that fails its checks is counted in ``rejected`` and logged as
``reader_frame_rejected`` with a reason and a length, never its bytes (they hold the UID);
the driver then sends a NACK and takes the resent response. More than ``MAX_NACKS``
refusals within one command is a ``DeviceError`` (a wrong baud rate looks like this).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import serial
import structlog
from pydantic import Field

from drivers.base import CardRead, DeviceError, DriverOptions, Reader

WAKE_UP = b"\x55\x55" + bytes(14)
"""HSU wake-up, byte for byte what libnfc 1.8.0's nfc-list sends before its first command."""
ACK = bytes.fromhex("0000ff00ff00")
NACK = bytes.fromhex("0000ffff0000")

HOST_TFI = 0xD4
CHIP_TFI = 0xD5
ERROR_TFI = 0x7F

GET_FIRMWARE_VERSION = 0x02
SAM_CONFIGURATION = 0x14
RF_CONFIGURATION = 0x32
IN_LIST_PASSIVE_TARGET = 0x4A
COMMAND_NAMES = {GET_FIRMWARE_VERSION: "GetFirmwareVersion",
                 SAM_CONFIGURATION: "SAMConfiguration", RF_CONFIGURATION: "RFConfiguration",
                 IN_LIST_PASSIVE_TARGET: "InListPassiveTarget"}

SAM_NORMAL = b"\x01"
"""SAMConfiguration mode 1 (normal: no SAM); timeout and IRQ left out, as libnfc does."""
MAX_RETRIES = b"\x05\x00\x01\x02"
"""RFConfiguration item 5 with libnfc's values (captured from nfc-list): InListPassiveTarget
then gives up after a few activation attempts instead of waiting for a card forever (the
default, ``FF``)."""
FIELD_OFF = b"\x01\x00"
"""RFConfiguration item 1: RF field off (InListPassiveTarget switches it on again)."""
LIST_ONE_106A = b"\x01\x00"
"""InListPassiveTarget: MaxTg 1, BrTy 0 (106 kbps Type A)."""

FIRST_ANSWER_S = 1.5
"""Bound on the answer to the wake-up. A chip ACKs within ~15 ms, but on a Raspberry Pi
the first data from a /dev/ttyUSB* can take up to ~1000 ms after open (nfcpy's comment on
the BCM270x USB; nfcpy waits 1500 ms)."""
ANSWER_S = 1.0
"""Bound on the ACK and response of every later command. InListPassiveTarget with
``MAX_RETRIES`` answers in tens of milliseconds; silence this long means the chip is gone."""
MAX_NACKS = 3
"""Refused frames tolerated within one command (each answered with a NACK)."""
MAX_FRAME_DATA = 512
"""Longest TFI + data accepted; the PN532's longest frame carries 265 (nfcpy's Diagnose)."""

_CHUNK = 4096

_log = structlog.get_logger()


class Pn532Options(DriverOptions):
    """Options of the PN532 reader."""

    port: str = Field(min_length=1)
    """Device path, e.g. ``/dev/ttyS0``, ``/dev/ttyUSB0`` or a ``/dev/serial/by-id/...`` link."""

    baudrate: Literal[9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600,
                      1288000] = 115200
    """The HSU speeds of the PN532. It powers up at 115200 and this driver never sends
    SetSerialBaudrate, so any other value only fits a chip something else switched."""

    poll_ms: int = Field(default=100, ge=10, le=1000)
    """Time between the end of one poll and the start of the next, with the RF field off.
    At least 10 ms, so a card has its field-off reset (5 ms is the figure usually quoted
    from ISO/IEC 14443-3); at most 1 s, so a tap is never waited for long."""


# -- frames ----------------------------------------------------------------------------


def command_frame(code: int, params: bytes = b"") -> bytes:
    """The host frame of command ``code``: normal when TFI + data fit 255 bytes."""
    body = bytes([HOST_TFI, code]) + params
    if len(body) <= 255:
        head = bytes([0x00, 0x00, 0xFF, len(body), -len(body) & 0xFF])
    else:
        hi, lo = divmod(len(body), 256)
        head = bytes([0x00, 0x00, 0xFF, 0xFF, 0xFF, hi, lo, -(hi + lo) & 0xFF])
    return head + body + bytes([-sum(body) & 0xFF, 0x00])


@dataclass(frozen=True, slots=True)
class Ack:
    """The chip's ACK frame."""


@dataclass(frozen=True, slots=True)
class Nack:
    """A NACK frame (a chip does not send one; it is ignored)."""


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """The chip's application error frame: it refused the command's syntax."""


@dataclass(frozen=True, slots=True)
class Response:
    """A valid ``D5`` frame: response ``code`` and the data after it."""

    code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused frame: why, and how many bytes of it were looked at. Never its content."""

    reason: str
    length: int


Event = Ack | Nack | ErrorFrame | Response | Rejected


class FrameDecoder:
    """Chip-to-host frames from a byte stream; keeps partial input between calls.

    It hunts for the start code ``00 FF`` and drops bytes before it (preambles,
    postambles, noise). After a bad length checksum or an impossible length it hunts again
    just past the start code, as the length cannot be trusted; after a bad data checksum
    it skips the frame, whose extent the length checksum vouched for.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Event]:
        """Everything completed by ``data``, in order of arrival."""
        buf = self._buffer
        buf += data
        out: list[Event] = []
        while True:
            start = buf.find(b"\x00\xff")
            if start < 0:
                # Keep a trailing 00: it may be the first half of a start code.
                del buf[:len(buf) - 1 if buf.endswith(b"\x00") else len(buf)]
                return out
            del buf[:start]
            if len(buf) < 4:
                return out
            if buf[2:4] == b"\x00\xff":
                out.append(Ack())
                del buf[:4]
                continue
            if buf[2:4] == b"\xff\x00":
                out.append(Nack())
                del buf[:4]
                continue
            if buf[2:4] == b"\xff\xff":
                if len(buf) < 7:
                    return out
                header, length = 7, buf[4] << 8 | buf[5]
                length_ok = (buf[4] + buf[5] + buf[6]) & 0xFF == 0
            else:
                header, length = 4, buf[2]
                length_ok = (buf[2] + buf[3]) & 0xFF == 0
            if not length_ok or not 1 <= length <= MAX_FRAME_DATA:
                out.append(Rejected("length_checksum" if not length_ok else "bad_length",
                                    header + 1))
                del buf[:2]
                continue
            end = header + length + 1
            if len(buf) < end:
                return out
            body = bytes(buf[header:end - 1])
            checksum = buf[end - 1]
            del buf[:end]
            out.append(_event(body, checksum, end + 1))


def _event(body: bytes, checksum: int, length: int) -> Event:
    """The event of a frame whose length checked out; ``length`` counts the preamble."""
    if (sum(body) + checksum) & 0xFF:
        return Rejected("data_checksum", length)
    if body == bytes([ERROR_TFI]):
        return ErrorFrame()
    if body[0] != CHIP_TFI:
        return Rejected("bad_tfi", length)
    if len(body) < 2:
        return Rejected("short", length)
    return Response(body[1], body[2:])


@dataclass(frozen=True, slots=True)
class TargetA:
    """One 106 kbps Type A target from InListPassiveTarget."""

    tg: int
    sens_res: bytes
    sel_res: int
    uid: bytes


def parse_list_106a(data: bytes) -> TargetA | None:
    """The first target in InListPassiveTarget's response data (after ``D5 4B``), or None
    when NbTg is 0; ``ValueError`` (its message a reason, no card data) when malformed.

    Layout (PN532 User Manual, InListPassiveTarget): NbTg, then per target Tg, SENS_RES
    (2 bytes), SEL_RES, NFCIDLength, NFCID1, and an ATS when SEL_RES says ISO 14443-4.
    The chip computes NFCIDLength from the cascade levels (4, 7 or 10); any length from 1
    to 10 that fits the frame is taken as given.
    """
    if not data:
        raise ValueError("empty_list_response")
    if data[0] == 0:
        return None
    if len(data) < 6:
        raise ValueError("short_target")
    uid_length = data[5]
    if not 1 <= uid_length <= 10 or len(data) < 6 + uid_length:
        raise ValueError("bad_uid_length")
    return TargetA(data[1], bytes(data[2:4]), data[4], bytes(data[6:6 + uid_length]))


# -- the reader --------------------------------------------------------------------------


@dataclass(slots=True)
class _Exchange:
    """A command sent and not yet answered."""

    code: int
    bound_s: float
    answer_by: float
    nacks: int = 0


@dataclass(slots=True)
class _Outcome:
    """How a command ended: its response data, or None when the chip sent its error frame."""

    data: bytes | None


class Pn532Reader(Reader):
    """A PN532 on a serial port (HSU), reporting ISO 14443-A UIDs once per presentation."""

    Options = Pn532Options

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._port: serial.Serial | None = None
        self._decoder = FrameDecoder()
        self._pending: deque[CardRead] = deque()
        self._exchange: _Exchange | None = None
        self._next_poll = 0.0
        self._present: bytes | None = None
        """UID found by the latest poll that found one, until a poll finds none."""
        self.firmware: str | None = None
        """``"<IC> v<ver>.<rev>"`` as GetFirmwareVersion reported it at the last open."""

    # -- open and close ------------------------------------------------------------------

    def open(self) -> None:
        """Open the port, wake the chip and configure it; raise ``DeviceError`` naming the
        port when it cannot be opened or the chip does not answer.

        pyserial flushes the input buffer on open; ``exclusive`` refuses a second agent
        on the same port.
        """
        self.close()
        path = self.options.port
        try:
            port = serial.Serial(port=path, baudrate=self.options.baudrate, timeout=0,
                                 exclusive=True)
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            raise DeviceError(f"pn532 reader {self.name}: cannot open {path}: {exc}") from exc
        self._port = port
        self._decoder = FrameDecoder()
        self._pending.clear()
        self._exchange = None
        self._present = None
        self.rejected = 0
        try:
            self._command(SAM_CONFIGURATION, SAM_NORMAL, preamble=WAKE_UP,
                          answer_s=FIRST_ANSWER_S)
            version = self._command(GET_FIRMWARE_VERSION)
            if len(version) < 4:
                raise DeviceError(f"pn532 reader {self.name}: short firmware version "
                                  f"({len(version)} bytes) on {path}")
            self.firmware = f"PN5{version[0]:02X} v{version[1]}.{version[2]}"
            self._command(RF_CONFIGURATION, MAX_RETRIES)
        except DeviceError:
            self.close()
            raise
        self._next_poll = time.monotonic()
        _log.info("reader_chip_identified", reader=self.name, chip=self.firmware)

    def close(self) -> None:
        """Release the port; safe to call twice or after a failed open. A command still in
        flight is aborted with an ACK first, best effort."""
        port, self._port = self._port, None
        exchange, self._exchange = self._exchange, None
        if port is None:
            return
        try:
            if exchange is not None:
                port.write(ACK)
        except OSError:
            pass  # the device is gone; closing is all that is left
        try:
            port.close()
        except OSError as exc:
            _log.warning("reader_close_failed", reader=self.name, error=str(exc))

    # -- reading -------------------------------------------------------------------------

    def read(self, timeout: float) -> CardRead | None:
        """The next card presented, or None after about ``timeout`` seconds without one."""
        self._require_port()
        deadline = time.monotonic() + max(timeout, 0.0)
        while not self._pending:
            if self._exchange is None:
                if time.monotonic() >= self._next_poll:
                    self._send(IN_LIST_PASSIVE_TARGET, LIST_ONE_106A)
                else:
                    self._idle(min(self._next_poll, deadline))
            if self._exchange is not None:
                code = self._exchange.code
                outcome = self._await(deadline)
                if outcome is not None:
                    self._answered(code, outcome)
            if time.monotonic() >= deadline:
                break
        return self._pending.popleft() if self._pending else None

    def _answered(self, code: int, outcome: _Outcome) -> None:
        """Move the poll cycle on: list → field off → wait ``poll_ms`` → list."""
        if outcome.data is None:
            _log.warning("reader_command_refused", reader=self.name,
                         command=COMMAND_NAMES.get(code, f"0x{code:02X}"))
        if code == IN_LIST_PASSIVE_TARGET:
            if outcome.data is not None:
                self._found(outcome.data)
            self._send(RF_CONFIGURATION, FIELD_OFF)
        else:
            self._next_poll = time.monotonic() + self.options.poll_ms / 1000

    def _found(self, data: bytes) -> None:
        try:
            target = parse_list_106a(data)
        except ValueError as exc:
            self._refused(Rejected(str(exc), len(data)))
            return
        if target is None:
            self._present = None
        elif target.uid != self._present:
            self._present = target.uid
            self._pending.append(CardRead(f"uid:{target.uid.hex().upper()}"))

    # -- one command at a time -----------------------------------------------------------

    def _command(self, code: int, params: bytes = b"", *, preamble: bytes = b"",
                 answer_s: float = ANSWER_S) -> bytes:
        """Send a command and wait for its response data (start-up only)."""
        self._send(code, params, preamble=preamble, answer_s=answer_s)
        outcome = self._await(float("inf"))
        assert outcome is not None  # an unbounded wait ends in an answer or DeviceError
        if outcome.data is None:
            raise DeviceError(f"pn532 reader {self.name}: {COMMAND_NAMES[code]} refused "
                              f"with an error frame on {self.options.port}")
        return outcome.data

    def _send(self, code: int, params: bytes, *, preamble: bytes = b"",
              answer_s: float = ANSWER_S) -> None:
        self._write(preamble + command_frame(code, params))
        self._exchange = _Exchange(code, answer_s, time.monotonic() + answer_s)

    def _await(self, until: float) -> _Outcome | None:
        """Take bytes until the command in flight is answered (its outcome) or ``until``
        (None; the command stays in flight). ``DeviceError`` when it is not answered
        within its bound or the line keeps garbling its answer."""
        exchange = self._exchange
        assert exchange is not None
        while True:
            wait = min(until, exchange.answer_by) - time.monotonic()
            outcome: _Outcome | None = None
            for event in self._decoder.feed(self._receive(max(wait, 0.0))):
                got = self._handle(event, exchange)
                outcome = outcome or got
            if outcome is not None:
                self._exchange = None
                return outcome
            now = time.monotonic()
            if now >= exchange.answer_by:
                self.close()  # with an ACK, which cancels the command (PN532 User Manual)
                raise DeviceError(
                    f"pn532 reader {self.name}: no answer to {COMMAND_NAMES[exchange.code]} "
                    f"within {exchange.bound_s} s on {self.options.port}")
            if now >= until:
                return None

    def _idle(self, until: float) -> None:
        """Wait until ``until`` with no command in flight, taking stray bytes."""
        for event in self._decoder.feed(self._receive(max(until - time.monotonic(), 0.0))):
            if isinstance(event, Rejected):
                self._refused(event)

    def _handle(self, event: Event, exchange: _Exchange) -> _Outcome | None:
        if isinstance(event, Response):
            # Anything but this command's response is stale, e.g. a resend after a NACK
            # that answered an earlier garbled ACK.
            return _Outcome(event.data) if event.code == exchange.code + 1 else None
        if isinstance(event, ErrorFrame):
            return _Outcome(None)
        if isinstance(event, Rejected):
            self._refused(event)
            exchange.nacks += 1
            if exchange.nacks > MAX_NACKS:
                self.close()
                raise DeviceError(f"pn532 reader {self.name}: more than {MAX_NACKS} garbled "
                                  f"frames answering {COMMAND_NAMES[exchange.code]} on "
                                  f"{self.options.port} (wrong baud rate?)")
            self._write(NACK)
        return None  # ACK (the response follows) or an unsolicited NACK

    def _refused(self, event: Rejected) -> None:
        self.rejected += 1
        _log.warning("reader_frame_rejected", reader=self.name, reason=event.reason,
                     length=event.length)

    # -- the port ------------------------------------------------------------------------

    def _require_port(self) -> serial.Serial:
        port = self._port
        if port is None:
            raise DeviceError(f"pn532 reader {self.name}: {self.options.port} is not open")
        return port

    def _write(self, data: bytes) -> None:
        port = self._require_port()
        try:
            port.write(data)
        except OSError as exc:  # SerialException is an OSError
            self.close()
            raise DeviceError(
                f"pn532 reader {self.name}: {self.options.port} failed: {exc}") from exc

    def _receive(self, timeout: float) -> bytes:
        """Wait up to ``timeout`` for a first byte, then take what else has arrived. A
        vanished device shows up as an OSError (see drivers/serial_reader.py)."""
        port = self._require_port()
        try:
            port.timeout = timeout
            first = port.read(1)
            waiting = port.in_waiting if first else 0
            return first + port.read(min(waiting, _CHUNK)) if waiting else first
        except OSError as exc:  # SerialException is an OSError
            self.close()
            raise DeviceError(
                f"pn532 reader {self.name}: {self.options.port} failed: {exc}") from exc
