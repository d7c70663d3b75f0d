"""The site keys a gateway hashes cards with, and their rotation (docs/protocol.md,
"site_key").

Generation 1 is the key file of the configuration (``keys.site_key``). The office rotates
it with a signed ``site_key`` message that carries the next generation sealed to this
gateway's own X25519 key (``keys.seal_key``, made by ``permitgate provision``). The message
is kept as it came, still sealed, in the list database (``sync_state``, stream ``site``)
and opened again at every start: the data folder never holds a site key in the clear, and
a copy of it is no use without the credentials folder.

During a change-over (``previous: honoured``) a card is looked up under the new key and
the previous one; one that matches only under the previous key is reported to the office
as a pair of hashes (``Rekey``), and the office moves its entry to the new hash. When the
office ends the change-over (``previous: dropped``) the previous key is forgotten.

``SiteKeys`` is itself a ``CredentialHasher``: whoever hashes with it (enrollment, the
card path, the demo) hashes under the current key, whatever rotations happen meanwhile.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.decision import Lookup
from protocol import bundles
from protocol.hashing import CredentialHasher, SecretError
from protocol.messages import MAX_REKEY_PAIRS, RefusedError, Rekey, SiteKey
from protocol.signing import b64

log = structlog.get_logger()

SITE_STREAM = "site"
"""The stream (and ``sync_state`` row) of the office's ``site_key`` messages."""


