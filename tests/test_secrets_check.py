"""Tests for :mod:`agent.secrets_check`: a secret file other users can reach is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.secrets_check import require_private
from protocol.hashing import SecretError


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A site key file (its content does not matter to the check)."""
    path = tmp_path / "site.key"
    path.write_text("00" * 32 + "\n")
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_passes(key_file: Path, mode: int) -> None:
    """A key only its owner can read (0600, 0400) passes."""
    key_file.chmod(mode)
    require_private(key_file)


@pytest.mark.parametrize(("mode", "words"), [
    (0o640, "can be read by its group (mode 0640)"),
    (0o604, "can be read by other users (mode 0604)"),
    (0o644, "can be read by its group and other users (mode 0644)"),
    (0o620, "can be written or run by its group (mode 0620)"),
    (0o601, "can be written or run by other users (mode 0601)"),
])
def test_key_reachable_by_others_is_refused_with_the_fix(key_file: Path, mode: int,
                                                         words: str) -> None:
    """A key with any group or other permission is a SecretError naming the file, its
    mode and the chmod that fixes it."""
    key_file.chmod(mode)
    with pytest.raises(SecretError) as info:
        require_private(key_file)
    message = str(info.value)
    assert message.startswith(f"{key_file}: the site key {words}")
    assert f"chmod 600 {key_file}" in message


def test_what_names_the_secret(key_file: Path) -> None:
    """``what`` names the kind of secret in the message."""
    key_file.chmod(0o644)
    with pytest.raises(SecretError, match="the TLS client key can be read"):
        require_private(key_file, what="TLS client key")


def test_symlink_is_judged_by_its_target(key_file: Path, tmp_path: Path) -> None:
    """A link to a private key passes and a link to a readable one is refused, whatever
    the link's own mode (always 0777)."""
    link = tmp_path / "link.key"
    link.symlink_to(key_file)
    key_file.chmod(0o600)
    require_private(link)
    key_file.chmod(0o644)
    with pytest.raises(SecretError):
        require_private(link)


def test_missing_file_is_left_to_the_loader(tmp_path: Path) -> None:
    """A key that does not exist passes this check: loading it says so in its own words
    (or generates it, for the demo)."""
    require_private(tmp_path / "absent.key")


def test_check_reads_no_content(key_file: Path) -> None:
    """The check looks at the mode only: a key that cannot be parsed still passes it."""
    key_file.write_bytes(b"not a key")
    key_file.chmod(0o600)
    require_private(key_file)
