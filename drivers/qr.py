"""QR / barcode scanners on a serial port (USB-CDC or UART scanners in "serial mode").

A scan arrives as one line of text ending in CR, LF or CRLF (configure the scanner's
suffix to that, with no prefix or AIM identifier). A scanned text may hold personal data
(a residence-permit code, a name, an ID number), so it is hashed before it leaves the
driver and is never logged: the card id is ``"qr:"`` + the SHA-256 of the text's UTF-8
bytes in lower-case hex. The agent then hashes that id again under the site key, like
every card id. SHA-256 alone does not hide a guessable text (a phone number, an ID
number); only the keyed hash does, which is why nothing but the agent sees the id.

Lines are refused (counted in ``rejected``, logged with a reason and a length only) when
they are longer than ``max_len`` bytes, are not UTF-8, or contain a control character
(Unicode category Cc: C0 and C1 controls, DEL, TAB). Empty and blank lines are skipped.
The text is taken exactly as scanned: no trimming, no case folding.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from drivers.base import DriverOptions
from drivers.serialport import SerialStreamReader

_CR = 0x0D
_LF = 0x0A


class QrOptions(DriverOptions):
    """Options of the QR scanner reader."""

    port: str = Field(min_length=1)
    """Device path, e.g. ``/dev/ttyACM0`` or a stable ``/dev/serial/by-id/...`` link."""
    baudrate: int = Field(default=9600, gt=0)
    """Ignored by USB-CDC scanners; UART scanners ship at 9600 or 115200."""
    max_len: int = Field(default=256, ge=1, le=4096)
    """Longest accepted text, in bytes of UTF-8; longer lines are refused whole."""


@dataclass(frozen=True, slots=True)
class Scanned:
    """An accepted line; ``digest`` is the SHA-256 of its text, in lower-case hex."""

    digest: str


@dataclass(frozen=True, slots=True)
class Refused:
    """A refused line: why, and how many bytes it had. Never its content."""

    reason: str
    length: int


class QrLineDecoder:
    """Lines in, digests or refusals out; keeps a partial line between calls."""

    def __init__(self, max_len: int) -> None:
        self._max_len = max_len
        self._line = bytearray()
        self._discarding = False
        """True from a too-long line's refusal up to its line end."""

    def feed(self, data: bytes) -> list[Scanned | Refused]:
        """Everything completed by ``data``, in order of arrival."""
        out: list[Scanned | Refused] = []
        for byte in data:
            if byte in (_CR, _LF):
                if not self._discarding and self._line:
                    decoded = _decode(bytes(self._line))
                    if decoded is not None:
                        out.append(decoded)
                self._discarding = False
                self._line.clear()
            elif not self._discarding:
                self._line.append(byte)
                if len(self._line) > self._max_len:
                    out.append(Refused("too_long", len(self._line)))
                    self._discarding = True
                    self._line.clear()
        return out

    def clear(self) -> None:
        """Drop a partial line."""
        self._line.clear()
        self._discarding = False


def _decode(line: bytes) -> Scanned | Refused | None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return Refused("not_utf8", len(line))
    if any(unicodedata.category(char) == "Cc" for char in text):
        return Refused("control_char", len(line))
    if not text.strip():
        return None
    return Scanned(hashlib.sha256(text.encode("utf-8")).hexdigest())


class QrReader(SerialStreamReader):
    """A QR or barcode scanner on a serial port; reports ``qr:<sha256 of the text>``."""

    Options = QrOptions
    label = "qr reader"

    def _new_decoder(self) -> QrLineDecoder:
        return QrLineDecoder(self.options.max_len)

    def _card_id(self, item: Any) -> str | None:
        return f"qr:{item.digest}" if isinstance(item, Scanned) else None
