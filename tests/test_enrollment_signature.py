"""The gateway's signature of its enrollments: the shared sign/verify functions
(protocol/signing.py) and their documented example, the gateway's own private keys
loaded at start (agent/resolve.py), the enroller signing what it reports
(agent/enroll.py), and the office's rule for gateways whose signing key
``register-gateway`` recorded (provisioning/tenants.py), end to end on a real Mosquitto
with a gateway provisioned and registered by the real tools."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from structlog.testing import capture_logs

from agent import provision as prov
from agent.config import SyncConfig, load_config
from agent.enroll import Enroller, EnrollmentPolicy, end_of_day_s
from agent.resolve import Secrets, load_secrets, resolve_paths
from agent.store import Store
from agent.sync import fit_batch
from agent.sync_apply import Applier
from agent.tenants import TenantState
from protocol.chain import Event
from protocol.hashing import CredentialHasher, SecretError, log_prefix
from protocol.messages import (
    CentralBody,
    Decided,
    EventAck,
    EventBatch,
    parse_central,
)
from protocol.sealing import load_public_key, seal
from protocol.signing import (
    ENROLLMENT_SIGNATURE_FIELD,
    ENROLLMENT_SIGNING_TAG,
    b64,
    enrollment_signing_input,
    open_envelope,
    sign_enrollment,
    signing_input,
    verify_enrollment,
)
from protocol.topics import Topics
from provisioning.central import Central, CentralUsageError
from provisioning.tenants import recorded_signing_key
from tests.agentconf import agent_config
from tests.broker import Broker
from tests.provisionkit import GW, make_office, provision_gateway, register
from tests.test_central import GatewayPeer, Serving
from tests.test_office_enrollments import GatewayHost, decided
from tests.test_sync_apply import Sent

REPO = Path(__file__).resolve().parent.parent
ENROLLMENT = "5b0c7f0e-3c2a-4d8e-9a61-2f4b8d7e1c90"
ATTACHMENT = '{"cred":"y3I0I3RP0I5MlyhGLGdP0iJVMGpraUKStpw6woRy/7Y=","permit_sealed":"x"}'
PERMIT = "11010519491231002X"
PERMIT_2 = "110105198001011238"
MAX_BYTES = 4 * 1024 * 1024


@pytest.fixture
def key() -> Ed25519PrivateKey:
    """A gateway signing key."""
    return Ed25519PrivateKey.generate()


# -- sign and verify (protocol/signing.py) ----------------------------------------------


def test_a_signature_verifies_for_its_gateway_enrollment_and_attachment(
        key: Ed25519PrivateKey) -> None:
    """A signature verifies under the signer's public key for exactly the gateway,
    enrollment id and attachment it was made for, and is 88 characters of base64."""
    sig = sign_enrollment(key, gateway=GW, enrollment_id=ENROLLMENT, attachment=ATTACHMENT)
    assert len(sig) == 88 and len(base64.b64decode(sig, validate=True)) == 64
    assert verify_enrollment(key.public_key(), sig, gateway=GW, enrollment_id=ENROLLMENT,
                             attachment=ATTACHMENT)


@pytest.mark.parametrize(("gateway", "enrollment", "attachment"), [
    (GW, ENROLLMENT, ATTACHMENT.replace('"x"', '"y"')),  # one byte of the attachment
    (GW, ENROLLMENT, ATTACHMENT + " "),  # the same JSON, other bytes
    ("gw-0002", ENROLLMENT, ATTACHMENT),
    (GW, str(uuid.uuid4()), ATTACHMENT),
    # The boundary between the ids moved: the NUL separators keep them apart.
    (GW + "5", ENROLLMENT[1:], ATTACHMENT),
], ids=["attachment_byte", "attachment_reserialised", "other_gateway", "other_enrollment",
        "shifted_boundary"])
def test_a_signature_does_not_verify_for_anything_else(
        key: Ed25519PrivateKey, gateway: str, enrollment: str, attachment: str) -> None:
    """A tampered attachment, another gateway id or another enrollment id makes a genuine
    signature fail."""
    sig = sign_enrollment(key, gateway=GW, enrollment_id=ENROLLMENT, attachment=ATTACHMENT)
    assert not verify_enrollment(key.public_key(), sig, gateway=gateway,
                                 enrollment_id=enrollment, attachment=attachment)


def test_other_keys_and_malformed_or_foreign_signatures_do_not_verify(
        key: Ed25519PrivateKey) -> None:
    """Another key's signature, text that is no base64 signature, and the same key's
    signature of the same bytes without the enrollment tag (an envelope's, a renewal's)
    all fail, returning False rather than raising."""
    public = key.public_key()

    def verifies(sig: str) -> bool:
        return verify_enrollment(public, sig, gateway=GW, enrollment_id=ENROLLMENT,
                                 attachment=ATTACHMENT)

    other = Ed25519PrivateKey.generate()
    assert not verifies(sign_enrollment(other, gateway=GW, enrollment_id=ENROLLMENT,
                                        attachment=ATTACHMENT))
    untagged = enrollment_signing_input(GW, ENROLLMENT, ATTACHMENT)
    assert untagged.startswith(ENROLLMENT_SIGNING_TAG)
    assert not verifies(b64(key.sign(untagged[len(ENROLLMENT_SIGNING_TAG):])))
    assert not verifies(b64(key.sign(signing_input(GW, ATTACHMENT))))
    for junk in ("", "!" * 88, "A" * 87 + "=", "QUJD", "A" * 200):
        assert not verifies(junk), junk
    with pytest.raises(ValueError, match="NUL"):
        enrollment_signing_input("gw\0x", ENROLLMENT, ATTACHMENT)
    assert not verify_enrollment(public, "A" * 86 + "==", gateway="gw\0x",
                                 enrollment_id=ENROLLMENT, attachment=ATTACHMENT)


EXAMPLE_SEED = bytes(range(0x80, 0xA0))
EXAMPLE_VALUES = {
    "public_key": "zRSzf5VulTGU/3+3Oz2B3MVh1hp1OAlLfD4aZD7l86o=",
    "signed_sha256": "6caed6d2970d063269c4e1a9c4f0cc927e184f7f8870482c57718bea7385473d",
    "signature": ("rw8ojdxqR2enORMDvbilfIVDxm6LX9wh1dtsC4lb4C432Chnw1tGrrhfCdRRaDXGuP3EJh4WG"
                  "+bOullP6Dd5Bg=="),
}
"""The worked example of docs/protocol.md ("Signing the enrollment")."""


def _enrollment_section() -> str:
    docs = (REPO / "docs" / "protocol.md").read_text("utf-8")
    start = docs.index("\n## Enrollments\n")
    return docs[start:docs.index("\n## ", start + 1)]


def test_the_documented_signature_example_is_what_the_code_does() -> None:
    """The signed bytes built as docs/protocol.md describes them (tag, NUL-separated ids,
    the attachment as sent) are the code's, and the example key signs the documented
    event's attachment to the documented signature, which that event carries."""
    section = _enrollment_section()
    flat = re.sub(r"\s+", "", section)
    assert {name for name, value in EXAMPLE_VALUES.items() if value not in flat} == set()
    (batch,) = [EventBatch.model_validate(json.loads(b)) for b in
                re.findall(r"```json\n(.*?)```", section, re.DOTALL)
                if json.loads(b).get("type") == "events"]
    (event,) = batch.events
    assert event.attachment is not None
    enrollment = event.data["enrollment"]
    by_hand = (b"permitgate enrollment v1\x00" + batch.gateway.encode() + b"\x00"
               + enrollment.encode() + b"\x00" + event.attachment.encode())
    assert enrollment_signing_input(batch.gateway, enrollment, event.attachment) == by_hand
    assert len(by_hand) == 232 and "232 bytes" in section
    assert f"the {len(event.attachment.encode())} bytes of\nthe attachment" in section
    assert hashlib.sha256(by_hand).hexdigest() == EXAMPLE_VALUES["signed_sha256"]
    gateway_key = Ed25519PrivateKey.from_private_bytes(EXAMPLE_SEED)
    assert b64(gateway_key.public_key().public_bytes_raw()) == EXAMPLE_VALUES["public_key"]
    assert sign_enrollment(gateway_key, gateway=batch.gateway, enrollment_id=enrollment,
                           attachment=event.attachment) == EXAMPLE_VALUES["signature"]
    assert event.data[ENROLLMENT_SIGNATURE_FIELD] == EXAMPLE_VALUES["signature"]
    recorded = Ed25519PublicKey.from_public_bytes(base64.b64decode(
        EXAMPLE_VALUES["public_key"]))
    assert verify_enrollment(recorded, EXAMPLE_VALUES["signature"], gateway=batch.gateway,
                             enrollment_id=enrollment, attachment=event.attachment)


