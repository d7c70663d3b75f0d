"""Enrollments made at gateways, at the office (provisioning/tenants.py) against a real
Mosquitto.

The gateway is the agent's own code without its MQTT worker: a real store with a real
``Enroller`` (agent/enroll.py) makes the ``tenant_enrolled`` events and their sealed
attachments, its outbox is sent as the sync worker sends it (``agent.sync.fit_batch``),
and what the office publishes back is verified and applied by the gateway's real
``Applier`` (agent/sync_apply.py). The office is ``Central.run`` in a thread, or
``permitgate-central`` as a separate process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from structlog.testing import capture_logs

from agent.config import SyncConfig
from agent.enroll import Enroller, EnrollmentPolicy, end_of_day_s
from agent.store import Store
from agent.sync import fit_batch
from agent.sync_apply import Applier
from agent.tenants import TenantState
from common.sqlite import SqliteFile
from protocol.chain import Event, contents_match
from protocol.hashing import CredentialHasher, log_prefix
from protocol.messages import (
    CentralBody,
    Decided,
    Delta,
    EnrollmentAttachment,
    EnrollmentDecision,
    EventAck,
    EventBatch,
    Revocation,
    parse_central,
)
from protocol.sealing import info_for, load_public_key, seal, unseal
from protocol.signing import b64, load_trusted_keys, open_envelope
from protocol.topics import Topics
from provisioning.central import (
    PERMIT_KEY_NAME,
    SEAL_KEY_NAME,
    SEAL_PUBLIC_NAME,
    TRUSTED_KEYS_NAME,
    Central,
    CentralUsageError,
    keygen,
    permit_hash,
)
from provisioning.db.sqlite import SqliteOfficeDatabase
from provisioning.db.sqlite_schema import MIGRATIONS
from provisioning.keys import OfficeKeys
from tests.broker import Broker
from tests.test_central import GatewayPeer, Serving, run_cli
from tests.test_sync_apply import Host, Sent

if TYPE_CHECKING:
    from tests.pg import OfficeDb

pytest_plugins = ("tests.pg",)  # office_db: the office runs on SQLite and on PostgreSQL

REPO = Path(__file__).resolve().parent.parent
GW = "gw1"
SITE_KEY = bytes(range(32))
HASHER = CredentialHasher(SITE_KEY)
CARD = HASHER.credential("em4100:67003B51C6")
CARD_2 = HASHER.credential("em4100:67003BA86C")
PERMIT = "11010519491231002X"
PERMIT_2 = "110105198001011238"
MAX_BYTES = 4 * 1024 * 1024


# -- the office -------------------------------------------------------------------------


class OfficeRig:
    """A central folder made by ``keygen`` with gateways gw1 (site key 0..31) and gw2, and
    the broker it talks to; ``serve`` runs ``Central.run`` in a thread."""

    def __init__(self, folder: Path, broker: Broker, db: OfficeDb | None = None) -> None:
        self.folder = folder
        self.broker = broker
        keygen(folder)
        if db is not None:
            db.use(folder)
        with self.central() as central:
            central.add_gateway(GW, "site-1", SITE_KEY)
            central.add_gateway("gw2", "site-2", os.urandom(32))
        self.keys = load_trusted_keys(folder / TRUSTED_KEYS_NAME)
        self.seal_public = load_public_key(folder / SEAL_PUBLIC_NAME)
        self._loops: list[Serving] = []

    def central(self) -> Central:
        """A new ``Central`` on this folder and broker."""
        return Central(self.folder, self.broker.host, self.broker.port)

    def serve(self) -> Central:
        """``Central.run`` in a thread, subscribed; stopped at teardown."""
        loop = Serving(self.central())
        self._loops.append(loop)
        return loop.central

    def stop(self) -> None:
        """Stop every serving loop started."""
        while self._loops:
            self._loops.pop().stop()

    def cli(self, *args: str, check: int | None = 0) -> str:
        """``permitgate-central --dir FOLDER ARGS`` as its own process; its stdout (or,
        with a non-zero ``check``, its stderr)."""
        done = run_cli("--dir", str(self.folder), "--host", self.broker.host, "--port",
                       str(self.broker.port), *args, check=check)
        return done.stdout if not check else done.stderr

    def permit(self, number: str) -> bytes:
        """The permit hash under the office permit key."""
        return permit_hash(bytes.fromhex((self.folder / PERMIT_KEY_NAME).read_text()),
                           number)


@pytest.fixture
def office(tmp_path: Path, broker: Broker, office_db: OfficeDb) -> Iterator[OfficeRig]:
    """A central folder with its keys and two gateways, on each database; serving loops
    stopped at teardown."""
    rig = OfficeRig(tmp_path / "central", broker, office_db)
    yield rig
    rig.stop()


# -- the gateway ------------------------------------------------------------------------


class GatewayHost(Host):
    """The agent as the applier sees it (tests/test_sync_apply.py), answering enrollment
    decisions with the real enroller, as agent/runtime_control.py does."""

    enroller: Enroller | None = None

    def enrollment_decided(self, decided: Decided) -> None:
        """Apply the office's answer to the enrollment."""
        super().enrollment_decided(decided)
        assert self.enroller is not None
        self.enroller.apply_decision(decided.enrollment,
                                     confirmed=decided.status == "confirmed",
                                     list_version=decided.list_version,
                                     reason=decided.reason)


