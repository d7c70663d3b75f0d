"""Secrets: where they are found, what a site key file may hold, keyed hashing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.keys import load_site_key, resolve_secret_path
from protocol.hashing import CredentialHasher, SecretError, log_prefix


def test_bare_name_prefers_the_systemd_credentials_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare name is taken from $CREDENTIALS_DIRECTORY when it holds that file, else
    from the store folder."""
    creds, store = tmp_path / "creds", tmp_path / "store"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert resolve_secret_path("site.key", store) == store / "site.key"
    (creds / "site.key").write_text("x")
    assert resolve_secret_path("site.key", store) == creds / "site.key"


@pytest.mark.parametrize(("name", "expected"), [
    ("./site.key", "config/site.key"),
    ("keys/site.key", "config/keys/site.key"),
    ("/etc/permitgate/site.key", "/etc/permitgate/site.key"),
])
def test_paths_are_taken_from_the_configuration_folder(tmp_path: Path, name: str,
                                                       expected: str) -> None:
    """A relative path with a folder in it (``./site.key`` included) is taken from the
    configuration file's folder; an absolute path as it is."""
    got = resolve_secret_path(name, tmp_path / "store", tmp_path / "config")
    assert got == (Path(expected) if expected.startswith("/") else tmp_path / expected)


def test_site_key_formats_and_errors(tmp_path: Path) -> None:
    """A site key is 64 hex characters or 32 raw bytes; anything else, or a missing file,
    is a SecretError naming the file."""
    key = bytes(range(32))
    (tmp_path / "hex").write_text(key.hex() + "\n")
    (tmp_path / "raw").write_bytes(key)
    (tmp_path / "short").write_text("abcd")
    assert load_site_key(tmp_path / "hex") == key
    assert load_site_key(tmp_path / "raw") == key
    with pytest.raises(SecretError, match="short"):
        load_site_key(tmp_path / "short")
    with pytest.raises(SecretError, match="not found"):
        load_site_key(tmp_path / "missing")


def test_generated_key_is_private_and_stable(tmp_path: Path) -> None:
    """With generate_missing a new key is written with mode 0600 and read back the same
    next time."""
    path = tmp_path / "gen" / "site.key"
    first = load_site_key(path, generate_missing=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_site_key(path, generate_missing=True) == first


def test_hashes_are_keyed_and_domain_separated() -> None:
    """The same text hashes differently under another key and as a permit instead of a
    card, and the log prefix is 10 hex digits of the hash."""
    a, b = CredentialHasher(bytes(32)), CredentialHasher(bytes(range(32)))
    card = "em4100:67003B51C6"
    assert a.credential(card) != b.credential(card)
    assert a.credential(card) != a.permit(card)
    assert len(a.credential(card)) == 32
    assert log_prefix(a.credential(card)) == a.credential(card).hex()[:10]