# -- the gateway's own keys (agent/resolve.py) --------------------------------------------


def _pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _secrets(folder: Path) -> Secrets:
    config = agent_config(folder)
    return load_secrets(config, resolve_paths(config, folder / "permitgate.toml"))


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bare key names resolve to the store's folder (no credentials directory)."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.mark.usefixtures("bare")
def test_missing_gateway_keys_load_as_none(tmp_path: Path) -> None:
    """A gateway without ``gateway-signing.key`` and ``gateway-seal.key`` (installed before
    provisioning) starts, with neither key."""
    secrets = _secrets(tmp_path)
    assert (secrets.signing_key, secrets.gateway_seal) == (None, None)


@pytest.mark.usefixtures("bare")
def test_gateway_keys_in_the_store_folder_are_loaded(tmp_path: Path) -> None:
    """The two keys under their default bare names in the store's folder (mode 0600) are
    loaded as the Ed25519 and X25519 keys they are."""
    signing, sealing = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    for name, key in (("gateway-signing.key", signing), ("gateway-seal.key", sealing)):
        (tmp_path / name).write_bytes(_pem(key))
        (tmp_path / name).chmod(0o600)
    secrets = _secrets(tmp_path)
    assert secrets.signing_key is not None and secrets.gateway_seal is not None
    assert secrets.signing_key.public_key().public_bytes_raw() == \
        signing.public_key().public_bytes_raw()
    assert secrets.gateway_seal.public_key().public_bytes_raw() == \
        sealing.public_key().public_bytes_raw()


