"""Permit numbers sealed to the office: HPKE (RFC 9180) base mode, single shot.

A landlord types a tenant's permit number at the gateway; the gateway keeps only its keyed
hash and sends the number itself sealed to the office's X25519 public key, so that neither
the broker, nor a later session of the page, nor anyone holding the gateway's disk can
read it. The suite is DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305 (KEM
0x0020, KDF 0x0001, AEAD 0x0003); the sealed text is ``enc`` (32 bytes) followed by the
ciphertext and its 16-byte tag, in standard base64. The HPKE ``info`` binds the seal to
its gateway and enrollment (``info_for``), so a sealed number cannot be replayed into
another enrollment. docs/protocol.md, "Enrollments", has a worked example.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
INFO_TAG = b"permitgate-v1 permit seal"
MAX_SEALED = 256
"""Base64 characters of the largest sealed permit number accepted (64 bytes of number)."""


class SealError(ValueError):
    """A sealed number does not open: a wrong key, another enrollment's seal, or edited."""


def info_for(gateway: str, enrollment_id: str) -> bytes:
    """The HPKE ``info`` of one enrollment's seal."""
    return INFO_TAG + b"\n" + gateway.encode() + b"\n" + enrollment_id.encode()


def seal(public_key: X25519PublicKey, number: str, *, gateway: str,
         enrollment_id: str) -> str:
    """``number`` sealed to ``public_key`` for this gateway and enrollment (base64)."""
    sealed = SUITE.encrypt(number.encode("utf-8"), public_key,
                           info=info_for(gateway, enrollment_id))
    return base64.b64encode(sealed).decode()


def unseal(private_key: X25519PrivateKey, sealed: str, *, gateway: str,
           enrollment_id: str) -> str:
    """The number inside ``sealed``; ``SealError`` if it does not open for this key,
    gateway and enrollment."""
    if len(sealed) > MAX_SEALED:
        raise SealError(f"sealed number of {len(sealed)} characters is too long")
    try:
        data = base64.b64decode(sealed, validate=True)
        return SUITE.decrypt(data, private_key,
                             info=info_for(gateway, enrollment_id)).decode("utf-8")
    except (binascii.Error, InvalidTag, ValueError, UnicodeDecodeError) as exc:
        raise SealError("the sealed permit number does not open with the office's key for "
                        "this gateway and enrollment") from exc


def public_key_text(key: X25519PublicKey) -> str:
    """A seal public key as its file holds it: base64 of the 32 raw bytes."""
    return base64.b64encode(key.public_bytes_raw()).decode()


def load_public_key(path: Path) -> X25519PublicKey:
    """The office's seal public key from its file; ValueError naming the file."""
    try:
        text = path.read_text("ascii").split("#", 1)[0].strip()
        return X25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (OSError, UnicodeDecodeError, binascii.Error, ValueError) as exc:
        raise ValueError(f"{path}: not an X25519 public key (base64 of 32 bytes): "
                         f"{exc}") from None
