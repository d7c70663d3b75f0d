"""The office keys a gateway verifies with: ``trusted-keys.txt`` and the announced keys.

``trusted-keys.txt`` (read at start) is the root of trust of a fresh gateway. The office
adds and retires signing keys with a signed ``keys`` announcement (docs/protocol.md,
"keys"), which the gateway stores in its list database (``sync_state``, stream ``keys``:
the seq and, as its detail, the announced set) in one write. It verifies with:

- every key of ``trusted-keys.txt``, plus every announced key that is ``active``, or
  ``retiring`` before its ``not_after``;
- minus every key id announced ``retired``, or ``retiring`` once ``not_after`` has come,
  whether or not ``trusted-keys.txt`` lists it: a retirement, signed and newer than the
  file, wins over the file, and it is for good (a later announcement that lists the key
  id as active again, or leaves it out, does not bring it back).

Where the file and an announcement give one key id different public keys, the file's key
is used (and the disagreement logged): the technician who installed the file is the root
of trust. A message under a retired key is refused as ``unknown_key``, its detail saying
that the key was retired.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from protocol.messages import AnnouncedKey, KeyAnnouncement, RefusedError
from protocol.signing import Envelope, open_envelope

if TYPE_CHECKING:
    from agent.store import Store

log = structlog.get_logger()

KEYS_STREAM = "keys"
"""The stream (and ``sync_state`` row) of the office's key announcements."""


def public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from the standard base64 of its 32 raw bytes;
    ``RefusedError('malformed')`` otherwise."""
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise RefusedError("malformed", "an announced key is not an Ed25519 public key"
                           ) from None


def refused_at(key: AnnouncedKey, now: float) -> bool:
    """Whether ``key`` is no longer to be trusted at ``now``."""
    return key.state == "retired" or (key.not_after is not None and now >= key.not_after)


class Trust:
    """The keys that verify central messages, kept current by announcements."""

    def __init__(self, file_keys: Mapping[str, Ed25519PublicKey], store: Store) -> None:
        self.file_keys = dict(file_keys)
        self._store = store
        self._announced: dict[str, AnnouncedKey] = {}
        self._public: dict[str, Ed25519PublicKey] = {}
        self._seq = 0
        detail = store.stream_detail(KEYS_STREAM)
        try:
            stored = [AnnouncedKey.model_validate(k) for k in (detail or {}).get("keys", [])]
            self._set([k for k in stored if k.kid])
            self._seq = store.versions().get(KEYS_STREAM, 0)
        except (ValidationError, RefusedError, TypeError, AttributeError) as exc:
            # Written by this module, so only a damaged database gets here: the file's keys
            # still verify, and the office's next announcement replaces the set.
            log.error("announced_keys_unreadable", error=str(exc))

    def _set(self, keys: list[AnnouncedKey]) -> None:
        public = {k.kid: public_key(k.public_key) for k in keys}
        self._announced, self._public = {k.kid: k for k in keys}, public
        for kid, key in public.items():
            file_key = self.file_keys.get(kid)
            if file_key is not None and file_key.public_bytes_raw() != key.public_bytes_raw():
                log.warning("trusted_key_conflict", kid=kid,
                            detail="trusted-keys.txt and the office's announcement give "
                            "this key id different public keys; the file's is used")

    def verifying(self, now: float) -> dict[str, Ed25519PublicKey]:
        """The keys trusted at ``now``, by key id."""
        keys = dict(self.file_keys)
        for kid, key in self._announced.items():
            if refused_at(key, now):
                keys.pop(kid, None)
            elif kid not in keys:
                keys[kid] = self._public[kid]
        return keys

    def open(self, payload: bytes, topic: str, max_bytes: int, now: float) -> str:
        """``open_envelope`` with the keys trusted at ``now``; a retired key's message is
        refused as ``unknown_key`` saying so."""
        try:
            return open_envelope(payload, topic, self.verifying(now), max_bytes)
        except RefusedError as refused:
            if refused.reason != "unknown_key":
                raise
            kid = Envelope.model_validate_json(payload).kid
            key = self._announced.get(kid)
            if key is None:
                raise
            raise RefusedError("unknown_key", f"key id {kid!r} was retired (keys seq "
                               f"{self._seq})") from None

    def announce(self, message: KeyAnnouncement, now: float) -> dict[str, Any]:
        """Store an accepted announcement (its seq already checked) as the new set;
        returns a summary for its event. Retired key ids stay retired."""
        keys = {k.kid: k for k in message.keys}
        for kid, old in self._announced.items():
            new = keys.get(kid)
            if refused_at(old, now) and (new is None or not refused_at(new, now)):
                # A retirement is for good: a new key gets a new key id.
                log.warning("retired_key_kept_retired", kid=kid, seq=message.seq)
                keys[kid] = AnnouncedKey(kid=kid, public_key=old.public_key, state="retired")
        merged = list(keys.values())
        for key in merged:
            public_key(key.public_key)  # every key readable, before anything is stored
        self._store.set_stream(KEYS_STREAM, message.seq, {
            "keys": [k.model_dump() for k in merged], "issued_at": message.issued_at})
        self._set(merged)
        self._seq = message.seq
        summary: dict[str, Any] = {s: sorted(k.kid for k in merged if k.state == s)
                                   for s in ("active", "retiring", "retired")}
        return summary
