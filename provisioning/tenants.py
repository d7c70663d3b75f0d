"""Tenants enrolled at gateways: the office's side (docs/protocol.md, "Enrollments").

A landlord enrolls a tenant at the gateway, which gives the card provisional access and
records a ``tenant_enrolled`` event. Its attachment (``EnrollmentAttachment``) carries
the card's full keyed hash and the permit number sealed to the office. Once such an
event is stored (``provisioning.receive``), this room:

1. checks the attachment against the event (its SHA-256 is the event's
   ``attachment_sha256``, the card hash's prefix is the event's ``cred``), checks the
   gateway's signature of it when the office recorded the gateway's signing key at
   ``register-gateway`` (``DIR/gateways/<gateway>.json``; gateways added with
   ``add-gateway`` have none, and their enrollments go unchecked as before), opens the seal
   with the HPKE info bound to this gateway and enrollment (``protocol.sealing``),
   validates the permit number again (``protocol.permits``), and looks the permit's hash
   and the card's up in the office's revocations; the first failure rejects the
   enrollment with its reason;
2. records, as a finding for the registry comparison and not as a rejection, other
   buildings whose list holds the same permit (``elsewhere``);
3. applies the office's policy (``auto``: confirm at once; ``hold``: wait for an officer's
   ``confirm`` or ``reject``). A confirmation puts the card in the gateway's list (every
   door, always, valid until the lease end) under a new list version sent as a delta, and
   then answers with a signed ``enrollment_decision`` naming that version; a rejection
   answers with its reason.

``tenant_moved_out`` and ``tenant_lease_ended`` end the enrollment; a confirmed one's
card leaves the list (a delta).

Each event is acted on once, in seq order: a per-gateway cursor (``tenant_upto``, the
last tenant event acted on) moves in the same transaction as the event's effect, and only
over events stored without holes (up to ``acked_upto``), so a resent batch changes
nothing and a move-out never overtakes its enrollment. A batch without tenant events
costs one indexed read and no write. Every number (list version, ``enr`` seq) is
committed before the message carrying it is published; what a crash left undone (a
received enrollment not yet decided, a decision not yet numbered) is done by
``catch_up`` when ``serve`` starts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.hashing import log_prefix
from protocol.ids import Hex64
from protocol.messages import Decided, EnrollmentAttachment
from protocol.permits import PermitError, validate_permit
from protocol.sealing import SealError, unseal
from protocol.signing import verify_enrollment
from provisioning.db import (
    EnrollmentRecord,
    EntryRecord,
    EventRecord,
    ListChange,
    OfficeDatabase,
    TenantEvent,
)
from provisioning.enrollment import known_gateway
from provisioning.errors import CentralUsageError
from provisioning.keys import OfficeKeys
from provisioning.publish import Publisher

log = structlog.get_logger()

POLICIES = ("auto", "hold")
POLICY_KEY = "enrollment_policy"
"""The key of the policy in the office's settings (``permitgate-central policy``)."""
DEFAULT_POLICY = "auto"
ENDED_REASONS = {"tenant_moved_out": "moved_out", "tenant_lease_ended": "lease_end"}
EVENTS_PER_PASS = 500
"""Tenant events read per query."""
MAX_DECISIONS = 1000
"""Items per ``enrollment_decision`` (the most the message allows)."""
MAX_CONFIRMATIONS = 1000
"""Cards per confirming delta: about 180 bytes an entry, far within the 4 MiB limit."""
REASON_RE = re.compile(r"^[a-z0-9_]{1,64}$")
ENROLLMENT_RE = re.compile(r"^[0-9a-f-]{36}$")
GATEWAY_RECORDS = "gateways"
"""The folder of the records ``register-gateway`` writes (``provisioning.register``,
``provisioning.renew.record_path``; not imported from there: they import this module)."""


