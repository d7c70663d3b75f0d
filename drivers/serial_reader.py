"""Generic serial card reader: RDM6300-style EM4100 frames or ASCII lines, via pyserial.

Two wire formats, chosen by the ``format`` option:

- ``em4100`` (RDM6300 and its clones, 9600 8N1): every read is 14 bytes, ``0x02``, 10 ASCII
  hex characters (1 version byte + 4 data bytes), 2 ASCII hex checksum characters (XOR of
  the 5 binary bytes), ``0x03``. The card id is ``"em4100:"`` + the 10 hex characters in
  upper case. Bytes between frames are ignored: some clones append CR LF after ``0x03``.
- ``ascii`` (USB-serial readers that print the UID as a line): lines end in CR, LF or
  CRLF; a line must be ASCII and match ``pattern`` as a whole; the card id is
  ``f"{id_kind}:{card}"`` where ``card`` is the pattern's named group.

The driver does not debounce: an RDM6300 repeats the frame while the card stays in the
field, and the agent drops repeats for every reader alike. Refused frames and lines are
counted in ``rejected`` and logged as ``reader_frame_rejected`` with a reason and a length,
never with their bytes, which may hold most of a card number.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from functools import reduce
from typing import Any, Literal, Protocol

from pydantic import Field, ValidationInfo, field_validator

from drivers.base import DriverOptions
from drivers.serialport import CHUNK, SerialStreamReader

DEFAULT_PATTERN = r"^\s*(?P<card>[0-9A-Fa-f]{4,32})\s*$"
"""A line holding only 4 to 32 hex digits, with optional surrounding blanks."""

_ASCII_ONLY = ("pattern", "id_kind", "uppercase", "max_line")

_STX = 0x02
_ETX = 0x03
_CR = 0x0D
_LF = 0x0A
_HEX_DIGITS = frozenset(b"0123456789ABCDEFabcdef")
_EM4100_BODY = 12
"""Hex characters between STX and ETX: 10 for version + data, 2 for the checksum."""



class SerialReaderOptions(DriverOptions):
    """Options of the serial card reader."""

    port: str = Field(min_length=1)
    """Device path, e.g. ``/dev/ttyUSB0`` or a stable ``/dev/serial/by-id/...`` link."""

    baudrate: int = Field(default=9600, gt=0)

    format: Literal["em4100", "ascii"] = "em4100"

    pattern: str = DEFAULT_PATTERN
    """ascii only: a regex that must match the whole line, with a named group ``card``."""

    id_kind: str = Field(default="text", pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    """ascii only: the kind prefix of the normalised card id, ``"<id_kind>:<card>"``."""

    uppercase: bool = True
    """ascii only: upper-case the ``card`` group, so hex ids compare equal in any case."""

    max_line: int = Field(default=128, ge=1, le=CHUNK)
    """ascii only: longer lines are refused whole, up to the next line end."""

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles_with_card_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        if "card" not in compiled.groupindex:
            raise ValueError("needs a named group 'card', e.g. (?P<card>[0-9A-F]+)")
        return value

    @field_validator(*_ASCII_ONLY)
    @classmethod
    def _only_for_ascii(cls, value: Any, info: ValidationInfo) -> Any:
        # Validators run only on keys the configuration sets, so this refuses an ascii-only
        # key under format em4100 (it would be silently ignored) and leaves defaults alone.
        if info.data.get("format", "ascii") != "ascii":
            raise ValueError("only applies to format 'ascii'")
        return value


@dataclass(frozen=True, slots=True)
class Accepted:
    """A complete, valid frame or line; ``value`` is the card id without its kind."""

    value: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused frame or line: why, and how many bytes it had. Never its content."""

    reason: str
    length: int


Decoded = Accepted | Rejected


class Decoder(Protocol):
    """Turns received bytes into decoded reads; keeps partial input between calls."""

    def feed(self, data: bytes) -> list[Decoded]:
        """Everything completed by ``data``, in order of arrival."""
        ...


def em4100_checksum(data: bytes) -> int:
    """The RDM6300 checksum: XOR of the 5 binary bytes (version byte + 4 data bytes)."""
    return reduce(operator.xor, data, 0)


