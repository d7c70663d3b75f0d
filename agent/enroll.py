"""Enrolling tenants at the gateway: capture a card, check what the landlord typed, give
provisional access, and send the enrollment to the office through the acked outbox.

The flow (docs/landlord.md): a capture is started at one reader; the next tap there
within ``capture_timeout_s`` is captured instead of decided (``Captures``), and shown as
a short hash prefix with what the gateway knows of the card. ``Enroller.enroll`` then
validates the unit, the permit number and the lease end, seals the permit number to the
office (protocol.sealing), stores the pending enrollment and records a
``tenant_enrolled`` event whose attachment (the sealed number and the card's full keyed
hash) goes to the office with it and is deleted here when the office acknowledges it. A
gateway with its own signing key (``keys.signing_key``) signs the attachment for its id
and the enrollment's (protocol.signing.sign_enrollment), so the office can tell the
enrollment came from this gateway.
The gateway keeps no permit-derived value at all: a hash of an 18-digit ID number under a
key on the same disk could be reversed by trying every plausible number.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.store import Store
from agent.tenants import Enrollment, TenantState
from protocol.chain import Event
from protocol.hashing import CredentialHasher, log_prefix
from protocol.permits import PermitError, validate_permit
from protocol.sealing import seal
from protocol.signing import ENROLLMENT_SIGNATURE_FIELD, b64, sign_enrollment

MAX_UNIT_CHARS = 32


class CardStatus(StrEnum):
    """What the gateway knows of a captured card."""

    NEW = "new"
    ENROLLED = "enrolled"
    """A tenant holds it (pending or confirmed here)."""
    LISTED = "listed"
    """The office's list holds it (enrolled elsewhere or at the office)."""
    REVOKED = "revoked"


class EnrollError(ValueError):
    """An enrollment was refused; ``field`` names the input at fault, ``rule`` the rule
    (for a translated message), ``params`` its values."""

    def __init__(self, field: str, rule: str, message: str, **params: object) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule
        self.params = params


@dataclass(slots=True)
class Capture:
    """One capture at one reader: waiting for a tap, then holding the captured card."""

    id: str
    reader: str
    started: float
    deadline: float
    account: str | None
    cred: bytes | None = None
    status: CardStatus | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def prefix(self) -> str | None:
        """The captured card's hash prefix, as the page shows it."""
        return None if self.cred is None else log_prefix(self.cred)