def recorded_signing_key(folder: Path, gateway: str) -> Ed25519PublicKey | None:
    """The Ed25519 public key ``register-gateway`` recorded for ``gateway``; None when the
    office has no record of it (a gateway added with ``add-gateway``). A record that
    cannot be read or holds no usable key is the office's own trouble
    (``CentralUsageError``): the gateway's tenant events wait until it is mended, rather
    than be judged without the check."""
    path = folder / GATEWAY_RECORDS / f"{gateway}.json"
    try:
        record = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CentralUsageError(f"{path}: cannot read the gateway's record: {exc}") from None
    try:
        text = record["signing_key"]
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise CentralUsageError(f"{path}: the gateway's record has no usable signing_key "
                                "(base64 of a 32-byte Ed25519 public key)") from None


# -- the operations an officer runs (through a running serve, like publishing) ---------


@dataclass(frozen=True, slots=True)
class ConfirmEnrollment:
    """Confirm a received or held enrollment (or send a confirmed one's decision again)."""

    gateway: str
    enrollment: str


@dataclass(frozen=True, slots=True)
class RejectEnrollment:
    """Reject an enrollment (or send a rejected one's decision again); a confirmed one's
    card leaves the list."""

    gateway: str
    enrollment: str
    reason: str = "officer"


EnrollmentOp = ConfirmEnrollment | RejectEnrollment


# -- what the gateway's events carry (agent/enroll.py) ---------------------------------


