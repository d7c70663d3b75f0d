"""Envelopes: Ed25519 signatures over the protocol tag, the topic and the body.

Binding the topic means a message signed for one gateway cannot be replayed to another.
Snapshot chunks are the one unsigned message: each is verified by its SHA-256 listed in
the signed manifest.

Enrollment signatures go the other way: a gateway signs each enrollment it reports with
its own Ed25519 key (``gateway-signing.key``, recorded at the office by
``register-gateway``) over a tag, its gateway id, the enrollment id and the attachment's
exact bytes (``enrollment_signing_input``); docs/protocol.md, "Signing the enrollment".
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ValidationError

from protocol.ids import KeyId
from protocol.messages import RefusedError, _Body, first_error

SIGNING_TAG = b"permitgate-v1"


class Envelope(_Body):
    """A signed central message as it travels."""

    kid: KeyId
    sig: str
    body: str


def signing_input(topic: str, body: str) -> bytes:
    """The exact bytes an Ed25519 signature covers."""
    return SIGNING_TAG + b"\n" + topic.encode("utf-8") + b"\n" + body.encode("utf-8")


def sign(key: Ed25519PrivateKey, kid: str, topic: str, body: BaseModel) -> bytes:
    """The wire payload of ``body`` signed for ``topic``."""
    text = body.model_dump_json()
    sig = key.sign(signing_input(topic, text))
    return Envelope(kid=kid, sig=base64.b64encode(sig).decode(), body=text
                    ).model_dump_json().encode()


def open_envelope(payload: bytes, topic: str, keys: dict[str, Ed25519PublicKey],
                  max_bytes: int) -> str:
    """Check size, shape and signature; return the signed body text.

    Raises ``RefusedError`` with reason ``oversized``, ``malformed``, ``unknown_key`` or
    ``bad_signature``.
    """
    if len(payload) > max_bytes:
        raise RefusedError("oversized", f"{len(payload)} bytes > {max_bytes}")
    try:
        envelope = Envelope.model_validate_json(payload)
    except ValidationError as exc:
        raise RefusedError("malformed", first_error(exc)) from None
    key = keys.get(envelope.kid)
    if key is None:
        raise RefusedError("unknown_key", f"key id {envelope.kid!r} is not trusted")
    try:
        signature = base64.b64decode(envelope.sig, validate=True)
        key.verify(signature, signing_input(topic, envelope.body))
    except (InvalidSignature, binascii.Error, ValueError):
        raise RefusedError("bad_signature", f"signature by {envelope.kid!r} does not verify "
                           "for this topic and body") from None
    return envelope.body


ENROLLMENT_SIGNING_TAG = b"permitgate enrollment v1\0"
"""The first bytes of what an enrollment signature covers: a signature made for anything
else (an envelope, a renewal request) never verifies as an enrollment's."""
ENROLLMENT_SIGNATURE_FIELD = "signature"
"""The ``tenant_enrolled`` data field that carries the signature (absent when unsigned)."""
ENROLLMENT_SIGNATURE_CHARS = 88
"""Standard base64 of a 64-byte Ed25519 signature."""


def enrollment_signing_input(gateway: str, enrollment_id: str, attachment: str) -> bytes:
    """The exact bytes a gateway's enrollment signature covers: the tag, the gateway id, a
    NUL, the enrollment id, a NUL, then the attachment's UTF-8 bytes as sent. ValueError
    for an id holding a NUL (it would make the split ambiguous; protocol ids never do)."""
    if "\0" in gateway or "\0" in enrollment_id:
        raise ValueError("a gateway or enrollment id with a NUL character")
    return (ENROLLMENT_SIGNING_TAG + gateway.encode("utf-8") + b"\0"
            + enrollment_id.encode("utf-8") + b"\0" + attachment.encode("utf-8"))


def sign_enrollment(key: Ed25519PrivateKey, *, gateway: str, enrollment_id: str,
                    attachment: str) -> str:
    """The gateway's signature of one enrollment's attachment, in standard base64."""
    return b64(key.sign(enrollment_signing_input(gateway, enrollment_id, attachment)))


def verify_enrollment(key: Ed25519PublicKey, signature: str, *, gateway: str,
                      enrollment_id: str, attachment: str) -> bool:
    """Whether ``signature`` (standard base64) is ``key``'s signature of this attachment
    for this gateway and enrollment; False for anything else, malformed text included."""
    if len(signature) != ENROLLMENT_SIGNATURE_CHARS:
        return False
    try:
        key.verify(base64.b64decode(signature, validate=True),
                   enrollment_signing_input(gateway, enrollment_id, attachment))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def b64(data: bytes) -> str:
    """Standard base64 of a hash."""
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    """A 32-byte hash from standard base64; ``RefusedError('malformed')`` otherwise."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RefusedError("malformed", "hash is not base64") from None
    if len(data) != 32:
        raise RefusedError("malformed", f"hash has {len(data)} bytes, not 32")
    return data


def public_key_line(kid: str, key: Ed25519PublicKey) -> str:
    """One line of a trusted-keys file: ``<key id> <base64 raw public key>``."""
    return f"{kid} {b64(key.public_bytes_raw())}"


def load_trusted_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """Read trusted central keys: one ``<key id> <base64 raw Ed25519 public key>`` a line,
    ``#`` comments allowed. Raises ValueError naming the file and line."""
    keys: dict[str, Ed25519PublicKey] = {}
    for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<key id> <base64 public key>'")
        kid, raw = parts
        try:
            keys[kid] = Ed25519PublicKey.from_public_bytes(base64.b64decode(raw,
                                                                            validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{path}:{number}: key {kid!r} is not a base64 Ed25519 public "
                             f"key: {exc}") from None
    if not keys:
        raise ValueError(f"{path}: no trusted keys")
    return keys
