"""ID-card / residence-permit reader modules (SAM protocol, ``AA AA AA 96 69`` framing).

Only the card's chip serial number is used, as an opaque credential: the driver sends
exactly two commands, "find card" and "select card", and never one that reads personal
data (``30 01`` text + photo, ``30 10`` with fingerprints, ``30 03`` appended address).
Nothing a module sends is kept beyond the 8 serial bytes of a select reply.

Framing (公安部身份证阅读器模块 SAM 通讯协议, as published by several module vendors and
quoted in docs/hardware.md; UART 115200 8N1 by default):

- host to module: ``AA AA AA 96 69 | Len1 Len2 | CMD Para [Data] | CHK``
- module to host: ``AA AA AA 96 69 | Len1 Len2 | SW1 SW2 SW3 [Data] | CHK``

``Len`` (big-endian) counts every byte after itself, CHK included; CHK is the XOR of every
byte after the preamble except itself. SW3 is the module's status: ``9F`` card found,
``90`` success, ``80`` no card found, ``81`` select failed; anything else an error.

Published frames this driver sends and expects:

- find card   ``AA AA AA 96 69 00 03 20 01 22``
  -> ``AA AA AA 96 69 00 08 00 00 9F 00 00 00 00 97`` (card found; 4 data bytes)
- select card ``AA AA AA 96 69 00 03 20 02 21``
  -> ``AA AA AA 96 69 00 0C 00 00 90 <8 bytes> <CHK>``

The card id is ``"idcard:"`` + the 8 select-reply bytes in upper-case hex. **Caveat:** the
one complete published capture of a select reply (a Huashi CVR-100D, quoted in a 2022 blog
post) carries eight zero bytes, so some modules do not report a per-card serial there. An
all-zero (or all-FF) serial would make every card the same credential; it is refused
(``no_serial``), and such a module cannot serve as a door reader.

The module answers only when asked, so the driver polls: find card every
``poll_interval`` seconds, select card when one is found. A module that leaves
``max_unanswered`` requests in a row unanswered raises ``DeviceError``, so the agent marks
the reader offline and reopens it (unlike Wiegand, this link is supervised).
"""

from __future__ import annotations

import operator
import time
from collections import deque
from dataclasses import dataclass
from functools import reduce
from typing import Any, Literal, NoReturn

import serial
import structlog
from pydantic import Field

from drivers.base import CardRead, DeviceError, DriverOptions, Reader

_log = structlog.get_logger()

PREAMBLE = b"\xaa\xaa\xaa\x96\x69"
MIN_REPLY_LEN = 4
"""SW1 SW2 SW3 CHK: the shortest reply body the Len field can announce."""
MAX_REPLY_LEN = 64
"""Longest reply body accepted. Find (8) and select (12) replies are far shorter; the
1,295-byte read reply answers a command this driver never sends, so a larger Len field
is a corrupt frame, and refusing it keeps a garbled length from swallowing later replies."""
SERIAL_BYTES = 8

STATUS_OK = 0x90
STATUS_FOUND = 0x9F
STATUS_NO_CARD = 0x80
STATUS_SELECT_FAILED = 0x81
"""Select failed: the card left the field between find and select. Like ``80`` a normal
outcome, neither a read nor a refusal."""

_CHUNK = 4096


def checksum(body: bytes) -> int:
    """XOR of the bytes after the preamble, CHK excluded."""
    return reduce(operator.xor, body, 0)


def command(cmd: int, para: int, data: bytes = b"") -> bytes:
    """The frame of a host command."""
    body = (2 + len(data) + 1).to_bytes(2, "big") + bytes([cmd, para]) + data
    return PREAMBLE + body + bytes([checksum(body)])


FIND_CARD = command(0x20, 0x01)
SELECT_CARD = command(0x20, 0x02)


