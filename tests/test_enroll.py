"""Enrollment at the gateway on a real store: provisional access, the office's answer,
move-out, lease end, captures, and what is kept (and not kept) of the permit number."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.decision import Direction, Policy, Reason, Request, decide
from agent.enroll import (
    Captures,
    CardStatus,
    Enroller,
    EnrollError,
    EnrollmentPolicy,
    card_status,
    end_of_day_s,
)
from agent.store import CredentialEntry, Store, lists_path
from agent.sync import fit_batch
from agent.tenants import TenantState
from protocol.chain import Event, contents_match
from protocol.hashing import CredentialHasher
from protocol.messages import EnrollmentAttachment, EventBatch
from protocol.sealing import unseal

KEY = bytes(range(32))
HASHER = CredentialHasher(KEY)
CARD = HASHER.credential("em4100:67003B51C6")
OTHER = HASHER.credential("em4100:0102030405")
PERMIT = "11010519491231002X"
ZONE = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 11, 30, 10, 0, tzinfo=ZONE)
TODAY = NOW.date()


class Clock:
    """A settable clock for the enroller (Unix seconds)."""

    def __init__(self) -> None:
        self.now = NOW.timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """The test's clock, at NOW."""
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    """A real store whose event times follow the test clock."""
    s = Store(tmp_path / "pg.db", clock_ms=lambda: int(clock.now * 1000))
    yield s
    s.close()


@pytest.fixture
def office() -> X25519PrivateKey:
    """The office's seal key pair."""
    return X25519PrivateKey.generate()


@pytest.fixture
def enroller(store: Store, office: X25519PrivateKey, clock: Clock) -> Enroller:
    """An enroller with units 101..103 and a 72-hour provisional window."""
    policy = EnrollmentPolicy(units=("101", "102", "103"), provisional_s=72 * 3600,
                              max_lease_days=3 * 365, gateway="gw-1")
    return Enroller(store, HASHER, policy, office.public_key(), clock=clock)


def opens(store: Store, cred: bytes, when: float) -> Reason:
    """The decision's reason for ``cred`` at the front door at Unix time ``when``."""
    request = Request("front", Direction.ENTRY, datetime.fromtimestamp(when, ZONE), "always")
    return decide(request, store.lookup(cred), Policy()).reason


def enroll(enroller: Enroller, cred: bytes = CARD, *, unit: str = "101",
           lease_days: int = 365) -> str:
    """Enroll ``cred`` with a valid form; returns the enrollment id."""
    lease_end = TODAY + timedelta(days=lease_days)
    return enroller.enroll(cred, unit=unit, permit=PERMIT, lease_end=lease_end, today=TODAY,
                           lease_end_s=end_of_day_s(lease_end, ZONE), account="landlord").id


def test_enrollment_grants_provisionally_until_the_window_ends(
        enroller: Enroller, store: Store, clock: Clock) -> None:
    """A new enrollment opens the door at once, and no longer once the provisional
    window passed without an answer from the office."""
    assert opens(store, CARD, clock.now) is Reason.UNKNOWN_CARD
    enroll(enroller)
    assert opens(store, CARD, clock.now) is Reason.GRANTED
    assert opens(store, CARD, clock.now + 72 * 3600 - 1) is Reason.GRANTED
    assert opens(store, CARD, clock.now + 72 * 3600) is Reason.EXPIRED


def test_event_attachment_holds_the_sealed_permit_and_leaves_on_ack(
        enroller: Enroller, store: Store, office: X25519PrivateKey) -> None:
    """The ``tenant_enrolled`` event carries the attachment's digest; the attachment holds
    the sealed permit (which the office opens) and the full card hash, and is deleted
    when the office acknowledges the event. No permit-derived value stays on disk."""
    enrollment_id = enroll(enroller)
    (event,) = store.events(kind="tenant_enrolled")
    attachment = store.attachments(event.seq, event.seq)[event.seq]
    assert event.data["attachment_sha256"] == hashlib.sha256(attachment.encode()).hexdigest()
    body = json.loads(attachment)
    assert unseal(office, body["permit_sealed"], gateway="gw-1",
                  enrollment_id=enrollment_id) == PERMIT
    store.mark_acked(event.seq)
    assert store.attachments(event.seq, event.seq) == {}
    store.checkpoint()
    for path in (store.path, lists_path(store.path)):
        with sqlite3.connect(path) as conn:
            dump = "\n".join(conn.iterdump())
        assert PERMIT not in dump and PERMIT[:17] not in dump
        assert body["permit_sealed"] not in dump