class GatewayRig:
    """Gateway gw1: a real store and enroller, its outbox sent as the sync worker sends
    it, and the office's messages verified and applied by the real applier."""

    def __init__(self, folder: Path, office: OfficeRig) -> None:
        self.office = office
        self.store = Store(folder / "pg.db")
        self.host = GatewayHost(self.store)
        self.enroller = Enroller(
            self.store, HASHER, EnrollmentPolicy(units=("101", "102", "103"),
                                                 provisional_s=72 * 3600,
                                                 max_lease_days=3660, gateway=GW),
            office.seal_public)
        self.host.enroller = self.enroller
        self.applier = Applier(self.store, self.host, office.keys, gateway=GW,
                               config=SyncConfig(), outbound=Sent())
        self.peer = GatewayPeer(office.broker, GW)
        self.topics = Topics(GW)

    def close(self) -> None:
        """Disconnect, close the store."""
        self.peer.close()
        self.store.close()

    def enroll(self, cred: bytes = CARD, *, unit: str = "101", permit: str = PERMIT,
               lease_days: int = 365) -> str:
        """Enroll a tenant as the landlord page does; returns the enrollment id."""
        today = date.today()
        lease_end = today + timedelta(days=lease_days)
        return self.enroller.enroll(cred, unit=unit, permit=permit, lease_end=lease_end,
                                    today=today, lease_end_s=end_of_day_s(lease_end, UTC),
                                    account="landlord").id

    def append_enrolled(self, enrollment_id: str, attachment: dict[str, str],
                        cred: bytes = CARD) -> None:
        """A ``tenant_enrolled`` event with this attachment, made as agent/enroll.py
        makes one (for attachments the real enroller would not make)."""
        text = json.dumps(attachment, sort_keys=True, separators=(",", ":"))
        lease_end = int(time.time()) + 86_400 * 365
        self.store.append(Event("tenant_enrolled", cred=log_prefix(cred), data={
            "enrollment": enrollment_id, "unit": "101", "lease_end": lease_end,
            "provisional_until": int(time.time()) + 3600, "account": "landlord",
            "attachment_sha256": hashlib.sha256(text.encode()).hexdigest()}),
            attachment=text)

    def batch(self, first: int | None = None, *,
              attachments: dict[int, str] | None = None) -> bytes:
        """The ``events`` payload of the events from ``first`` (default: the oldest
        unacknowledged) on, with their attachments (or ``attachments`` instead), as the
        sync worker builds it."""
        start = self.store.first_unacked() if first is None else first
        assert start is not None
        events = self.store.events(after_seq=start - 1, limit=500)
        held = self.store.attachments(events[0].seq, events[-1].seq)
        payload, count = fit_batch(GW, events, MAX_BYTES,
                                   held if attachments is None else attachments)
        assert count == len(events)
        return payload.encode()

    def send(self, payload: bytes) -> None:
        """Publish an ``events`` payload on this gateway's topic."""
        self.peer.send_raw(self.topics.outbound("events"), payload)

    def receive(self) -> CentralBody:
        """The next office message: verified, parsed, and applied by the applier."""
        topic, payload = self.peer.next()
        message = parse_central(open_envelope(payload, topic, self.office.keys, MAX_BYTES))
        self.applier.handle(topic, payload)
        return message

    def receive_until_ack(self) -> list[CentralBody]:
        """Every office message up to and including the next event ack (the office acts
        on a batch's tenant events before it acks the batch)."""
        messages = [self.receive()]
        while not isinstance(messages[-1], EventAck):
            messages.append(self.receive())
        return messages