@dataclass(frozen=True)
class BadKey:
    """A gateway key file that must stop the start."""

    name: str
    setting: str
    data: bytes | None
    """None: a folder where the file should be (unreadable as a file, even by root)."""
    mode: int
    words: str


BAD_KEYS = [
    BadKey("gateway-signing.key", "keys.signing_key", _pem(X25519PrivateKey.generate()),
           0o600, "not an Ed25519 private key"),
    BadKey("gateway-seal.key", "keys.seal_key", _pem(Ed25519PrivateKey.generate()), 0o600,
           "not an X25519 private key"),
    BadKey("gateway-signing.key", "keys.signing_key", b"not a key\n", 0o600,
           "not a PEM private key"),
    BadKey("gateway-seal.key", "keys.seal_key", _pem(X25519PrivateKey.generate()), 0o640,
           "can be read by its group"),
    BadKey("gateway-signing.key", "keys.signing_key", None, 0o700, "cannot read it"),
]


@pytest.mark.usefixtures("bare")
@pytest.mark.parametrize("bad", BAD_KEYS, ids=["x25519_as_signing", "ed25519_as_seal",
                                               "not_pem", "group_readable", "unreadable"])
def test_an_unusable_gateway_key_file_stops_the_start_naming_setting_and_file(
        tmp_path: Path, bad: BadKey) -> None:
    """A key file that exists but is of the wrong type, no PEM key, readable by others or
    unreadable is a ``SecretError`` naming the configuration key and the file."""
    path = tmp_path / bad.name
    if bad.data is None:
        path.mkdir()
    else:
        path.write_bytes(bad.data)
    path.chmod(bad.mode)
    with pytest.raises(SecretError) as caught:
        _secrets(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{bad.setting}: ")
    assert str(path) in message and bad.words in message


def test_a_provisioned_gateways_keys_load_through_the_credentials_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``provision``, ``register-gateway`` and ``--accept``, the agent's secrets
    hold the signing and seal keys whose public halves the office recorded."""
    secrets, office, _ = _provisioned(tmp_path, monkeypatch)
    record = json.loads((office / "gateways" / f"{GW}.json").read_text())
    assert secrets.signing_key is not None and secrets.gateway_seal is not None
    assert b64(secrets.signing_key.public_key().public_bytes_raw()) == record["signing_key"]
    assert b64(secrets.gateway_seal.public_key().public_bytes_raw()) == record["seal_key"]
    recorded = recorded_signing_key(office, GW)
    assert recorded is not None
    assert recorded.public_bytes_raw() == secrets.signing_key.public_key().public_bytes_raw()


def _provisioned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> tuple[Secrets, Path, Path]:
    """A gateway provisioned, registered at a new office and accepted, its secrets loaded
    as the agent loads them under systemd; (secrets, office folder, gateway folder)."""
    office = make_office(tmp_path / "office")
    folder = tmp_path / "gw"
    done = provision_gateway(folder)
    status, out = register(office, done.bundle, done.request.fingerprint)
    assert status == 0, out
    prov.accept(folder, folder / f"{GW}.response.json")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(prov.credentials(folder)))
    config_path = folder / prov.CONFIG_NAME
    config = load_config(config_path)
    return load_secrets(config, resolve_paths(config, config_path)), office, folder


# -- the enroller (agent/enroll.py) -----------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["with_key", "without_key"])
def test_the_enroller_signs_its_attachment_or_leaves_the_field_out(
        tmp_path: Path, key: Ed25519PrivateKey, signed: bool) -> None:
    """With a signing key the ``tenant_enrolled`` data carries a signature of the stored
    attachment for this gateway and enrollment; without one there is no such field at
    all (absent, not null), as from a gateway older than signatures."""
    hasher = CredentialHasher(bytes(range(32)))
    store = Store(tmp_path / "pg.db")
    try:
        enroller = Enroller(store, hasher, EnrollmentPolicy(
            units=("101",), provisional_s=3600, max_lease_days=400, gateway=GW),
            X25519PrivateKey.generate().public_key(), signing_key=key if signed else None)
        today = date.today()
        lease_end = today + timedelta(days=200)
        enrollment = enroller.enroll(hasher.credential("em4100:67003B51C6"), unit="101",
                                     permit=PERMIT, lease_end=lease_end, today=today,
                                     lease_end_s=end_of_day_s(lease_end, UTC),
                                     account="landlord")
        (event,) = store.events(kind="tenant_enrolled")
        attachment = store.attachments(event.seq, event.seq)[event.seq]
    finally:
        store.close()
    data = event.data
    assert data["enrollment"] == enrollment.id
    if not signed:
        assert ENROLLMENT_SIGNATURE_FIELD not in data
        return
    assert verify_enrollment(key.public_key(), data[ENROLLMENT_SIGNATURE_FIELD], gateway=GW,
                             enrollment_id=enrollment.id, attachment=attachment)
    assert not verify_enrollment(key.public_key(), data[ENROLLMENT_SIGNATURE_FIELD],
                                 gateway="gw-0002", enrollment_id=enrollment.id,
                                 attachment=attachment)


# -- the office's record (provisioning/tenants.py) ---------------------------------------


def test_the_recorded_signing_key_is_none_without_a_record_and_an_error_when_unusable(
        tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """No record (a gateway added with ``add-gateway``) means no key; a record that is no
    JSON, lacks ``signing_key`` or holds no Ed25519 key is the office's own trouble
    (``CentralUsageError`` naming the file), never taken as "no key"."""
    assert recorded_signing_key(tmp_path, GW) is None
    records = tmp_path / "gateways"
    records.mkdir()
    path = records / f"{GW}.json"
    path.write_text(json.dumps({"gateway_id": GW,
                                "signing_key": b64(key.public_key().public_bytes_raw())}))
    found = recorded_signing_key(tmp_path, GW)
    assert found is not None
    assert found.public_bytes_raw() == key.public_key().public_bytes_raw()
    for text in ("{not json", json.dumps({"gateway_id": GW}), json.dumps(["x"]),
                 json.dumps({"signing_key": "c2hvcnQ="}), json.dumps({"signing_key": 5})):
        path.write_text(text)
        with pytest.raises(CentralUsageError, match=re.escape(str(path))):
            recorded_signing_key(tmp_path, GW)


# -- end to end: a provisioned, registered gateway and its office ------------------------


class RegisteredGateway:
    """A gateway provisioned and registered by the real tools, enrolling with the real
    enroller and its own loaded keys; its outbox sent as the sync worker sends it, and the
    office's answers verified and applied by the real applier."""

    def __init__(self, secrets: Secrets, folder: Path, broker: Broker) -> None:
        assert secrets.trusted_keys is not None and secrets.signing_key is not None
        self.secrets = secrets
        self.hasher = CredentialHasher(secrets.site_key)
        self.office_seal = load_public_key(prov.credentials(folder) / prov.OFFICE_SEAL)
        self.store = Store(folder / "data" / "test.db")
        self.host = GatewayHost(self.store)
        self.enroller = Enroller(
            self.store, self.hasher, EnrollmentPolicy(units=("101", "102"),
                                                      provisional_s=72 * 3600,
                                                      max_lease_days=3660, gateway=GW),
            self.office_seal, signing_key=secrets.signing_key)
        self.host.enroller = self.enroller
        self.applier = Applier(self.store, self.host, secrets.trusted_keys, gateway=GW,
                               config=SyncConfig(), outbound=Sent())
        self.peer = GatewayPeer(broker, GW)

    def close(self) -> None:
        """Disconnect, close the store."""
        self.peer.close()
        self.store.close()

    def enroll(self, card: str, permit: str) -> str:
        """Enroll a tenant as the landlord page does; the enrollment id."""
        today = date.today()
        lease_end = today + timedelta(days=365)
        return self.enroller.enroll(self.hasher.credential(card), unit="101", permit=permit,
                                    lease_end=lease_end, today=today,
                                    lease_end_s=end_of_day_s(lease_end, UTC),
                                    account="landlord").id

    def forge(self, card: str, permit: str, signature: str | None,
              enrollment: str | None = None) -> str:
        """A ``tenant_enrolled`` event as the enroller makes one, its permit number sealed
        to the office for it, but with ``signature`` (None: none) in its data."""
        enrollment = enrollment or str(uuid.uuid4())
        cred = self.hasher.credential(card)
        text = json.dumps({"cred": b64(cred), "permit_sealed": seal(
            self.office_seal, permit, gateway=GW, enrollment_id=enrollment)},
            sort_keys=True, separators=(",", ":"))
        data: dict[str, object] = {
            "enrollment": enrollment, "unit": "102",
            "lease_end": int(time.time()) + 86_400 * 365,
            "provisional_until": int(time.time()) + 3600, "account": "landlord",
            "attachment_sha256": hashlib.sha256(text.encode()).hexdigest()}
        if signature is not None:
            data[ENROLLMENT_SIGNATURE_FIELD] = signature
        self.store.append(Event("tenant_enrolled", cred=log_prefix(cred), data=data),
                          attachment=text)
        return enrollment

    def send_outbox(self) -> None:
        """Publish every unacknowledged event, with its attachment, as one batch."""
        first = self.store.first_unacked()
        assert first is not None
        events = self.store.events(after_seq=first - 1, limit=500)
        payload, count = fit_batch(GW, events, MAX_BYTES,
                                   self.store.attachments(events[0].seq, events[-1].seq))
        assert count == len(events)
        self.peer.send_raw(Topics(GW).outbound("events"), payload.encode())

    def receive_until_ack(self) -> list[CentralBody]:
        """Every office message up to the next event ack, verified and applied."""
        assert self.secrets.trusted_keys is not None
        messages: list[CentralBody] = []
        while not messages or not isinstance(messages[-1], EventAck):
            topic, payload = self.peer.next()
            messages.append(parse_central(open_envelope(payload, topic,
                                                        self.secrets.trusted_keys,
                                                        MAX_BYTES)))
            self.applier.handle(topic, payload)
        return messages


@pytest.fixture
def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               broker: Broker) -> Iterator[tuple[RegisteredGateway, Central]]:
    """A registered gateway and its office serving on the test broker."""
    secrets, office, folder = _provisioned(tmp_path, monkeypatch)
    gateway = RegisteredGateway(secrets, folder, broker)
    serving = Serving(Central(office, broker.host, broker.port))
    try:
        yield gateway, serving.central
    finally:
        serving.stop()
        gateway.close()