class _EnrolledData(BaseModel):
    """The ``data`` of a ``tenant_enrolled`` event (fields added later are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    enrollment: Annotated[str, Field(pattern=ENROLLMENT_RE.pattern)]
    unit: Annotated[str, Field(min_length=1, max_length=32)]
    lease_end: int
    provisional_until: int
    account: Annotated[str, Field(max_length=128)] | None = None
    attachment_sha256: Hex64
    signature: str | None = None
    """The gateway's signature of the attachment (protocol.signing); absent from a gateway
    without a signing key, or older than signatures. Any text: one that is not a signature
    does not verify."""


@dataclass(frozen=True, slots=True)
class _Checked:
    """What checking one enrollment found."""

    status: str
    reason: str | None
    cred: bytes | None = None
    permit: str | None = None
    permit_hash: bytes | None = None
    elsewhere: tuple[str, ...] = ()


def _reject(reason: str, cred: bytes | None = None, permit: str | None = None,
            permit_hash: bytes | None = None) -> _Checked:
    return _Checked("rejected", reason, cred, permit, permit_hash)


def _enrollment_id(data: dict[str, Any]) -> str | None:
    value = data.get("enrollment")
    return value if isinstance(value, str) and ENROLLMENT_RE.match(value) else None


class Tenants:
    """Enrollments made at gateways: checked, decided, answered (on the serve worker, or
    a one-shot caller)."""

    def __init__(self, db: OfficeDatabase, keys: OfficeKeys, publisher: Publisher, *,
                 clock: Callable[[], float]) -> None:
        self._db = db
        self._keys = keys
        self._publisher = publisher
        self._clock = clock

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- the policy ----------------------------------------------------------------------

    def policy(self) -> str:
        """``auto`` or ``hold``; an unknown stored value counts as ``hold`` (the safe
        side: nobody is confirmed that an officer did not see)."""
        value = self._db.meta(POLICY_KEY) or DEFAULT_POLICY
        if value not in POLICIES:
            log.warning("enrollment_policy_unknown", value=value[:32], using="hold")
            return "hold"
        return value

    def set_policy(self, policy: str) -> None:
        """Set the office's policy; it applies to enrollments received from now on
        (held ones stay held)."""
        if policy not in POLICIES:
            raise CentralUsageError(f"policy {policy!r}: one of {', '.join(POLICIES)}")
        self._db.set_meta(POLICY_KEY, policy)

    # -- receiving -------------------------------------------------------------------------

    def catch_up(self) -> None:
        """Act on every gateway's stored tenant events not yet acted on, and finish what a
        stop left undone (``serve`` runs it once connected)."""
        for gateway in self._db.gateway_ids():
            self.process(gateway)

    def process(self, gateway: str) -> None:
        """Act on the gateway's tenant events stored since the last time, in seq order,
        then apply the policy to what was received and send the decisions due."""
        while True:
            due = self._db.tenant_events(gateway, EVENTS_PER_PASS)
            for item in due:
                if item.event.kind == "tenant_enrolled":
                    self._on_enrolled(gateway, item)
                else:
                    self._on_ended(gateway, item.event)
            if len(due) < EVENTS_PER_PASS:
                break
        self.settle(gateway)

    def _on_enrolled(self, gateway: str, item: TenantEvent) -> None:
        ev = item.event
        data = json.loads(ev.data)
        enrollment = _enrollment_id(data)
        if enrollment is None:
            # Without a usable id there is nobody to answer: noted, and passed over.
            log.warning("tenant_event_malformed", gateway=gateway, seq=ev.seq, kind=ev.kind)
            self._db.advance_tenant_cursor(gateway, ev.seq)
            return
        now_ms = self._now_ms()
        try:
            fields: _EnrolledData | None = _EnrolledData.model_validate(data)
        except ValidationError:
            fields = None
        checked = (_reject("event_malformed") if fields is None
                   else self._check(gateway, ev, fields, item.chain_problem))
        record = EnrollmentRecord(
            gateway=gateway, id=enrollment, seq=ev.seq,
            unit=None if fields is None else fields.unit, cred=checked.cred,
            permit=checked.permit, permit_hash=checked.permit_hash,
            lease_end=None if fields is None else fields.lease_end,
            provisional_until=None if fields is None else fields.provisional_until,
            account=None if fields is None else fields.account, received_ms=now_ms,
            status=checked.status, reason=checked.reason,
            decided_ms=now_ms if checked.status == "rejected" else None,
            elsewhere=checked.elsewhere)
        if not self._db.record_enrollment(record):
            log.warning("enrollment_duplicate", gateway=gateway, enrollment=enrollment,
                        seq=ev.seq, hint="this gateway reported the enrollment id before; "
                        "the first record stays")
            return
        cred = None if checked.cred is None else log_prefix(checked.cred)
        if checked.status == "rejected":
            log.warning("enrollment_rejected", gateway=gateway, enrollment=enrollment,
                        seq=ev.seq, reason=checked.reason, cred=cred)
        else:
            log.info("enrollment_received", gateway=gateway, enrollment=enrollment,
                     seq=ev.seq, cred=cred, status=checked.status, reason=checked.reason)
        if checked.elsewhere:
            log.warning("enrollment_permit_elsewhere", gateway=gateway, enrollment=enrollment,
                        elsewhere=list(checked.elsewhere))

    def _check(self, gateway: str, ev: EventRecord, fields: _EnrolledData,
               chain_problem: bool) -> _Checked:
        """Attachment, seal, permit, revocations: the first failure is the reason."""
        opened = self._open_attachment(gateway, ev, fields)
        if isinstance(opened, _Checked):
            return opened
        cred, number = opened
        now = self._clock()
        try:
            permit = validate_permit(number, today=date.fromtimestamp(now))
        except PermitError as exc:
            log.warning("enrollment_permit_invalid", gateway=gateway, seq=ev.seq,
                        enrollment=fields.enrollment, rule=exc.rule)
            return _reject("permit_invalid", cred)
        digest = self._keys.permit_hash(permit.number)
        if self._db.revoked(gateway, "permit", digest):
            return _reject("permit_revoked", cred, permit.number, digest)
        if self._db.revoked(gateway, "credential", cred):
            return _reject("card_revoked", cred, permit.number, digest)
        elsewhere = tuple(self._db.permit_elsewhere(gateway, digest, int(now)))
        # A chain problem at this very event (its contents, its link, another copy of
        # it) makes it the wrong thing to confirm unseen, whatever the policy.
        status, reason = ("held", "chain_problem") if chain_problem else ("received", None)
        return _Checked(status, reason, cred, permit.number, digest, elsewhere)

    def _open_attachment(self, gateway: str, ev: EventRecord, fields: _EnrolledData
                         ) -> tuple[bytes, str] | _Checked:
        """The card hash and the unsealed permit number, or the rejection."""
        attachment = ev.attachment
        if attachment is None or hashlib.sha256(
                attachment.encode()).hexdigest() != fields.attachment_sha256:
            log.warning("enrollment_attachment_mismatch", gateway=gateway, seq=ev.seq,
                        enrollment=fields.enrollment, missing=attachment is None)
            return _reject("attachment_mismatch")
        try:
            body = EnrollmentAttachment.model_validate_json(attachment)
        except ValidationError:
            return _reject("attachment_malformed")
        cred = base64.b64decode(body.cred, validate=True)  # 44 characters: 32 bytes
        if ev.cred != log_prefix(cred):
            log.warning("enrollment_attachment_mismatch", gateway=gateway, seq=ev.seq,
                        enrollment=fields.enrollment, card_prefix=ev.cred)
            return _reject("attachment_mismatch")
        unsigned = self._check_signature(gateway, ev, fields, attachment, cred)
        if unsigned is not None:
            return unsigned
        try:
            number = unseal(self._keys.seal_key(), body.permit_sealed, gateway=gateway,
                            enrollment_id=fields.enrollment)
        except SealError:
            return _reject("seal_invalid", cred)
        return cred, number

    def _check_signature(self, gateway: str, ev: EventRecord, fields: _EnrolledData,
                         attachment: str, cred: bytes) -> _Checked | None:
        """The rejection of an enrollment not signed by the gateway's recorded key (None:
        signed by it, or the office recorded no key for this gateway). The rejection keeps
        the card it names, for whoever looks into it."""
        key = recorded_signing_key(self._keys.folder, gateway)
        if key is None:
            return None
        if fields.signature is None:
            log.warning("enrollment_signature_missing", gateway=gateway, seq=ev.seq,
                        enrollment=fields.enrollment, hint="the office recorded this "
                        "gateway's signing key: its enrollments must be signed (is the "
                        "agent older, or without keys.signing_key?)")
            return _reject("signature_missing", cred)
        if not verify_enrollment(key, fields.signature, gateway=gateway,
                                 enrollment_id=fields.enrollment, attachment=attachment):
            log.warning("enrollment_signature_invalid", gateway=gateway, seq=ev.seq,
                        enrollment=fields.enrollment, hint="not signed by the key recorded "
                        "for this gateway at register-gateway, for this enrollment and "
                        "attachment")
            return _reject("signature_invalid", cred)
        return None

    def _on_ended(self, gateway: str, ev: EventRecord) -> None:
        enrollment = _enrollment_id(json.loads(ev.data))
        if enrollment is None:
            log.warning("tenant_event_malformed", gateway=gateway, seq=ev.seq, kind=ev.kind)
            self._db.advance_tenant_cursor(gateway, ev.seq)
            return
        known = self._db.enrollment(gateway, enrollment)
        reason = ENDED_REASONS[ev.kind]
        change = self._db.end_enrollment(gateway, enrollment, ev.seq, reason,
                                         self._now_ms())
        if change is not None:
            self._publisher.send_delta(gateway, change.version, change.upsert, change.remove,
                                       base=change.base)
        if known is None:
            log.warning("tenant_event_unknown_enrollment", gateway=gateway, seq=ev.seq,
                        kind=ev.kind, enrollment=enrollment)
        else:
            log.info("enrollment_ended", gateway=gateway, enrollment=enrollment,
                     reason=reason, was=known.status,
                     list_version=None if change is None else change.version)

    # -- deciding --------------------------------------------------------------------------

    def settle(self, gateway: str) -> None:
        """Apply the policy to the gateway's received enrollments, then send every
        decision due."""
        received = self._db.enrollments(gateway, "received")
        if received:
            if self.policy() == "hold":
                self._db.hold_enrollments(gateway, [r.id for r in received], "policy")
                log.info("enrollments_held", gateway=gateway, count=len(received))
            else:
                for start in range(0, len(received), MAX_CONFIRMATIONS):
                    self._confirm(gateway, received[start:start + MAX_CONFIRMATIONS])
        self._send_decisions(gateway)

    def _confirm(self, gateway: str, records: Sequence[EnrollmentRecord]) -> ListChange | None:
        """Put the cards in the list under one new version and send it as a delta."""
        now = self._clock()
        entries = {}
        for r in records:
            assert r.cred is not None and r.permit_hash is not None  # checked on receipt
            entries[r.id] = EntryRecord(cred=r.cred, permit=r.permit_hash, valid_from=None,
                                        valid_until=r.lease_end, doors=None, schedule=None,
                                        confirmed_at=int(now), updated_ms=int(now * 1000))
        change = self._db.confirm_enrollments(gateway, entries, int(now * 1000))
        if change is not None:
            self._publisher.send_delta(gateway, change.version, change.upsert, change.remove,
                                       base=change.base)
            log.info("enrollments_confirmed", gateway=gateway, count=len(change.enrollments),
                     list_version=change.version)
        return change

    def _send_decisions(self, gateway: str) -> int | None:
        """Number and send every decision due; the last ``enr`` seq used, if any."""
        last = None
        while (allocated := self._db.allocate_decisions(
                gateway, MAX_DECISIONS, self._now_ms())) is not None:
            last, records = allocated
            self._publisher.decisions(gateway, last, [Decided(
                enrollment=r.id, status=cast(Literal["confirmed", "rejected"], r.status),
                list_version=r.list_version if r.status == "confirmed" else None,
                reason=r.reason if r.status == "rejected" else None) for r in records])
        return last

    # -- an officer's operations -----------------------------------------------------------

    def check(self, op: EnrollmentOp) -> None:
        """Refuse an operation that cannot be performed (``CentralUsageError``), before it
        is handed to a running ``serve``."""
        self._decidable(op)

    def _decidable(self, op: EnrollmentOp) -> EnrollmentRecord:
        known_gateway(self._db, op.gateway)
        record = self._db.enrollment(op.gateway, op.enrollment)
        if record is None:
            raise CentralUsageError(f"enrollment {op.enrollment!r}: none received from "
                                    f"gateway {op.gateway}")
        if isinstance(op, ConfirmEnrollment):
            if record.status not in ("received", "held", "confirmed"):
                raise CentralUsageError(f"enrollment {op.enrollment}: {record.status} "
                                        f"({record.reason}); it cannot be confirmed")
        else:
            if not REASON_RE.match(op.reason):
                raise CentralUsageError(f"--reason {op.reason!r}: 1-64 lower-case letters, "
                                        "digits and '_'")
            if record.status == "ended":
                raise CentralUsageError(f"enrollment {op.enrollment}: ended "
                                        f"({record.reason}); there is nothing to reject")
        return record

    def perform(self, op: EnrollmentOp) -> dict[str, int]:
        """Confirm or reject; returns the ``enr`` seq that carried the decision and, when
        the list changed, the list version (``{"enr": …, "list": …}``)."""
        record = self._decidable(op)
        change: ListChange | None = None
        if isinstance(op, ConfirmEnrollment):
            if record.status == "confirmed":
                self._db.resend_decision(op.gateway, op.enrollment)
            else:
                change = self._confirm(op.gateway, [record])
                if change is None:
                    raise CentralUsageError(f"enrollment {op.enrollment}: changed meanwhile; "
                                            "look again")
        elif record.status == "rejected":
            self._db.resend_decision(op.gateway, op.enrollment)
        else:
            rejected = self._db.reject_enrollment(op.gateway, op.enrollment, op.reason,
                                                  self._now_ms())
            if rejected is None:
                raise CentralUsageError(f"enrollment {op.enrollment}: changed meanwhile; "
                                        "look again")
            change = rejected[1]
            if change is not None:
                self._publisher.send_delta(op.gateway, change.version, change.upsert,
                                           change.remove, base=change.base)
            log.info("enrollment_rejected", gateway=op.gateway, enrollment=op.enrollment,
                     reason=op.reason, by="officer")
        seq = self._send_decisions(op.gateway)
        assert seq is not None  # the decision was made due just above
        result = {"enr": seq}
        if change is not None:
            result["list"] = change.version
        return result