@pytest.fixture
def gateway(tmp_path: Path, office: OfficeRig) -> Iterator[GatewayRig]:
    """Gateway gw1 on a real store, subscribed to its topics."""
    rig = GatewayRig(tmp_path / "gw", office)
    yield rig
    rig.close()


def decided(messages: list[CentralBody]) -> list[Decided]:
    """The decision items among ``messages``."""
    return [item for m in messages if isinstance(m, EnrollmentDecision) for item in m.items]


def kinds(messages: list[CentralBody]) -> list[str]:
    """The types of ``messages``, in order."""
    return [m.type for m in messages]


def delta_version(messages: list[CentralBody]) -> int:
    """The list version of the one delta among ``messages``."""
    (delta,) = [m for m in messages if isinstance(m, Delta)]
    return delta.seq


CONFIRMED_OUT = re.compile(r"confirmed enrollment (\S+) at (\S+) \(list version (\d+), "
                           r"decision enr seq (\d+)\)")
"""What ``permitgate-central confirm`` prints."""


# -- keys -------------------------------------------------------------------------------


def test_keygen_makes_the_seal_key_pair_once(tmp_path: Path) -> None:
    """keygen writes seal.key (0600) and office-seal.pub (base64 of the raw public key, as
    a gateway loads it) once; a later keygen keeps both, and on a folder made before the
    seal key existed it adds only the pair."""
    folder = tmp_path / "c"
    first = keygen(folder)
    assert first.seal_key_created and first.signing_key_created
    assert stat.S_IMODE((folder / SEAL_KEY_NAME).stat().st_mode) == 0o600
    public = load_public_key(folder / SEAL_PUBLIC_NAME)
    private = OfficeKeys(folder).seal_key()
    assert public.public_bytes_raw() == private.public_key().public_bytes_raw()
    assert len(base64.b64decode((folder / SEAL_PUBLIC_NAME).read_text().strip())) == 32
    second = keygen(folder, "central-2")
    assert not second.seal_key_created
    assert load_public_key(folder / SEAL_PUBLIC_NAME).public_bytes_raw() == \
        public.public_bytes_raw()
    with pytest.raises(CentralUsageError, match="listed already"):
        keygen(folder)
    (folder / SEAL_KEY_NAME).unlink()
    (folder / SEAL_PUBLIC_NAME).unlink()
    upgraded = keygen(folder)
    assert upgraded.seal_key_created and not upgraded.signing_key_created
    assert list(load_trusted_keys(folder / TRUSTED_KEYS_NAME)) == ["central-1", "central-2"]


def test_cli_keygen_says_where_office_seal_pub_goes(tmp_path: Path) -> None:
    """The keygen command names office-seal.pub and where a gateway installs it."""
    out = run_cli("keygen", str(tmp_path / "c")).stdout
    assert f"{SEAL_PUBLIC_NAME}" in out and "[enrollment] seal_key" in out


# -- receiving and deciding ---------------------------------------------------------------


def test_auto_policy_lists_the_card_and_the_gateway_confirms(
        office: OfficeRig, gateway: GatewayRig) -> None:
    """Under the default policy an enrollment that checks out is put in the gateway's
    list (a delta on version 0) and confirmed with a signed decision naming the delta's
    version, before the ack; the real gateway applies both, and the office holds the
    permit."""
    central = office.serve()
    enrollment = gateway.enroll()
    gateway.send(gateway.batch())
    messages = gateway.receive_until_ack()
    assert kinds(messages) == ["delta", "enrollment_decision", "event_ack"]
    delta, decision, _ = messages
    assert isinstance(delta, Delta) and delta.base == 0
    version = delta.seq
    (entry,) = delta.upsert
    record = gateway.store.tenants.get(enrollment)
    assert record is not None
    assert (entry.cred, entry.permit, entry.valid_from, entry.valid_until, entry.doors,
            entry.schedule) == (b64(CARD), b64(office.permit(PERMIT)), None,
                                record.lease_end, None, None)
    assert entry.confirmed_at is not None
    assert isinstance(decision, EnrollmentDecision)
    assert decision.items == [Decided(enrollment=enrollment, status="confirmed",
                                      list_version=version)]
    assert (record.state, record.list_version) == (TenantState.CONFIRMED, version)
    assert gateway.store.lookup(CARD).grant is not None  # from the office's list now
    assert gateway.store.attachments(1, 1) == {}  # acknowledged: gone from the gateway
    assert [e.cred for e in central.entries(GW)] == [b64(CARD)]
    (held,) = central.enrollments(GW, reveal=True)
    assert {k: held[k] for k in ("enrollment", "unit", "cred", "permit", "status",
                                 "list_version", "decision_seq", "elsewhere")} == {
        "enrollment": enrollment, "unit": "101", "cred": log_prefix(CARD),
        "permit": PERMIT, "status": "confirmed", "list_version": version,
        "decision_seq": decision.seq, "elsewhere": []}
    assert central.enrollments(GW)[0]["permit"] is None  # only shown when asked
    report = central.gateway_report(GW)
    assert report["streams"]["enr"] == decision.seq
    assert report["enrollments"] == {"confirmed": 1}