@dataclass(frozen=True, slots=True)
class Reply:
    """A module reply that passed the length and checksum checks."""

    sw: bytes
    """SW1 SW2 SW3."""
    data: bytes

    @property
    def status(self) -> int:
        """SW3, the module's own status code."""
        return self.sw[2]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused frame: why, and how many bytes it had. Never its content."""

    reason: str
    length: int


class ReplyDecoder:
    """Finds replies in a byte stream; keeps partial input between calls.

    Bytes before a preamble are skipped. A frame with an impossible Len field or a wrong
    checksum is refused and the search resumes one byte after its preamble, so a truncated
    frame followed by a good one costs only the truncated one.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Reply | Rejected]:
        """Everything completed by ``data``, in order of arrival."""
        self._buf += data
        buf = self._buf
        out: list[Reply | Rejected] = []
        while True:
            start = buf.find(PREAMBLE)
            if start < 0:
                # Keep a tail that may be the start of a preamble split across reads.
                del buf[:max(len(buf) - (len(PREAMBLE) - 1), 0)]
                return out
            del buf[:start]
            if len(buf) < len(PREAMBLE) + 2:
                return out
            length = int.from_bytes(buf[5:7], "big")
            if not MIN_REPLY_LEN <= length <= MAX_REPLY_LEN:
                out.append(Rejected("bad_length", len(PREAMBLE) + 2))
                del buf[:1]
                continue
            end = len(PREAMBLE) + 2 + length
            if len(buf) < end:
                return out
            frame = bytes(buf[:end])
            if checksum(frame[5:-1]) != frame[-1]:
                out.append(Rejected("checksum", end))
                del buf[:1]
                continue
            del buf[:end]
            out.append(Reply(frame[7:10], frame[10:-1]))

    def partial(self) -> int:
        """Bytes held of a frame begun (from its preamble) but not complete; 0 if none."""
        return len(self._buf) if self._buf.startswith(PREAMBLE) else 0

    def clear(self) -> None:
        """Drop partial input."""
        self._buf.clear()


class IdCardOptions(DriverOptions):
    """Options of the ID-card module reader."""

    port: str = Field(min_length=1)
    """Device path, e.g. ``/dev/ttyUSB0`` or a stable ``/dev/serial/by-id/...`` link."""
    baudrate: int = Field(default=115200, gt=0)
    """115200 is the modules' default (57600, 38400, 19200, 9600 are settable)."""
    poll_interval: float = Field(default=0.25, ge=0.02, le=5.0)
    """Seconds between "find card" requests while no card is being handled."""
    reply_timeout: float = Field(default=1.0, ge=0.05, le=10.0)
    """Seconds to wait for a reply. [unverified] The modules' find/select times are not
    published; replies of 15-19 bytes take under 2 ms on the wire at 115200 baud, and
    1 s leaves room for the card's RF exchange."""
    max_unanswered: int = Field(default=3, ge=1, le=100)
    """Requests in a row without an answer before the module counts as gone."""


Awaiting = Literal["find", "select"]