def em4100_frame(value: str) -> bytes:
    """The 14-byte frame an RDM6300 sends for ``value`` (10 hex characters)."""
    data = bytes.fromhex(value)
    if len(data) != 5:
        raise ValueError("an EM4100 value is 10 hex characters")
    return b"\x02" + f"{value}{em4100_checksum(data):02X}".encode("ascii") + b"\x03"


class Em4100Decoder:
    """The RDM6300 frame parser, as a pure state machine over bytes.

    It hunts for ``0x02`` and ignores everything before it. Inside a frame, a ``0x02``
    refuses the partial frame and starts a new one (a reader that lost sync mid-frame
    starts over with STX); a non-hex byte, an early ``0x03`` or a missing ``0x03`` refuses
    the frame and goes back to hunting.
    """

    def __init__(self) -> None:
        self._frame: bytearray | None = None
        """Hex characters after the STX of the frame in progress; None while hunting."""

    def feed(self, data: bytes) -> list[Decoded]:
        """Everything completed by ``data``, in order of arrival."""
        out: list[Decoded] = []
        for byte in data:
            frame = self._frame
            if frame is None:
                if byte == _STX:
                    self._frame = bytearray()
                continue
            if byte == _STX:
                out.append(Rejected("restarted", 1 + len(frame)))
                self._frame = bytearray()
            elif len(frame) < _EM4100_BODY:
                if byte in _HEX_DIGITS:
                    frame.append(byte)
                else:
                    out.append(Rejected("short" if byte == _ETX else "not_hex", 2 + len(frame)))
                    self._frame = None
            else:
                self._frame = None
                out.append(_em4100_decode(bytes(frame)) if byte == _ETX
                           else Rejected("no_end", 2 + len(frame)))
        return out


def _em4100_decode(body: bytes) -> Decoded:
    """Check the 12 hex characters between STX and ETX."""
    raw = bytes.fromhex(body.decode("ascii"))
    if em4100_checksum(raw[:5]) != raw[5]:
        return Rejected("checksum", 2 + len(body))
    return Accepted(body[:10].decode("ascii").upper())


class LineDecoder:
    """The ASCII line parser: CR, LF or CRLF ends a line; blank lines are skipped."""

    def __init__(self, pattern: re.Pattern[str], uppercase: bool, max_line: int) -> None:
        self._pattern = pattern
        self._uppercase = uppercase
        self._max_line = max_line
        self._line = bytearray()
        self._discarding = False
        """True from a too-long line's refusal up to its line end."""

    def feed(self, data: bytes) -> list[Decoded]:
        """Everything completed by ``data``, in order of arrival."""
        out: list[Decoded] = []
        for byte in data:
            if byte in (_CR, _LF):
                if not self._discarding and self._line:
                    decoded = self._decode(bytes(self._line))
                    if decoded is not None:
                        out.append(decoded)
                self._discarding = False
                self._line.clear()
            elif not self._discarding:
                self._line.append(byte)
                if len(self._line) > self._max_line:
                    out.append(Rejected("too_long", len(self._line)))
                    self._discarding = True
                    self._line.clear()
        return out

    def _decode(self, line: bytes) -> Decoded | None:
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            return Rejected("not_ascii", len(line))
        if not text.strip():
            return None
        match = self._pattern.fullmatch(text)
        if match is None:
            return Rejected("no_match", len(line))
        card = match.group("card")
        if not card:
            return Rejected("empty_card", len(line))
        return Accepted(card.upper() if self._uppercase else card)


class SerialReader(SerialStreamReader):
    """A card reader on a serial port (RDM6300-style EM4100 frames or ASCII lines)."""

    Options = SerialReaderOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._kind = "em4100" if self.options.format == "em4100" else self.options.id_kind

    def _new_decoder(self) -> Decoder:
        opts = self.options
        if opts.format == "em4100":
            return Em4100Decoder()
        return LineDecoder(re.compile(opts.pattern), opts.uppercase, opts.max_line)

    def _card_id(self, item: Any) -> str | None:
        return f"{self._kind}:{item.value}" if isinstance(item, Accepted) else None