def test_hold_policy_waits_for_an_officer_whose_cli_goes_through_serve(
        office: OfficeRig, gateway: GatewayRig) -> None:
    """Under ``policy enrollments hold`` nothing is sent but the ack; ``enrollments
    --status held`` lists them, and ``confirm`` and ``reject`` run as separate processes
    through the running serve: a delta and a confirmation, then a rejection."""
    assert "hold (was auto)" in office.cli("policy", "enrollments", "hold")
    assert office.cli("policy", "enrollments").strip() == "enrollments: hold"
    central = office.serve()
    first = gateway.enroll(CARD)
    second = gateway.enroll(CARD_2, unit="102", permit=PERMIT_2)
    gateway.send(gateway.batch())
    assert kinds(gateway.receive_until_ack()) == ["event_ack"]
    assert gateway.peer.inbox.empty()
    listed = office.cli("enrollments", "--status", "held").splitlines()
    assert [line.split()[1] for line in listed] == [first, second]
    assert all("held (policy)" in line and PERMIT not in line for line in listed)

    confirmed = CONFIRMED_OUT.search(office.cli("confirm", GW, first))
    assert confirmed is not None and confirmed.group(1, 2) == (first, GW)
    version, enr = int(confirmed.group(3)), int(confirmed.group(4))
    messages = [gateway.receive(), gateway.receive()]
    assert kinds(messages) == ["delta", "enrollment_decision"]
    assert delta_version(messages) == version
    assert decided(messages) == [Decided(enrollment=first, status="confirmed",
                                         list_version=version)]
    out = office.cli("reject", GW, second, "--reason", "officer")
    rejected = re.search(r"decision enr seq (\d+)", out)
    assert rejected is not None and int(rejected.group(1)) > enr
    assert "list version" not in out
    rejection = gateway.receive()
    assert decided([rejection]) == [Decided(enrollment=second, status="rejected",
                                            reason="officer")]
    states = {e.id: e.state for e in gateway.store.tenants.all()}
    assert states == {first: TenantState.CONFIRMED, second: TenantState.REJECTED}
    assert [e["status"] for e in central.enrollments(GW)] == ["confirmed", "rejected"]
    # One connection under the office's client id: the commands handed their work over.
    assert office.broker.log().count("as permitgate-central ") == 1


def test_confirm_without_a_running_serve_publishes_on_its_own_connection(
        office: OfficeRig, gateway: GatewayRig) -> None:
    """With no serve running, ``confirm`` connects by itself and the gateway still gets
    the delta and then the signed confirmation."""
    office.cli("policy", "enrollments", "hold")
    office.serve()
    enrollment = gateway.enroll()
    gateway.send(gateway.batch())
    gateway.receive_until_ack()
    office.stop()
    confirmed = CONFIRMED_OUT.search(office.cli("confirm", GW, enrollment))
    assert confirmed is not None
    messages = [gateway.receive(), gateway.receive()]
    assert decided(messages) == [Decided(enrollment=enrollment, status="confirmed",
                                         list_version=int(confirmed.group(3)))]
    record = gateway.store.tenants.get(enrollment)
    assert record is not None and record.state is TenantState.CONFIRMED


def test_an_enrollment_whose_event_breaks_the_chain_is_held(
        office: OfficeRig, gateway: GatewayRig) -> None:
    """An enrollment whose own event does not match its hash is held for an officer
    (``chain_problem``) even under the automatic policy."""
    central = office.serve()
    enrollment = gateway.enroll()
    batch = json.loads(gateway.batch())
    batch["events"][0]["data"]["unit"] = "103"  # edited after it was chained
    gateway.send(json.dumps(batch).encode())
    assert kinds(gateway.receive_until_ack()) == ["event_ack"]
    (record,) = central.enrollments(GW)
    assert (record["enrollment"], record["status"], record["reason"]) == (
        enrollment, "held", "chain_problem")
    assert central.gateway_report(GW)["chain_problems"]


