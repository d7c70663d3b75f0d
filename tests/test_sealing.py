"""Permit numbers sealed to the office open there, and only for their own enrollment."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.sealing import SealError, load_public_key, public_key_text, seal, unseal

NUMBER = "11010519491231002X"


def test_sealed_number_opens_with_the_office_key() -> None:
    """A sealed number opens with the office's private key for the same gateway and
    enrollment, and the sealed text does not contain the number."""
    office = X25519PrivateKey.generate()
    sealed = seal(office.public_key(), NUMBER, gateway="gw-1", enrollment_id="e1")
    assert NUMBER not in sealed
    assert unseal(office, sealed, gateway="gw-1", enrollment_id="e1") == NUMBER


def test_each_seal_is_fresh() -> None:
    """Two seals of the same number differ (an ephemeral key each), so equal numbers
    cannot be told apart on the wire."""
    office = X25519PrivateKey.generate().public_key()
    assert seal(office, NUMBER, gateway="g", enrollment_id="e") != seal(
        office, NUMBER, gateway="g", enrollment_id="e")


@pytest.mark.parametrize(("gateway", "enrollment", "other_key"), [
    ("gw-2", "e1", False),   # replayed into another gateway's enrollment
    ("gw-1", "e2", False),   # replayed into another enrollment
    ("gw-1", "e1", True),    # someone else's key
])
def test_seal_does_not_open_elsewhere(gateway: str, enrollment: str, other_key: bool) -> None:
    """A seal opens for its own gateway, enrollment and key only."""
    office = X25519PrivateKey.generate()
    sealed = seal(office.public_key(), NUMBER, gateway="gw-1", enrollment_id="e1")
    key = X25519PrivateKey.generate() if other_key else office
    with pytest.raises(SealError):
        unseal(key, sealed, gateway=gateway, enrollment_id=enrollment)


@pytest.mark.parametrize("sealed", ["", "!!!", "A" * 300, "QUJD"])
def test_malformed_seals_are_refused(sealed: str) -> None:
    """Empty, non-base64, oversized and truncated seals raise SealError, nothing else."""
    with pytest.raises(SealError):
        unseal(X25519PrivateKey.generate(), sealed, gateway="g", enrollment_id="e")


def test_public_key_file_round_trip(tmp_path: Path) -> None:
    """The seal public key file holds base64 of 32 bytes; a wrong file is named."""
    key = X25519PrivateKey.generate()
    path = tmp_path / "office-seal.pub"
    path.write_text(public_key_text(key.public_key()) + "\n")
    assert load_public_key(path).public_bytes_raw() == key.public_key().public_bytes_raw()
    path.write_text("nonsense\n")
    with pytest.raises(ValueError, match=r"office-seal\.pub: not an X25519 public key"):
        load_public_key(path)