def fingerprint(key: bytes) -> str:
    """A short public name of a site key (16 hex digits of a keyed hash of a constant):
    tells keys apart in the stored state and in logs without revealing them."""
    return hmac.new(key, b"permitgate site key fingerprint", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys in force: the current one and, during a change-over, the one before."""

    generation: int
    current: CredentialHasher
    previous: CredentialHasher | None

    def match(self, card_id: str, cred: bytes, lookup: Callable[[bytes], Lookup]) -> Matched:
        """Look ``card_id`` up with ``lookup`` (``Store.lookup``) under every key in force;
        ``cred`` is its hash under the current key, already computed by the caller."""
        found = lookup(cred)
        if self.previous is None:
            return Matched(found, None)
        old = self.previous.credential(card_id)
        before = lookup(old)
        # Re-keyed when the office's list does not hold it under the current key yet:
        # revoked under the current key only (revoked during the change-over) still is.
        known_before = before.grant is not None or before.revoked
        return Matched(merge(found, before),
                       (old, cred) if known_before and found.grant is None else None)


@dataclass(frozen=True, slots=True)
class Matched:
    """A card looked up under every key in force."""

    lookup: Lookup
    rekey: tuple[bytes, bytes] | None
    """``(hash under the previous key, hash under the current one)`` when the card is
    known under the previous key and has no entry under the current one: what the office
    must re-key."""


def merge(current: Lookup, previous: Lookup) -> Lookup:
    """One card's lookups under the current and the previous key as one: granted if either
    grants, revoked if either is revoked, the later presence, the first error."""
    presences = [p for p in (current.presence, previous.presence) if p is not None]
    return Lookup(grant=current.grant or previous.grant,
                  revoked=current.revoked or previous.revoked,
                  presence=max(presences, key=lambda p: p.at) if presences else None,
                  error=current.error or previous.error)


@dataclass(frozen=True, slots=True)
class _Key:
    generation: int
    key: bytes = field(repr=False)
    sealed: str | None
    """As the office sent it; None for generation 1, the configured key file."""

    def stored(self) -> dict[str, Any]:
        return {"generation": self.generation, "sealed": self.sealed}


@dataclass(frozen=True, slots=True)
class Change:
    """A ``site_key`` message checked and opened, not yet in force (``SiteKeys.commit``)."""

    current: _Key
    previous: _Key | None
    base: str

    def detail(self) -> dict[str, Any]:
        """What the ``site`` stream stores: the sealed keys, never a key in the clear."""
        return {"base": self.base, "current": self.current.stored(),
                "previous": None if self.previous is None else self.previous.stored()}


class SiteKeys(CredentialHasher):
    """The key ring of one gateway, kept current by ``site_key`` messages."""

    def __init__(self, base_key: bytes, seal: X25519PrivateKey | None, gateway: str) -> None:
        super().__init__(base_key)
        self._base = _Key(1, base_key, None)
        self._base_fingerprint = fingerprint(base_key)
        self._seal = seal
        self._gateway = gateway
        self._current = self._base
        self._previous: _Key | None = None
        self.ring = KeyRing(1, CredentialHasher(base_key), None)

    # -- hashing under the current key (``CredentialHasher``) ----------------------------

    def credential(self, card_id: str) -> bytes:
        """The card's hash under the current key."""
        return self.ring.current.credential(card_id)

    def permit(self, permit_number: str) -> bytes:
        """A permit's hash under the current key (the demo's lists; the office's permit
        hashes use its own permit key)."""
        return self.ring.current.permit(permit_number)

    # -- the stored state -----------------------------------------------------------------

    def load(self, detail: Mapping[str, Any] | None) -> KeyRing:
        """Take the stored state (``sync_state`` detail of ``SITE_STREAM``); a state made
        for another configured key is set aside (the gateway was given a new key by hand).
        ``SecretError`` when a stored key cannot be opened: hashing under the wrong key
        would deny every rotated card without saying why."""
        if not detail:
            return self.ring
        if detail.get("base") != self._base_fingerprint:
            log.warning("site_key_state_set_aside", stored_for=detail.get("base"),
                        configured=self._base_fingerprint,
                        hint="keys.site_key is not the key the office rotated from; the "
                        "configured key alone is used")
            return self.ring
        try:
            current = self._stored_key(detail["current"])
            previous = (None if detail.get("previous") is None
                        else self._stored_key(detail["previous"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecretError(f"the stored site key state is damaged ({exc!r}); restore "
                              "the list database or re-provision the gateway") from None
        self._install(Change(current, previous, self._base_fingerprint))
        log.info("site_keys_loaded", generation=current.generation,
                 changeover=previous is not None)
        return self.ring

    def _stored_key(self, item: Mapping[str, Any]) -> _Key:
        generation, sealed = int(item["generation"]), item["sealed"]
        if sealed is None:
            if generation != 1:
                raise ValueError(f"generation {generation} without its sealed key")
            return self._base
        return _Key(generation, self._open(generation, str(sealed)), str(sealed))

    def _open(self, generation: int, sealed: str) -> bytes:
        if self._seal is None:
            raise SecretError(f"keys.seal_key: site key generation {generation} is kept "
                              "sealed to this gateway's seal key, which is not installed")
        try:
            return bundles.unseal_rotated_site_key(self._seal, sealed, gateway_id=self._gateway,
                                                   generation=generation)
        except bundles.BundleError as exc:
            raise SecretError(f"keys.seal_key: {exc}") from None

    def _install(self, change: Change) -> None:
        self._current, self._previous = change.current, change.previous
        self.ring = KeyRing(change.current.generation, CredentialHasher(change.current.key),
                            None if change.previous is None
                            else CredentialHasher(change.previous.key))

    # -- a ``site_key`` message -----------------------------------------------------------

    def check(self, message: SiteKey) -> Change:
        """Open ``message`` and check it against the ring (its seq already checked): the
        change to store and then ``commit``. ``RefusedError`` when it cannot be used: no
        seal key, a key that does not open, an older generation, a generation held under
        another key, an ended change-over reopened."""
        if self._seal is None:
            raise RefusedError("no_seal_key", "keys.seal_key is not installed: this gateway "
                               "cannot open a rotated site key (re-provision it)")
        try:
            key = bundles.unseal_rotated_site_key(self._seal, message.sealed,
                                                  gateway_id=self._gateway,
                                                  generation=message.generation)
        except bundles.BundleError as exc:
            raise RefusedError("malformed", str(exc)) from None
        held = self._current
        honoured = message.previous == "honoured"
        if message.generation < held.generation:
            raise RefusedError("rollback", f"site key generation {message.generation}, "
                               f"holding {held.generation}")
        if message.generation == held.generation:
            if not hmac.compare_digest(key, held.key):
                raise RefusedError("conflict", f"site key generation {held.generation} is "
                                   "held under another key")
            if honoured and self._previous is None:
                raise RefusedError("rollback", f"the change-over to generation "
                                   f"{held.generation} has ended")
            return Change(held, self._previous if honoured else None, self._base_fingerprint)
        # The key honoured meanwhile is the one this gateway's lists are hashed under now,
        # whichever generation came before on the office's side (a gateway that missed a
        # whole rotation still matches its own lists).
        return Change(_Key(message.generation, key, message.sealed),
                      held if honoured else None, self._base_fingerprint)

    def commit(self, change: Change) -> KeyRing:
        """Put a checked change in force, once its state is stored."""
        self._install(change)
        log.info("site_key_changed", generation=change.current.generation,
                 changeover=change.previous is not None)
        return self.ring


PENDING_PAIRS = 1024
"""Re-key pairs kept for the office while the link is down; beyond it a card's pair waits
for its next tap."""


class RekeyReports:
    """Pairs of hashes waiting to be reported (``Rekey``): added by the card path, taken by
    the sync worker. Not stored: a pair lost with a restart is found again at the card's
    next tap."""

    def __init__(self, gateway: str) -> None:
        self._gateway = gateway
        self._lock = threading.Lock()
        self._pairs: dict[bytes, tuple[int, bytes]] = {}

    def add(self, generation: int, old: bytes, new: bytes) -> None:
        """Keep ``(old, new)`` for the office (one per old hash; the newest wins)."""
        with self._lock:
            if len(self._pairs) < PENDING_PAIRS or old in self._pairs:
                self._pairs[old] = (generation, new)

    def take(self, ts_ms: int) -> Rekey | None:
        """The next message to send (up to ``MAX_REKEY_PAIRS`` pairs of one generation),
        or None."""
        with self._lock:
            if not self._pairs:
                return None
            generation = max(g for g, _n in self._pairs.values())
            olds = [o for o, (g, _n) in self._pairs.items() if g == generation]
            olds = olds[:MAX_REKEY_PAIRS]
            pairs = [(b64(o), b64(self._pairs.pop(o)[1])) for o in olds]
            for old, (g, _n) in list(self._pairs.items()):
                if g < generation:  # from a change-over that has ended
                    del self._pairs[old]
        return Rekey(type="rekey", gateway=self._gateway, generation=generation,
                     pairs=pairs, ts_ms=ts_ms)