@pytest.mark.parametrize("target", ["*", GW])
def test_a_revoked_permit_is_rejected(office: OfficeRig, gateway: GatewayRig,
                                      target: str) -> None:
    """An enrollment whose permit the office revoked, everywhere or at this gateway, is
    rejected as ``permit_revoked`` and its card never reaches the list."""
    central = office.serve()
    central.revoke_permit(PERMIT, target)
    assert isinstance(gateway.receive(), Revocation)
    enrollment = gateway.enroll()
    gateway.send(gateway.batch())
    messages = gateway.receive_until_ack()
    assert kinds(messages) == ["enrollment_decision", "event_ack"]
    assert decided(messages) == [Decided(enrollment=enrollment, status="rejected",
                                         reason="permit_revoked")]
    assert central.entries(GW) == []
    record = gateway.store.tenants.get(enrollment)
    assert record is not None and record.state is TenantState.REJECTED


def test_a_tampered_attachment_is_rejected_as_attachment_mismatch(
        office: OfficeRig, gateway: GatewayRig) -> None:
    """An attachment that is not the one whose SHA-256 the event's chained data carries
    is rejected as ``attachment_mismatch``, and logged."""
    office.serve()
    enrollment = gateway.enroll()
    genuine = json.loads(gateway.store.attachments(1, 1)[1])
    other = json.dumps({**genuine, "cred": b64(CARD_2)}, sort_keys=True,
                       separators=(",", ":"))
    with capture_logs() as logs:
        gateway.send(gateway.batch(attachments={1: other}))
        messages = gateway.receive_until_ack()
    assert decided(messages) == [Decided(enrollment=enrollment, status="rejected",
                                         reason="attachment_mismatch")]
    assert any(r["event"] == "enrollment_attachment_mismatch" and
               r["enrollment"] == enrollment for r in logs)


@pytest.mark.parametrize(("sealed_for", "number", "reason"), [
    ("another", PERMIT, "seal_invalid"),
    ("this", "110105194912310021", "permit_invalid"),  # the check character is X
])
def test_a_seal_that_does_not_open_or_an_invalid_permit_is_rejected(
        office: OfficeRig, gateway: GatewayRig, sealed_for: str, number: str,
        reason: str) -> None:
    """A permit number sealed for another enrollment does not open for this one
    (``seal_invalid``), and one that opens but is no valid permit is ``permit_invalid``."""
    central = office.serve()
    enrollment = str(uuid.uuid4())
    bound_to = str(uuid.uuid4()) if sealed_for == "another" else enrollment
    gateway.append_enrolled(enrollment, {"cred": b64(CARD), "permit_sealed": seal(
        office.seal_public, number, gateway=GW, enrollment_id=bound_to)})
    gateway.send(gateway.batch())
    messages = gateway.receive_until_ack()
    assert decided(messages) == [Decided(enrollment=enrollment, status="rejected",
                                         reason=reason)]
    (record,) = central.enrollments(GW, reveal=True)
    assert (record["status"], record["reason"], record["permit"]) == ("rejected", reason,
                                                                      None)


def test_a_permit_listed_in_another_building_is_recorded_not_rejected(
        office: OfficeRig, gateway: GatewayRig) -> None:
    """The same permit in another gateway's list is recorded as a finding (``elsewhere``)
    and the enrollment is confirmed all the same."""
    central = office.serve()
    central.enroll("gw2", "em4100:A1B2C3D4E5", PERMIT)
    enrollment = gateway.enroll()
    with capture_logs() as logs:
        gateway.send(gateway.batch())
        messages = gateway.receive_until_ack()
    assert decided(messages) == [Decided(enrollment=enrollment, status="confirmed",
                                         list_version=delta_version(messages))]
    (record,) = central.enrollments(GW)
    assert record["elsewhere"] == ["gw2"]
    assert any(r["event"] == "enrollment_permit_elsewhere" for r in logs)
    assert all(PERMIT not in json.dumps(r, default=str) for r in logs)