def test_a_registered_gateways_signed_enrollment_is_confirmed_and_forged_ones_rejected(
        registered: tuple[RegisteredGateway, Central]) -> None:
    """With the gateway's key recorded by ``register-gateway``, its own signed enrollment
    is listed and confirmed, while enrollments sealed properly but unsigned, signed by
    another key, or carrying the genuine signature under another enrollment id are
    rejected (``signature_missing`` / ``signature_invalid``) with a warning, and their
    cards never reach the list."""
    gateway, central = registered
    genuine = gateway.enroll("em4100:67003B51C6", PERMIT)
    (event,) = gateway.store.events(kind="tenant_enrolled")
    genuine_sig = event.data[ENROLLMENT_SIGNATURE_FIELD]
    unsigned = gateway.forge("em4100:0102030405", PERMIT_2, None)
    stranger = Ed25519PrivateKey.generate()
    other_key_id = str(uuid.uuid4())
    other_key = gateway.forge("em4100:0102030406", PERMIT_2, sign_enrollment(
        stranger, gateway=GW, enrollment_id=other_key_id, attachment="x"), other_key_id)
    moved = gateway.forge("em4100:0102030407", PERMIT_2, genuine_sig)
    with capture_logs() as logs:
        gateway.send_outbox()
        messages = gateway.receive_until_ack()
    answers = {d.enrollment: d for d in decided(messages)}
    (version,) = {d.list_version for d in answers.values() if d.status == "confirmed"}
    assert answers == {
        genuine: Decided(enrollment=genuine, status="confirmed", list_version=version),
        unsigned: Decided(enrollment=unsigned, status="rejected", reason="signature_missing"),
        other_key: Decided(enrollment=other_key, status="rejected",
                           reason="signature_invalid"),
        moved: Decided(enrollment=moved, status="rejected", reason="signature_invalid"),
    }
    assert [e.cred for e in central.entries(GW)] == [
        b64(gateway.hasher.credential("em4100:67003B51C6"))]
    states = {e.id: e.state for e in gateway.store.tenants.all()}
    assert states[genuine] is TenantState.CONFIRMED
    warned = {(r["event"], r["enrollment"]) for r in logs if r.get("log_level") == "warning"}
    assert {("enrollment_signature_missing", unsigned),
            ("enrollment_signature_invalid", other_key),
            ("enrollment_signature_invalid", moved)} <= warned