class Captures:
    """Open captures, at most one per reader; the card path asks ``take`` first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._by_reader: dict[str, Capture] = {}
        self._by_id: dict[str, Capture] = {}
        self._clock = clock

    def start(self, reader: str, timeout_s: float, account: str | None) -> Capture:
        """Open a capture at ``reader`` (replacing an unfinished one there)."""
        now = self._clock()
        capture = Capture(secrets.token_hex(8), reader, now, now + timeout_s, account)
        with self._lock:
            self._expire(now)
            old = self._by_reader.get(reader)
            if old is not None and old.cred is None:
                self._by_id.pop(old.id, None)
                old.done.set()
            self._by_reader[reader] = capture
            self._by_id[capture.id] = capture
        return capture

    def waiting(self, reader: str) -> bool:
        """Whether a capture waits for a tap at ``reader`` (cheap: the card path's test)."""
        capture = self._by_reader.get(reader)
        return capture is not None and capture.cred is None and \
            self._clock() < capture.deadline

    def take(self, reader: str, cred: bytes, status: CardStatus) -> Capture | None:
        """Hand a tap at ``reader`` to its waiting capture; None when none waits."""
        with self._lock:
            capture = self._by_reader.get(reader)
            if capture is None or capture.cred is not None or \
                    self._clock() >= capture.deadline:
                return None
            capture.cred, capture.status = cred, status
            del self._by_reader[reader]
        capture.done.set()
        return capture

    def get(self, capture_id: str) -> Capture | None:
        """A capture by id (waiting, captured, or timed out) until it is used or expires."""
        with self._lock:
            self._expire(self._clock())
            return self._by_id.get(capture_id)

    def use(self, capture_id: str) -> Capture | None:
        """Remove a captured card for enrollment (one capture enrolls one tenant)."""
        with self._lock:
            capture = self._by_id.get(capture_id)
            if capture is None or capture.cred is None:
                return None
            del self._by_id[capture_id]
            return capture

    def _expire(self, now: float) -> None:
        # A captured card is kept for ten minutes for the form; a waiting capture ends at
        # its deadline.
        for cid, capture in list(self._by_id.items()):
            limit = capture.deadline if capture.cred is None else capture.deadline + 600
            if now >= limit:
                del self._by_id[cid]
                if self._by_reader.get(capture.reader) is capture:
                    del self._by_reader[capture.reader]
                capture.done.set()


def card_status(store: Store, cred: bytes) -> CardStatus:
    """What the gateway knows of a card."""
    lookup = store.lookup(cred)
    if lookup.revoked:
        return CardStatus.REVOKED
    if store.tenants.active_for(cred) is not None:
        return CardStatus.ENROLLED
    if lookup.grant is not None:
        return CardStatus.LISTED
    return CardStatus.NEW


@dataclass(frozen=True, slots=True)
class EnrollmentPolicy:
    """The settings an enrollment is checked against (``[enrollment]``)."""

    units: tuple[str, ...]
    provisional_s: int
    max_lease_days: int
    gateway: str


class Enroller:
    """Makes, ends and lists enrollments on one store."""

    def __init__(self, store: Store, hasher: CredentialHasher, policy: EnrollmentPolicy,
                 seal_key: X25519PublicKey | None, *,
                 signing_key: Ed25519PrivateKey | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.hasher = hasher
        self.policy = policy
        self.seal_key = seal_key
        self.signing_key = signing_key
        """This gateway's own key (``keys.signing_key``); None: enrollments go unsigned,
        which only an office without a recorded key for this gateway accepts."""
        self._clock = clock

    def check(self, *, unit: str, permit: str, lease_end: date, today: date) -> str:
        """Validate the form; returns the normalised permit number or raises
        ``EnrollError`` naming the field and rule."""
        if unit not in self.policy.units:
            raise EnrollError("unit", "unknown_unit", f"unit {unit[:MAX_UNIT_CHARS]!r} is not "
                              "in this building's unit list", unit=unit[:MAX_UNIT_CHARS])
        try:
            number = validate_permit(permit, today=today).number
        except PermitError as exc:
            raise EnrollError("permit", exc.rule, str(exc), **exc.params) from None
        if lease_end <= today:
            raise EnrollError("lease_end", "lease_end_past", f"the lease end {lease_end} is "
                              "not after today", lease_end=lease_end.isoformat())
        if lease_end > today + timedelta(days=self.policy.max_lease_days):
            raise EnrollError("lease_end", "lease_end_too_far", f"the lease end {lease_end} "
                              f"is more than {self.policy.max_lease_days} days away",
                              max_days=self.policy.max_lease_days)
        return number

    def enroll(self, cred: bytes, *, unit: str, permit: str, lease_end: date, today: date,
               lease_end_s: int, account: str | None) -> Enrollment:
        """Enroll the tenant of ``cred``: provisional access at once, the enrollment on
        its way to the office. ``lease_end_s`` is the lease end as Unix seconds (the end
        of that day in the site's time zone)."""
        number = self.check(unit=unit, permit=permit, lease_end=lease_end, today=today)
        if self.seal_key is None:
            raise EnrollError("permit", "no_seal_key", "the office's seal key is not installed "
                              "([enrollment] seal_key): permit numbers cannot be sent")
        status = card_status(self.store, cred)
        if status is CardStatus.REVOKED:
            raise EnrollError("card", "card_revoked", "this card is revoked: the office must "
                              "lift the revocation first")
        if status is CardStatus.ENROLLED:
            raise EnrollError("card", "card_enrolled", "this card already belongs to an "
                              "enrolled tenant: move that tenant out first")
        now = self._clock()
        now_ms = int(now * 1000)
        enrollment = Enrollment(
            id=str(uuid.uuid4()), cred=cred, unit=unit, lease_end=lease_end_s,
            provisional_until=min(int(now) + self.policy.provisional_s, lease_end_s),
            state=TenantState.PENDING, list_version=None, reason=None, account=account,
            created_ms=now_ms, updated_ms=now_ms)
        attachment = json.dumps({
            "cred": b64(cred),
            "permit_sealed": seal(self.seal_key, number, gateway=self.policy.gateway,
                                  enrollment_id=enrollment.id)},
            sort_keys=True, separators=(",", ":"))
        data: dict[str, object] = {
            "enrollment": enrollment.id, "unit": unit, "lease_end": lease_end_s,
            "provisional_until": enrollment.provisional_until, "account": account,
            "attachment_sha256": hashlib.sha256(attachment.encode()).hexdigest()}
        if self.signing_key is not None:
            # In the data, not the attachment: see protocol.messages.EnrollmentAttachment.
            # Absent (not null) when unsigned, as from a gateway older than signatures.
            data[ENROLLMENT_SIGNATURE_FIELD] = sign_enrollment(
                self.signing_key, gateway=self.policy.gateway, enrollment_id=enrollment.id,
                attachment=attachment)
        self.store.tenants.add(enrollment)
        self.store.append(Event("tenant_enrolled", cred=log_prefix(cred), data=data),
                          attachment=attachment)
        return enrollment

    def move_out(self, *, account: str | None, enrollment_id: str | None = None,
                 unit: str | None = None) -> list[Enrollment]:
        """End access of one tenant or every tenant of a unit at once; each is recorded
        (``tenant_moved_out``) and so reported to the office."""
        ended = self.store.tenants.end(now_ms=int(self._clock() * 1000), reason="moved_out",
                                       enrollment_id=enrollment_id, unit=unit)
        for e in ended:
            self.store.append(Event("tenant_moved_out", cred=log_prefix(e.cred), data={
                "enrollment": e.id, "unit": e.unit, "account": account}))
        return ended

    def expire_leases(self) -> list[Enrollment]:
        """Record the leases that ended (their access already stopped at the lease end)."""
        now = self._clock()
        ended = self.store.tenants.expire(now_s=int(now), now_ms=int(now * 1000))
        for e in ended:
            self.store.append(Event("tenant_lease_ended", cred=log_prefix(e.cred), data={
                "enrollment": e.id, "unit": e.unit}))
        return ended

    def apply_decision(self, enrollment_id: str, *, confirmed: bool,
                       list_version: int | None, reason: str | None) -> Enrollment | None:
        """The office's answer: a confirmation keeps access (up to the lease end), a
        rejection ends it at once. Recorded as ``tenant_confirmed`` / ``tenant_rejected``."""
        state = TenantState.CONFIRMED if confirmed else TenantState.REJECTED
        decided = self.store.tenants.decide(enrollment_id, state,
                                            now_ms=int(self._clock() * 1000),
                                            list_version=list_version, reason=reason)
        if decided is not None:
            self.store.append(Event(f"tenant_{state.value}", cred=log_prefix(decided.cred),
                                    reason=reason, data={"enrollment": enrollment_id,
                                                         "unit": decided.unit}))
        return decided


def end_of_day_s(day: date, zone: tzinfo) -> int:
    """Unix seconds of the end of ``day`` (exclusive: the next midnight) in ``zone``."""
    return int(datetime.combine(day + timedelta(days=1), datetime.min.time(), zone
                                ).timestamp())
