"""Gateways and enrollment: who is registered, and which cards each gateway admits.

Only keyed hashes are stored: a card as HMAC-SHA256 under its building's site key (so it
is checked by the gateway exactly as its reader reports it, ``protocol.ids``), a permit
under the office-wide permit key. Nothing here is sent; publishing does that.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from protocol import ids
from protocol.hashing import CredentialHasher
from protocol.messages import Entry, Revoked
from protocol.signing import b64
from provisioning.db import EntryRecord, GatewayRecord, OfficeDatabase, RevokedHash
from provisioning.errors import CentralUsageError
from provisioning.keys import OfficeKeys

T = TypeVar("T")

SITE_KEY_STATE = "site_key:{gateway}"
"""Database meta: the state of a gateway's latest site-key rotation (JSON,
provisioning.site_rotation)."""


class OnWorker(Protocol):
    """Runs database work where it must run (the serve worker, while one is active)."""

    def __call__(self, fn: Callable[[], T], /) -> T:
        """``fn()``, on the right thread."""
        ...


def normalise_card_id(text: str) -> str:
    """A card id as the gateway's reader reports it (``protocol.ids.normalise_card_id``);
    raises ``CentralUsageError`` naming ``--card``."""
    try:
        return ids.normalise_card_id(text)
    except ValueError as exc:
        raise CentralUsageError(f"--card: {exc}") from None


def check_ident(value: str, what: str) -> str:
    """``value`` if it is a protocol identifier (lower-case letters, digits, '_', '-')."""
    try:
        return ids.check_ident(value, what)
    except ValueError as exc:
        raise CentralUsageError(str(exc)) from None


def known_gateway(db: OfficeDatabase, gateway: str) -> GatewayRecord:
    """The registered gateway ``gateway``; ``CentralUsageError`` when there is none."""
    record = db.gateway(gateway)
    if record is None:
        raise CentralUsageError(f"gateway {gateway!r}: unknown (add it with "
                                "'permitgate-central add-gateway')")
    return record


def wire_entry(record: EntryRecord) -> Entry:
    """A stored entry as it travels."""
    return Entry(cred=b64(record.cred),
                 permit=None if record.permit is None else b64(record.permit),
                 valid_from=record.valid_from, valid_until=record.valid_until,
                 doors=record.doors, schedule=record.schedule,
                 confirmed_at=record.confirmed_at)


def wire_revoked(item: RevokedHash) -> Revoked:
    """A stored revocation as it travels."""
    kind, digest = item
    return Revoked(kind=cast(Any, kind), hash=b64(digest))


def _check_validity(valid_from: int | None, valid_until: int | None) -> None:
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise CentralUsageError("--until: must be after --from")


class Enrollment:
    """Registers gateways and keeps their enrolled cards."""

    def __init__(self, db: OfficeDatabase, keys: OfficeKeys, *, clock: Callable[[], float],
                 on_worker: OnWorker) -> None:
        self._db = db
        self._keys = keys
        self._clock = clock
        self._on_worker = on_worker

    def hasher(self, gateway: str) -> CredentialHasher:
        """The credential hasher of a registered gateway's building."""
        return self._keys.site_hasher(gateway, known_gateway(self._db, gateway).site_key_path)

    def credential(self, gateway: str, card_id: str) -> bytes:
        """The credential hash ``gateway`` knows ``card_id`` by (the id normalised)."""
        return self.hasher(gateway).credential(normalise_card_id(card_id))

    def credentials(self, gateway: str, card_id: str) -> list[bytes]:
        """The card's hash under the gateway's key and, during a site-key change-over
        (provisioning.site_rotation), under the previous key too."""
        card = normalise_card_id(card_id)
        hashes = [self.hasher(gateway).credential(card)]
        text = self._db.meta(SITE_KEY_STATE.format(gateway=gateway))
        state = json.loads(text) if text else {}
        if state.get("previous") == "honoured":
            previous = self._keys.site_hasher(gateway, str(state["previous_path"]))
            hashes.append(previous.credential(card))
        return hashes

    def add_gateway(self, gateway_id: str, site_id: str, site_key: bytes | Path, *,
                    events_from: int = 1) -> None:
        """Register a gateway.

        ``site_key`` is the path of the building's site-key file (kept there, read when
        needed), or the key itself, which is then written to ``site-keys/<gateway>.key``
        in the central folder (mode 0600). ``events_from`` is the first event seq the
        office expects (for a gateway whose older events were pruned before it was added).
        """
        check_ident(gateway_id, "gateway")
        check_ident(site_id, "--site")
        if events_from < 1:
            raise CentralUsageError("--events-from: must be at least 1")
        path = self._keys.site_key_file(gateway_id, site_key)

        def do() -> None:
            if not self._db.add_gateway(gateway_id, site_id, str(path), events_from - 1,
                                        int(self._clock() * 1000)):
                raise CentralUsageError(f"gateway {gateway_id!r}: exists already")
        self._on_worker(do)

    def gateways(self) -> list[str]:
        """Every registered gateway id."""
        return self._db.gateway_ids()

    def enroll(self, gateway: str, card_id: str, permit_number: str, *,
               valid_from: int | None = None, valid_until: int | None = None,
               doors: Sequence[str] | None = None, schedule: str | None = None) -> bytes:
        """Store (or replace) a card's entry for ``gateway``: hashes only. Returns the
        credential hash. Nothing is sent; ``publish_snapshot`` or ``publish_delta`` does."""
        card = normalise_card_id(card_id)
        if not permit_number.strip():
            raise CentralUsageError("--permit: empty permit number")
        _check_validity(valid_from, valid_until)
        door_list = None if doors is None else [check_ident(d, "--doors: door") for d in doors]
        if door_list is not None and not door_list:
            raise CentralUsageError("--doors: give at least one door (omit it for every door)")
        if schedule is not None:
            check_ident(schedule, "--schedule")
        cred = self.hasher(gateway).credential(card)
        permit = self._keys.permit_hash(permit_number)
        now = self._clock()
        entry = EntryRecord(cred, permit, valid_from, valid_until,
                            None if door_list is None else tuple(door_list), schedule,
                            int(now), int(now * 1000))
        self._on_worker(lambda: self._db.put_entries(gateway, [entry]))
        return cred

    def enroll_many(self, gateway: str, cards: Iterable[tuple[str, str]], *,
                    valid_from: int | None = None, valid_until: int | None = None
                    ) -> int:
        """Store (or replace) the entries of many ``(card id, permit number)`` pairs for
        ``gateway`` in one transaction (an import, a building's first enrollment): one
        commit instead of one per card. Every pair is checked before anything is
        written. Returns how many were stored."""
        _check_validity(valid_from, valid_until)
        hasher = self.hasher(gateway)
        permits = CredentialHasher(self._keys.permit_key())  # = keys.permit_hash, once
        now = self._clock()
        entries = []
        for card_id, permit_number in cards:
            if not permit_number.strip():
                raise CentralUsageError("--permit: empty permit number")
            entries.append(EntryRecord(
                hasher.credential(normalise_card_id(card_id)),
                permits.permit(permit_number), valid_from, valid_until,
                None, None, int(now), int(now * 1000)))
        self._on_worker(lambda: self._db.put_entries(gateway, entries))
        return len(entries)

    def remove(self, gateway: str, card_id: str) -> bytes:
        """Delete a card's entry for ``gateway`` (under either key during a site-key
        change-over); returns its credential hash."""
        hashes = self.credentials(gateway, card_id)

        def do() -> bytes:
            for cred in hashes:
                if self._db.delete_entry(gateway, cred):
                    return cred
            raise CentralUsageError(f"--card: not enrolled at gateway {gateway}")
        return self._on_worker(do)

    def entries(self, gateway: str) -> list[Entry]:
        """The stored allowlist of ``gateway`` as wire entries, by credential hash."""
        return [wire_entry(e) for e in self._db.entries(gateway)]

    def revocations(self, gateway: str) -> list[Revoked]:
        """What a snapshot for ``gateway`` revokes: its own and the global revocations."""
        return [wire_revoked(r) for r in self._db.revocations(gateway)]