@pytest.mark.parametrize("ending", ["moved_out", "lease_end"])
def test_the_end_of_a_tenancy_takes_the_card_off_the_list(
        office: OfficeRig, gateway: GatewayRig, ending: str) -> None:
    """A move-out, or the end of the lease, reported by the gateway removes the card from
    the gateway's list with a delta and marks the enrollment ended."""
    central = office.serve()
    enrollment = gateway.enroll()
    gateway.send(gateway.batch())
    listed = delta_version(gateway.receive_until_ack())
    if ending == "moved_out":
        assert gateway.enroller.move_out(account="landlord", enrollment_id=enrollment)
    else:
        record = gateway.store.tenants.get(enrollment)
        assert record is not None
        ender = Enroller(gateway.store, HASHER, gateway.enroller.policy,
                         office.seal_public, clock=lambda: float(record.lease_end))
        assert ender.expire_leases()
    gateway.send(gateway.batch())  # what the gateway recorded since the ack, the end too
    messages = gateway.receive_until_ack()
    assert kinds(messages) == ["delta", "event_ack"]
    delta = messages[0]
    assert isinstance(delta, Delta)
    assert (delta.base, delta.upsert, delta.remove) == (listed, [], [b64(CARD)])
    assert central.entries(GW) == []
    (record_at_office,) = central.enrollments(GW)
    assert (record_at_office["status"], record_at_office["reason"],
            record_at_office["list_version"]) == ("ended", ending, delta.seq)
    assert gateway.store.lookup(CARD).grant is None


def test_a_resent_batch_is_acted_on_once(office: OfficeRig, gateway: GatewayRig) -> None:
    """The same events sent again (a lost ack, a reconnect) and an overlapping batch are
    acknowledged again, but bring no second delta or decision."""
    central = office.serve()
    gateway.enroll()
    payload = gateway.batch()
    gateway.send(payload)
    first = gateway.receive_until_ack()
    assert kinds(first) == ["delta", "enrollment_decision", "event_ack"]
    gateway.send(payload)
    assert kinds(gateway.receive_until_ack()) == ["event_ack"]
    assert gateway.peer.inbox.empty()
    gateway.enroll(CARD_2, permit=PERMIT_2)
    gateway.send(gateway.batch(first=1))  # the first enrollment again, and what followed
    messages = gateway.receive_until_ack()
    assert kinds(messages) == ["delta", "enrollment_decision", "event_ack"]
    assert [d.list_version for d in decided(messages)] == [delta_version(messages)]
    assert delta_version(messages) > delta_version(first)
    assert len(central.enrollments(GW)) == 2
    assert central.gateway_report(GW)["streams"]["enr"] == messages[1].seq


def test_events_stored_while_not_serving_are_acted_on_when_serve_starts(
        office: OfficeRig, gateway: GatewayRig) -> None:
    """Tenant events stored but not yet acted on (a stop in between) are acted on once
    serve is connected again: the delta and the decision go out then."""
    enrollment = gateway.enroll()
    with office.central() as central:
        central.store_events(GW, EventBatch.model_validate_json(gateway.batch()))
    office.serve()
    messages = [gateway.receive(), gateway.receive()]
    assert kinds(messages) == ["delta", "enrollment_decision"]
    assert decided(messages) == [Decided(enrollment=enrollment, status="confirmed",
                                         list_version=delta_version(messages))]


# -- the command line ---------------------------------------------------------------------


def test_cli_refuses_what_cannot_be_decided(office: OfficeRig, gateway: GatewayRig) -> None:
    """confirm, reject and policy exit 2 naming the problem: an unknown enrollment, a
    rejected one to confirm, a reason that is not a word, an unknown policy."""
    central = office.serve()
    central.revoke_permit(PERMIT)
    gateway.receive()
    enrollment = gateway.enroll()
    gateway.send(gateway.batch())
    gateway.receive_until_ack()
    unknown = str(uuid.uuid4())
    assert unknown in office.cli("confirm", GW, unknown, check=2)
    assert "cannot be confirmed" in office.cli("confirm", GW, enrollment, check=2)
    assert "--reason" in office.cli("reject", GW, enrollment, "--reason", "Not OK", check=2)
    assert "invalid choice" in office.cli("policy", "enrollments", "never", check=2)
    assert "gw9" in office.cli("enrollments", "gw9", check=2)


# -- the database -------------------------------------------------------------------------