def test_confirmation_keeps_access_until_the_list_catches_up(
        enroller: Enroller, store: Store, clock: Clock) -> None:
    """A confirmed enrollment grants past the provisional window while the office's list
    is older than the version named in the answer; then the list alone decides."""
    enrollment_id = enroll(enroller)
    assert enroller.apply_decision(enrollment_id, confirmed=True, list_version=5,
                                   reason=None) is not None
    later = clock.now + 100 * 3600
    assert opens(store, CARD, later) is Reason.GRANTED
    store.replace_allowlist([CredentialEntry(OTHER)], 5)
    assert opens(store, CARD, later) is Reason.UNKNOWN_CARD
    store.replace_allowlist([CredentialEntry(CARD)], 6)
    assert opens(store, CARD, later) is Reason.GRANTED


def test_rejection_ends_access_at_once(enroller: Enroller, store: Store,
                                       clock: Clock) -> None:
    """The office's rejection ends provisional access at once and is recorded."""
    enrollment_id = enroll(enroller)
    enroller.apply_decision(enrollment_id, confirmed=False, list_version=None,
                            reason="permit_revoked")
    assert opens(store, CARD, clock.now) is Reason.UNKNOWN_CARD
    assert store.tenants.get(enrollment_id).state is TenantState.REJECTED  # type: ignore[union-attr]
    assert [e.reason for e in store.events(kind="tenant_rejected")] == ["permit_revoked"]


def test_snapshot_keeps_pending_enrollments(enroller: Enroller, store: Store,
                                            clock: Clock) -> None:
    """An office list that arrives while an enrollment is pending does not wipe it."""
    enroll(enroller)
    store.replace_allowlist([CredentialEntry(OTHER)], 9)
    assert opens(store, CARD, clock.now) is Reason.GRANTED


def test_move_out_revokes_even_what_the_office_lists(enroller: Enroller, store: Store,
                                                     clock: Clock) -> None:
    """Moving a tenant out ends access at once, even while the office's list still holds
    the card, and each tenant of a unit can be moved out together."""
    first = enroll(enroller)
    enroll(enroller, OTHER)
    store.replace_allowlist([CredentialEntry(CARD), CredentialEntry(OTHER)], 3)
    assert [e.id for e in enroller.move_out(account="landlord", enrollment_id=first)] == [first]
    assert opens(store, CARD, clock.now) is Reason.REVOKED
    assert opens(store, OTHER, clock.now) is Reason.GRANTED
    assert len(enroller.move_out(account="landlord", unit="101")) == 1
    assert opens(store, OTHER, clock.now) is Reason.REVOKED
    assert next(e.data["enrollment"] for e in store.events(kind="tenant_moved_out")) == first


def test_lease_end_ends_access_by_itself(enroller: Enroller, store: Store,
                                         clock: Clock) -> None:
    """A lease that ends stops access at the end of its last day (site time) and the
    housekeeping records it as ended."""
    enrollment_id = enroller.enroll(
        CARD, unit="102", permit=PERMIT, lease_end=TODAY + timedelta(days=1), today=TODAY,
        lease_end_s=end_of_day_s(TODAY + timedelta(days=1), ZONE), account=None).id
    end = end_of_day_s(TODAY + timedelta(days=1), ZONE)
    assert opens(store, CARD, end - 1) is Reason.GRANTED
    assert opens(store, CARD, end) is Reason.EXPIRED
    clock.now = end
    assert [e.id for e in enroller.expire_leases()] == [enrollment_id]
    assert store.tenants.get(enrollment_id).state is TenantState.ENDED  # type: ignore[union-attr]


