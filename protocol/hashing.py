"""Keyed hashing of cards and permits, and the format of the keys that make them.

Card and permit numbers never travel or rest in the clear: a card id is replaced by
HMAC-SHA256 under the building's site key (which the office shares, so that it can hash
the cards of the lists it sends), a permit number by HMAC-SHA256 under the office's permit
key (one for every building, so one broadcast revocation covers them all).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

SITE_KEY_BYTES = 32
LOG_PREFIX_HEX = 10
"""Hex digits of a credential hash shown in logs and events: 40 bits, enough to tell
cards apart in a building, too few to serve as a lookup key elsewhere."""


class SecretError(Exception):
    """A secret is missing, unreadable or malformed; the message names the file."""


def parse_key(data: bytes, path: Path) -> bytes:
    """Accept 32 raw bytes or their 64-character hex form (surrounding space ignored)."""
    text = data.strip()
    if len(text) == SITE_KEY_BYTES * 2:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) == SITE_KEY_BYTES:
        return data
    raise SecretError(f"{path}: a site key is 32 bytes or 64 hex characters, found "
                      f"{len(data)} bytes")


def read_key(path: Path) -> bytes:
    """A key file's 32 bytes; ``SecretError`` naming the file when it cannot be used."""
    try:
        return parse_key(path.read_bytes(), path)
    except FileNotFoundError:
        raise SecretError(f"{path}: key file not found") from None
    except OSError as exc:
        raise SecretError(f"{path}: cannot read key: {exc.strerror}") from exc


class CredentialHasher:
    """Keyed hashing of card identifiers and permit numbers under one 32-byte key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != SITE_KEY_BYTES:
            raise ValueError("site key must be 32 bytes")
        self._key = key

    def credential(self, card_id: str) -> bytes:
        """The 32-byte lookup key of a normalised card identifier (``"em4100:…"``)."""
        return hmac.new(self._key, b"cred\x00" + card_id.encode("utf-8"),
                        hashlib.sha256).digest()

    def permit(self, permit_number: str) -> bytes:
        """The 32-byte lookup key of a permit number (all cards of one permit share it):
        HMAC-SHA256(key, ``"permit\\0"`` + the trimmed, upper-cased number)."""
        return hmac.new(self._key, b"permit\x00" + permit_number.strip().upper().encode(),
                        hashlib.sha256).digest()


def log_prefix(credential_hash: bytes) -> str:
    """The short prefix of a credential hash used in logs and events."""
    return credential_hash.hex()[:LOG_PREFIX_HEX]