def test_a_schema_1_database_upgrades(tmp_path: Path) -> None:
    """A central.db made by schema 1 opens as schema 2: its gateways, events and counters
    stay, the new counters start at 0, and events stored before the upgrade are not acted
    on as enrollments."""
    path = tmp_path / "central.db"
    old = SqliteFile(path, MIGRATIONS[:1], autocheckpoint=True)
    conn = old.writer
    conn.execute("INSERT INTO gateways (id, site, site_key_path, list_version, acked_upto, "
                 "created_ms) VALUES ('gw1', 's1', '/k', 4, 2, 1)")
    for seq in (1, 2):
        conn.execute("INSERT INTO events VALUES ('gw1', ?, ?, 1, 'tenant_moved_out', NULL, "
                     "NULL, NULL, NULL, NULL, '{}', ?, ?, 5)",
                     (seq, f"{seq:036d}", f"{seq - 1:064x}", f"{seq:064x}"))
    old.close()
    db = SqliteOfficeDatabase(path)
    try:
        assert db.meta("schema_version") == str(len(MIGRATIONS))
        gw = db.gateway("gw1")
        assert gw is not None
        assert (gw.list_version, gw.acked_upto, gw.enr_seq, gw.tenant_upto) == (4, 2, 0, 2)
        assert [s.event.attachment for s in db.events("gw1", after_seq=0, limit=None)] == \
            [None, None]
        assert db.tenant_events("gw1", 10) == []
        assert db.enrollments() == []
    finally:
        db.close()


# -- the worked example of docs/protocol.md ("Enrollments") -------------------------------


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


class Rfc9180:
    """HPKE base mode as docs/protocol.md describes it, built from X25519, HMAC-SHA256 and
    ChaCha20-Poly1305 alone: what an office written from the docs would do."""

    KEM_SUITE = b"KEM\x00\x20"
    HPKE_SUITE = b"HPKE\x00\x20\x00\x01\x00\x03"

    @classmethod
    def _extract(cls, suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return _hkdf_extract(salt, b"HPKE-v1" + suite + label + ikm)

    @classmethod
    def _expand(cls, suite: bytes, prk: bytes, label: bytes, info: bytes,
                length: int) -> bytes:
        return _hkdf_expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite + label
                            + info, length)

    @classmethod
    def key_and_nonce(cls, dh: bytes, enc: bytes, pk_r: bytes, info: bytes
                      ) -> tuple[bytes, bytes]:
        """The AEAD key and base nonce of one seal."""
        eae_prk = cls._extract(cls.KEM_SUITE, b"", b"eae_prk", dh)
        shared = cls._expand(cls.KEM_SUITE, eae_prk, b"shared_secret", enc + pk_r, 32)
        context = (b"\x00" + cls._extract(cls.HPKE_SUITE, b"", b"psk_id_hash", b"")
                   + cls._extract(cls.HPKE_SUITE, b"", b"info_hash", info))
        secret = cls._extract(cls.HPKE_SUITE, shared, b"secret", b"")
        return (cls._expand(cls.HPKE_SUITE, secret, b"key", context, 32),
                cls._expand(cls.HPKE_SUITE, secret, b"base_nonce", context, 12))

    @classmethod
    def seal(cls, pk_r: bytes, sk_e: X25519PrivateKey, info: bytes, text: bytes) -> bytes:
        """enc || ciphertext || tag, with a chosen ephemeral key (so the example is
        reproducible)."""
        enc = sk_e.public_key().public_bytes_raw()
        key, nonce = cls.key_and_nonce(sk_e.exchange(X25519PublicKey.from_public_bytes(pk_r)),
                                       enc, pk_r, info)
        return enc + ChaCha20Poly1305(key).encrypt(nonce, text, b"")

    @classmethod
    def open(cls, sk_r: X25519PrivateKey, sealed: bytes, info: bytes) -> bytes:
        """The plaintext of ``sealed``."""
        enc, ciphertext = sealed[:32], sealed[32:]
        key, nonce = cls.key_and_nonce(sk_r.exchange(X25519PublicKey.from_public_bytes(enc)),
                                       enc, sk_r.public_key().public_bytes_raw(), info)
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, b"")


EXAMPLE_GATEWAY, EXAMPLE_ENROLLMENT = "gw-0001", "5b0c7f0e-3c2a-4d8e-9a61-2f4b8d7e1c90"
EXAMPLE_OFFICE_KEY = bytes(range(0x40, 0x60))
EXAMPLE_EPHEMERAL_KEY = bytes(range(0x60, 0x80))
EXAMPLE_VALUES = {
    "office_public": "eaYx7t4b+cmPEgMs3q3Q56B5OY/HhriMyEbsia+FpRo=",
    "info": ("7065726d6974676174652d7631207065726d6974207365616c0a67772d303030310a"
             "35623063376630652d336332612d346438652d396136312d326634623864376531633930"),
    "key": "a2018eb84d18b99a987a4ebc4893ef266ea46a8828e1ad363af47136c4f7baea",
    "base_nonce": "7268755c725d7933ced3d12b",
    "sealed": ("Z13VdO13iTELPS52gfN5C0ZsdzsVIf7PNld5WDcepS+5x5DQRq1fpNGIBSfmgi6sr8oz7WRX"
               "hgVnjPDmYAw/scSK"),
}
"""The worked example of docs/protocol.md ("Sealing the permit number")."""


