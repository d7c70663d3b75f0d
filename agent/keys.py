"""Secrets and keyed hashing of card identifiers.

Card and permit numbers never reach the database, a log line or a payload in the clear:
card identifiers are replaced by HMAC-SHA256 under the site key, which the central office
shares so that it can compute the same hashes for the allowlists it sends. Permit hashes
come from the office only, made under its own permit key (one for every building, so one
broadcast revocation covers them all); the gateway never needs that key. ``permit`` below
serves the demo and tests, where the site key stands in for it (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SITE_KEY_BYTES = 32
LOG_PREFIX_HEX = 10
"""Hex digits of a credential hash shown in logs and events: 40 bits, enough to tell
cards apart in a building, too few to serve as a lookup key elsewhere."""


class SecretError(Exception):
    """A secret is missing, unreadable or malformed; the message names the file."""


def resolve_secret_path(name: str, base: Path | None = None,
                        config_dir: Path | None = None) -> Path:
    """Where the secret ``name`` lives.

    A bare file name is looked up in systemd's ``$CREDENTIALS_DIRECTORY`` first (set when
    the unit uses ``LoadCredential=``), then next to ``base`` (the store directory). A
    relative path with a folder in it is taken from ``config_dir`` (the configuration
    file's folder, as for the store path), an absolute path as it is.
    """
    path = Path(name)
    if path.is_absolute():
        return path
    if "/" in name:  # "./site.key" too: a path, not a bare credential name
        return (config_dir or Path.cwd()) / path
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / name).exists():
        return Path(creds) / name
    return (base or Path.cwd()) / name


def load_site_key(path: Path, *, generate_missing: bool = False) -> bytes:
    """Read the site key (32 raw bytes or 64 hex characters) from ``path``.

    With ``generate_missing`` a fresh random key is written (mode 0600) when the file does
    not exist: for the simulated defaults and the demo, never for a real site, whose key
    must match the central office's.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not generate_missing:
            raise SecretError(f"{path}: site key file not found (create it with "
                            "'permitgate keygen', or install the key from the central "
                            "office)") from None
        key = secrets.token_bytes(SITE_KEY_BYTES)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key.hex() + "\n")
        return key
    except OSError as exc:
        raise SecretError(f"{path}: cannot read site key: {exc.strerror}") from exc
    return parse_key(data, path)


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


class CredentialHasher:
    """Keyed hashing of card identifiers and permit numbers under the site key."""

    __slots__ = ("_key",)

    def __init__(self, site_key: bytes) -> None:
        if len(site_key) != SITE_KEY_BYTES:
            raise ValueError("site key must be 32 bytes")
        self._key = site_key

    def credential(self, card_id: str) -> bytes:
        """The 32-byte lookup key of a normalised card identifier (``"em4100:…"``)."""
        return hmac.new(self._key, b"cred\x00" + card_id.encode("utf-8"),
                        hashlib.sha256).digest()

    def permit(self, permit_number: str) -> bytes:
        """The 32-byte lookup key of a permit number (all cards of one permit share it)."""
        return hmac.new(self._key, b"permit\x00" + permit_number.strip().upper().encode(),
                        hashlib.sha256).digest()


def log_prefix(credential_hash: bytes) -> str:
    """The short prefix of a credential hash used in logs and events."""
    return credential_hash.hex()[:LOG_PREFIX_HEX]