@pytest.mark.parametrize(("field", "kwargs", "rule"), [
    ("unit", {"unit": "999"}, "unknown_unit"),
    ("permit", {"permit": "110105194912310021"}, "check_mismatch"),
    ("lease_end", {"lease_end": TODAY}, "lease_end_past"),
    ("lease_end", {"lease_end": TODAY + timedelta(days=5000)}, "lease_end_too_far"),
])
def test_bad_form_input_changes_nothing(enroller: Enroller, store: Store, field: str,
                                        kwargs: dict[str, object], rule: str) -> None:
    """A wrong unit, permit number or lease end is refused naming the field and rule,
    and nothing is stored or recorded."""
    form: dict[str, object] = {"unit": "101", "permit": PERMIT,
                               "lease_end": TODAY + timedelta(days=30)}
    form.update(kwargs)
    with pytest.raises(EnrollError) as caught:
        enroller.enroll(CARD, today=TODAY, lease_end_s=0, account=None,
                        **form)  # type: ignore[arg-type]
    assert (caught.value.field, caught.value.rule) == (field, rule)
    assert store.tenants.all() == [] and store.counts()["events"] == 0


def test_enrolled_and_revoked_cards_are_refused(enroller: Enroller, store: Store) -> None:
    """A card already enrolled, or revoked by the office, is said so and not enrolled."""
    enroll(enroller)
    assert card_status(store, CARD) is CardStatus.ENROLLED
    with pytest.raises(EnrollError) as caught:
        enroll(enroller)
    assert caught.value.rule == "card_enrolled"
    store.revoke([(OTHER, "credential")])
    assert card_status(store, OTHER) is CardStatus.REVOKED
    with pytest.raises(EnrollError) as caught:
        enroll(enroller, OTHER)
    assert caught.value.rule == "card_revoked"


def test_capture_takes_the_next_tap_at_its_reader_only() -> None:
    """A capture takes the next tap at its own reader within its time, not at another
    reader, not after its deadline, and one capture is used for one enrollment."""
    now = [100.0]
    captures = Captures(clock=lambda: now[0])
    capture = captures.start("front-in", 60, "landlord")
    assert captures.waiting("front-in") and not captures.waiting("back-in")
    assert captures.take("back-in", CARD, CardStatus.NEW) is None
    taken = captures.take("front-in", CARD, CardStatus.NEW)
    assert taken is capture and capture.done.is_set() and capture.prefix is not None
    assert not captures.waiting("front-in")
    assert captures.use(capture.id) is capture and captures.use(capture.id) is None
    late = captures.start("front-in", 60, None)
    now[0] += 61
    assert captures.take("front-in", CARD, CardStatus.NEW) is None
    assert captures.get(late.id) is None and late.done.is_set()


def test_a_version_1_list_database_upgrades(tmp_path: Path) -> None:
    """A list database of schema 1 (before enrollments) opens, gains the tenant tables and
    keeps its allowlist."""
    store = Store(tmp_path / "pg.db")
    store.replace_allowlist([CredentialEntry(CARD)], 4)
    store.close()
    with sqlite3.connect(lists_path(tmp_path / "pg.db")) as conn:
        conn.execute("DROP TABLE enrollments")
        conn.execute("DROP TABLE local_revocations")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    reopened = Store(tmp_path / "pg.db")
    try:
        assert reopened.lookup(CARD).grant is not None
        assert reopened.tenants.all() == []
    finally:
        reopened.close()


def test_event_batch_carries_the_attachment_with_its_event(enroller: Enroller,
                                                          store: Store) -> None:
    """The outbox batch sends the attachment beside its event (outside the event's hash)
    and none with other events; the office can check it against the digest."""
    store.append(Event("agent_started"))
    enroll(enroller)
    events = store.events()
    payload, count = fit_batch("gw-1", events, 1 << 20,
                               store.attachments(events[0].seq, events[-1].seq))
    batch = EventBatch.model_validate_json(payload)
    assert count == 2 and batch.events[0].attachment is None
    sent = batch.events[1]
    assert sent.attachment is not None and contents_match(sent)
    assert hashlib.sha256(sent.attachment.encode()).hexdigest() == \
        sent.data["attachment_sha256"]
    assert EnrollmentAttachment.model_validate_json(sent.attachment).cred