def test_the_documented_seal_example_is_what_the_code_and_the_docs_do() -> None:
    """HPKE built from the docs alone reproduces the documented seal byte for byte,
    ``protocol.sealing`` opens it, and it opens what ``protocol.sealing`` seals; every
    value is in docs/protocol.md."""
    docs = re.sub(r"\s+", "", (REPO / "docs" / "protocol.md").read_text("utf-8"))
    assert {name for name, value in EXAMPLE_VALUES.items() if value not in docs} == set()
    info = info_for(EXAMPLE_GATEWAY, EXAMPLE_ENROLLMENT)
    assert info.hex() == EXAMPLE_VALUES["info"]
    office = X25519PrivateKey.from_private_bytes(EXAMPLE_OFFICE_KEY)
    ephemeral = X25519PrivateKey.from_private_bytes(EXAMPLE_EPHEMERAL_KEY)
    pk_r = office.public_key().public_bytes_raw()
    assert b64(pk_r) == EXAMPLE_VALUES["office_public"]
    sealed = Rfc9180.seal(pk_r, ephemeral, info, PERMIT.encode())
    assert base64.b64encode(sealed).decode() == EXAMPLE_VALUES["sealed"]
    enc = sealed[:32]
    key, nonce = Rfc9180.key_and_nonce(
        office.exchange(X25519PublicKey.from_public_bytes(enc)), enc, pk_r, info)
    assert (key.hex(), nonce.hex()) == (EXAMPLE_VALUES["key"], EXAMPLE_VALUES["base_nonce"])
    assert unseal(office, EXAMPLE_VALUES["sealed"], gateway=EXAMPLE_GATEWAY,
                  enrollment_id=EXAMPLE_ENROLLMENT) == PERMIT
    fresh = seal(office.public_key(), PERMIT, gateway=EXAMPLE_GATEWAY,
                 enrollment_id=EXAMPLE_ENROLLMENT)
    assert Rfc9180.open(office, base64.b64decode(fresh), info) == PERMIT.encode()


def _section(title: str) -> str:
    """The text of one ``## `` section of docs/protocol.md."""
    docs = (REPO / "docs" / "protocol.md").read_text("utf-8")
    start = docs.index(f"\n## {title}\n")
    return docs[start:docs.index("\n## ", start + 1)]


def test_the_documented_enrollment_messages_hold_together() -> None:
    """The examples of docs/protocol.md ("Enrollments") are valid messages: the event's
    hash is its contents', its attachment is the one its data vouches for and opens with
    the example key to the example number, and the delta lists that card and permit."""
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", _section("Enrollments"),
                                                 re.DOTALL)]
    (batch,) = [EventBatch.model_validate(b) for b in blocks if b.get("type") == "events"]
    (event,) = batch.events
    assert contents_match(event)
    assert event.attachment is not None
    assert hashlib.sha256(event.attachment.encode()).hexdigest() == \
        event.data["attachment_sha256"]
    attachment = EnrollmentAttachment.model_validate_json(event.attachment)
    assert event.cred == log_prefix(base64.b64decode(attachment.cred))
    office = X25519PrivateKey.from_private_bytes(EXAMPLE_OFFICE_KEY)
    assert unseal(office, attachment.permit_sealed, gateway=batch.gateway,
                  enrollment_id=event.data["enrollment"]) == PERMIT
    decisions = [parse_central(json.dumps(b)) for b in blocks
                 if b.get("type") == "enrollment_decision"]
    assert [d.items[0].status for d in decisions if isinstance(d, EnrollmentDecision)] == \
        ["confirmed", "rejected"]
    (delta,) = [parse_central(json.dumps(b)) for b in blocks if b.get("type") == "delta"]
    assert isinstance(delta, Delta)
    (entry,) = delta.upsert
    assert entry.cred == attachment.cred
    assert entry.permit == b64(permit_hash(bytes(range(32, 64)), PERMIT))
    assert entry.valid_until == event.data["lease_end"]
