"""Where the gateway's secrets live, and reading the site key.

The keyed hashing itself (``CredentialHasher``), the key format and ``SecretError`` are
the protocol's (``protocol.hashing``): the office hashes with the same construction.
Permit hashes come from the office only, made under its own permit key; the gateway
never needs that key. ``CredentialHasher.permit`` under the site key serves the demo and
tests (docs/security.md).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from protocol.hashing import SITE_KEY_BYTES, SecretError, parse_key


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
