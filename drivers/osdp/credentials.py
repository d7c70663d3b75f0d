"""The pure parts of the OSDP reader that are not about frames: the Secure Channel key
file, card ids from libosdp card-read events, and PIN entry from key presses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from drivers.base import DeviceError
from drivers.osdp.link import CARD_ASCII, CARD_RAW_UNSPECIFIED, CARD_RAW_WIEGAND

_log = structlog.get_logger()

SCBK_D = bytes(range(0x30, 0x40))
"""SCBK-D, the default Secure Channel key of install mode: published in reader manuals."""


def _secret_path(name: str) -> Path:
    path = Path(name)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and "/" not in name and creds and (Path(creds) / name).exists():
        return Path(creds) / name
    return path


def load_scbk(name: str) -> bytes:
    """The 16-byte key in file ``name`` (32 hex digits, blanks ignored); refuses SCBK-D
    and the all-zero key, which are public or trivial."""
    path = _secret_path(name)
    try:
        text = path.read_text("ascii")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceError(f"scbk_file {path}: cannot read: {exc}") from exc
    digits = "".join(text.split())
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        key = b""
    if len(key) != 16:
        raise DeviceError(f"scbk_file {path}: a Secure Channel key is 32 hex digits")
    if key == SCBK_D:
        raise DeviceError(f"scbk_file {path}: this is SCBK-D, the public default key; "
                          "give every reader its own random key")
    if key == bytes(16):
        raise DeviceError(f"scbk_file {path}: the all-zero key is not a key")
    if mode & 0o077:
        _log.warning("osdp_key_file_readable", path=str(path), mode=oct(mode & 0o777),
                     hint="chmod 600: the key decrypts all reader traffic")
    return key


def card_id(event: dict[str, Any]) -> str:
    """The normalised id of a libosdp card-read event; ValueError says why it is refused."""
    fmt = event.get("format")
    data = event.get("data")
    if not data or not isinstance(data, bytes):
        raise ValueError("no_data")
    if fmt in (CARD_RAW_UNSPECIFIED, CARD_RAW_WIEGAND):
        bits = event.get("length")
        if not isinstance(bits, int) or bits <= 0:
            raise ValueError("bad_bit_count")
        if len(data) != (bits + 7) // 8:
            raise ValueError("length_mismatch")
        value = int.from_bytes(data, "big")
        pad = len(data) * 8 - bits
        value &= ~((1 << pad) - 1)
        return f"osdp:{bits}:{value.to_bytes(len(data), 'big').hex().upper()}"
    if fmt == CARD_ASCII:
        text = data.decode("ascii", errors="replace").strip()
        if not text or not text.isprintable() or not text.isascii() or ":" in text:
            raise ValueError("not_printable")
        return f"osdp:fmt:{text}"
    raise ValueError("unknown_format")


@dataclass(frozen=True, slots=True)
class Pin:
    """A finished keypad entry."""

    digits: str


@dataclass(frozen=True, slots=True)
class PinRejected:
    """A refused keypad entry: why, and how many keys it had. Never the keys."""

    reason: str
    length: int


class PinAssembler:
    """Collects ``osdp_KEYPAD`` bytes into PIN entries ended by ``#``."""

    _ENTER = frozenset(b"#\r")
    _CLEAR = frozenset(b"*\x7f")

    def __init__(self, max_digits: int, timeout_s: float) -> None:
        self._max = max_digits
        self._timeout = timeout_s
        self._digits = bytearray()
        self._keys = 0
        self._bad: str | None = None
        self._last = 0.0

    def feed(self, keys: bytes, now: float) -> list[Pin | PinRejected]:
        """Entries finished or refused by ``keys``, pressed at ``now`` (monotonic)."""
        out: list[Pin | PinRejected] = []
        if self._keys and now - self._last > self._timeout:
            out.append(PinRejected("timeout", self._keys))
            self._reset()
        self._last = now
        for key in keys:
            if key in self._ENTER:
                if self._bad is not None:
                    out.append(PinRejected(self._bad, self._keys))
                elif self._digits:
                    out.append(Pin(self._digits.decode("ascii")))
                self._reset()
            elif key in self._CLEAR:
                self._reset()
            else:
                self._keys += 1
                if self._bad is not None:
                    continue
                if not 0x30 <= key <= 0x39:
                    self._bad = "not_digit"
                elif len(self._digits) >= self._max:
                    self._bad = "too_long"
                else:
                    self._digits.append(key)
        return out

    def _reset(self) -> None:
        self._digits.clear()
        self._keys = 0
        self._bad = None