class IdCardReader(Reader):
    """A SAM ID-card module on a serial port, reporting only the chip serial number."""

    Options = IdCardOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._port: serial.Serial | None = None
        self._decoder = ReplyDecoder()
        self._pending: deque[CardRead] = deque()
        self._awaiting: Awaiting | None = None
        self._sent_at = 0.0
        self._next_poll = 0.0
        self._unanswered = 0

    def open(self) -> None:
        """Open the port; raise ``DeviceError`` naming it when that fails. Sends nothing:
        the first request goes out on the first ``read``."""
        self.close()
        path = self.options.port
        try:
            port = serial.Serial(port=path, baudrate=self.options.baudrate, timeout=0,
                                 write_timeout=1.0, exclusive=True)
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            raise DeviceError(f"idcard reader {self.name}: cannot open {path}: {exc}") from exc
        self._port = port
        self._decoder.clear()
        self._pending.clear()
        self._awaiting = None
        self._next_poll = 0.0
        self._unanswered = 0
        self.rejected = 0

    def read(self, timeout: float) -> CardRead | None:
        """The next card read, or None after about ``timeout`` seconds without one."""
        port = self._port
        if port is None:
            raise DeviceError(f"idcard reader {self.name}: {self.options.port} is not open")
        if self._pending:
            return self._pending.popleft()
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            now = time.monotonic()
            if self._awaiting is None and now >= self._next_poll:
                self._send(port, FIND_CARD, "find")
            wake = (self._sent_at + self.options.reply_timeout if self._awaiting
                    else self._next_poll)
            self._consume(port, self._receive(port, max(min(wake, deadline) - now, 0.0)))
            now = time.monotonic()
            if self._awaiting and now >= self._sent_at + self.options.reply_timeout:
                self._no_reply(now)
            if self._pending:
                return self._pending.popleft()
            if now >= deadline:
                return None

    def _send(self, port: serial.Serial, frame: bytes, what: Awaiting) -> None:
        try:
            port.write(frame)
        except OSError as exc:  # SerialException and SerialTimeoutException are OSErrors
            self._fail(exc)
        self._awaiting = what
        self._sent_at = time.monotonic()

    def _receive(self, port: serial.Serial, timeout: float) -> bytes:
        """Wait up to ``timeout`` for a first byte, then take what else has arrived."""
        try:
            port.timeout = timeout
            first = port.read(1)
            waiting = port.in_waiting if first else 0
            return first + port.read(min(waiting, _CHUNK)) if waiting else first
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> NoReturn:
        self.close()
        raise DeviceError(f"idcard reader {self.name}: {self.options.port} failed: "
                          f"{exc}") from exc

    def _no_reply(self, now: float) -> None:
        partial = self._decoder.partial()
        self._decoder.clear()
        self._awaiting = None
        self._next_poll = now + self.options.poll_interval
        if partial:
            # A reply began but never completed (a Len field too large, bytes lost): the
            # module is there, the frame is refused.
            self._unanswered = 0
            self._reject("incomplete", partial)
            return
        self._unanswered += 1
        if self._unanswered >= self.options.max_unanswered:
            count = self._unanswered
            self.close()
            raise DeviceError(
                f"idcard reader {self.name}: no answer from the module on "
                f"{self.options.port} to {count} requests in a row (is it powered, and set "
                f"to {self.options.baudrate} baud?)")

    def _consume(self, port: serial.Serial, data: bytes) -> None:
        for item in self._decoder.feed(data):
            if isinstance(item, Rejected):
                self._reject(item.reason, item.length)
                if self._awaiting is not None:
                    # Most likely the awaited reply, garbled: the module is alive; ask
                    # again at the next poll rather than wait out the reply timeout.
                    self._answered()
            else:
                self._handle(port, item)

    def _answered(self) -> None:
        self._awaiting = None
        self._unanswered = 0
        self._next_poll = time.monotonic() + self.options.poll_interval

    def _handle(self, port: serial.Serial, reply: Reply) -> None:
        awaited = self._awaiting
        length = len(PREAMBLE) + 2 + 3 + len(reply.data) + 1
        if awaited is None:
            self._reject("unexpected", length)
            return
        self._answered()
        status = reply.status
        if status in (STATUS_NO_CARD, STATUS_SELECT_FAILED):
            return
        if awaited == "find":
            if status == STATUS_FOUND:
                self._send(port, SELECT_CARD, "select")
            else:
                self._reject(f"status_{status:02x}", length)
            return
        if status != STATUS_OK:
            self._reject(f"status_{status:02x}", length)
        elif len(reply.data) != SERIAL_BYTES:
            self._reject("wrong_length", length)
        elif reply.data in (bytes(SERIAL_BYTES), b"\xff" * SERIAL_BYTES):
            self._reject("no_serial", length)
        else:
            self._pending.append(CardRead(f"idcard:{reply.data.hex().upper()}"))

    def _reject(self, reason: str, length: int) -> None:
        self.rejected += 1
        _log.warning("reader_frame_rejected", reader=self.name, reason=reason, length=length)

    def close(self) -> None:
        """Release the port; safe to call twice or after a failed open."""
        port, self._port = self._port, None
        self._awaiting = None
        if port is None:
            return
        try:
            port.close()
        except OSError as exc:
            _log.warning("reader_close_failed", reader=self.name, error=str(exc))
