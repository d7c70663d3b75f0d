"""Rotating a building's site key end to end: the reference office (``serve`` in a thread,
driven by ``permitgate-central rotate-site-key``), a real Mosquitto and an in-process agent
holding its own seal key; and the gateway's key ring on its own (agent/site_keys.py).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.decision import Decision, Grant, Lookup, Reason
from agent.site_keys import SITE_STREAM, RekeyReports, SiteKeys, merge
from agent.store import Store
from agent.tenants import Enrollment, TenantState
from protocol import bundles
from protocol.hashing import CredentialHasher, SecretError
from protocol.messages import MAX_REKEY_PAIRS, RefusedError, SiteKey
from protocol.signing import b64
from provisioning import central_cli
from provisioning.central import TRUSTED_KEYS_NAME, Central, keygen
from provisioning.site_rotation import GATEWAYS_DIR
from tests.agentconf import KEY
from tests.broker import Broker
from tests.conftest import wait_for
from tests.test_central import Serving
from tests.test_sync import GW, Gateway
from tests.test_sync_apply import CARD_A, CARD_B, CARD_C

CARD_D = "em4100:A1B2C3D4E5"
NEW_KEY = bytes(range(100, 132))


def cli(folder: Path, broker: Broker, *args: str) -> tuple[int, str]:
    """Run ``permitgate-central`` on ``folder`` and the test broker: status and output."""
    out = io.StringIO()
    status = central_cli.main(["--dir", str(folder), "--host", broker.host, "--port",
                               str(broker.port), *args], out=out)
    return status, out.getvalue()


def pem(key: X25519PrivateKey) -> bytes:
    """A private key as ``permitgate provision`` writes it."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def register_seal(folder: Path, seal: X25519PrivateKey) -> None:
    """The part of ``register-gateway``'s record a rotation reads: the seal key."""
    (folder / GATEWAYS_DIR).mkdir(mode=0o700, exist_ok=True)
    (folder / GATEWAYS_DIR / f"{GW}.json").write_text(json.dumps({
        "gateway_id": GW, "seal_key": b64(seal.public_key().public_bytes_raw())}))


def install_seal(gateway: Gateway, seal: X25519PrivateKey) -> None:
    """The gateway's seal key where ``keys.seal_key``'s default finds it (mode 0600)."""
    seal_file = gateway.agent.paths.data_dir / "gateway-seal.key"
    seal_file.parent.mkdir(parents=True, exist_ok=True)
    seal_file.write_bytes(pem(seal))
    seal_file.chmod(0o600)


def message(seal: X25519PrivateKey, key: bytes, generation: int, previous: str,
            seq: int = 10) -> SiteKey:
    """A ``site_key`` message for ``GW`` as the office builds it (unsigned: the key ring
    sees it after the envelope was checked)."""
    return SiteKey(type="site_key", gateway=GW, seq=seq, issued_at=0, expires_at=10**9,
                   generation=generation, previous=previous,  # type: ignore[arg-type]
                   sealed=bundles.seal_rotated_site_key(seal.public_key(), key,
                                                        gateway_id=GW, generation=generation))


# -- the key ring ------------------------------------------------------------------------


def test_a_change_over_honours_both_keys_and_reports_cards_known_only_under_the_old() -> None:
    """During a change-over a card is looked up under both keys; one granted only under
    the previous key is reported as (old hash, new hash), one already under the new key
    is not, and after the change-over ends only the new key is used."""
    seal = X25519PrivateKey.generate()
    ring = SiteKeys(KEY, seal, GW)
    old, new = CredentialHasher(KEY), CredentialHasher(NEW_KEY)
    granted = {old.credential(CARD_A): Lookup(grant=Grant()),
               new.credential(CARD_B): Lookup(grant=Grant())}

    def lookup(cred: bytes) -> Lookup:
        return granted.get(cred, Lookup())

    ring.commit(ring.check(message(seal, NEW_KEY, 2, "honoured")))
    assert ring.credential(CARD_A) == new.credential(CARD_A)
    keys = ring.ring
    found = keys.match(CARD_A, ring.credential(CARD_A), lookup)
    assert found.lookup.grant is not None
    assert found.rekey == (old.credential(CARD_A), new.credential(CARD_A))
    found_b = keys.match(CARD_B, new.credential(CARD_B), lookup)
    assert found_b.lookup.grant is not None and found_b.rekey is None
    found_c = keys.match(CARD_C, new.credential(CARD_C), lookup)
    assert found_c.lookup.grant is None and found_c.rekey is None

    ring.commit(ring.check(message(seal, NEW_KEY, 2, "dropped", seq=11)))
    assert ring.ring.previous is None
    assert ring.ring.match(CARD_A, ring.credential(CARD_A), lookup).lookup.grant is None


def test_revoked_under_either_key_is_revoked() -> None:
    """A card revoked under the new key while its entry is still under the old one is
    revoked, and it is still reported for re-keying (its entry has no new hash yet)."""
    merged = merge(Lookup(revoked=True), Lookup(grant=Grant()))
    assert merged.revoked and merged.grant is not None
    seal = X25519PrivateKey.generate()
    ring = SiteKeys(KEY, seal, GW)
    ring.commit(ring.check(message(seal, NEW_KEY, 2, "honoured")))
    old, new = CredentialHasher(KEY).credential(CARD_A), CredentialHasher(NEW_KEY).credential(
        CARD_A)
    table = {old: Lookup(grant=Grant()), new: Lookup(revoked=True)}
    found = ring.ring.match(CARD_A, new, lambda c: table.get(c, Lookup()))
    assert found.lookup.revoked and found.rekey == (old, new)


@pytest.mark.parametrize(("case", "reason"), [
    ("older generation", "rollback"),
    ("same generation, other key", "conflict"),
    ("ended change-over reopened", "rollback"),
    ("sealed to another gateway key", "malformed"),
    ("no seal key", "no_seal_key"),
])
def test_site_key_messages_that_cannot_be_used_are_refused(case: str, reason: str) -> None:
    """Rollbacks, conflicting keys, a reopened change-over, a key sealed to another
    gateway and a gateway without a seal key are refused with their reason, and the ring
    in force does not change."""
    seal = X25519PrivateKey.generate()
    ring = SiteKeys(KEY, None if case == "no seal key" else seal, GW)
    if case != "no seal key":
        ring.commit(ring.check(message(seal, NEW_KEY, 3, "honoured")))
        ring.commit(ring.check(message(seal, NEW_KEY, 3, "dropped", seq=11)))
    before = ring.ring
    bad = {
        "older generation": lambda: message(seal, KEY, 2, "dropped", seq=12),
        "same generation, other key": lambda: message(seal, KEY, 3, "dropped", seq=12),
        "ended change-over reopened": lambda: message(seal, NEW_KEY, 3, "honoured", seq=12),
        "sealed to another gateway key": lambda: message(X25519PrivateKey.generate(),
                                                         NEW_KEY, 4, "honoured", seq=12),
        "no seal key": lambda: message(seal, NEW_KEY, 2, "honoured"),
    }[case]()
    with pytest.raises(RefusedError) as refused:
        ring.check(bad)
    assert refused.value.reason == reason
    assert ring.ring is before


def test_the_stored_state_holds_no_key_and_reopens_only_with_the_seal_key() -> None:
    """The state a change stores carries the new key sealed, never in the clear; a
    restart with the seal key restores both keys, one without it refuses to start with
    an error naming keys.seal_key, and a state made for another configured key is set
    aside."""
    seal = X25519PrivateKey.generate()
    ring = SiteKeys(KEY, seal, GW)
    change = ring.check(message(seal, NEW_KEY, 2, "honoured"))
    detail = change.detail()
    text = json.dumps(detail)
    assert NEW_KEY.hex() not in text and b64(NEW_KEY) not in text
    ring.commit(change)

    again = SiteKeys(KEY, seal, GW)
    restored = again.load(detail)
    assert restored.generation == 2 and restored.previous is not None
    assert again.credential(CARD_A) == CredentialHasher(NEW_KEY).credential(CARD_A)
    assert restored.previous.credential(CARD_A) == CredentialHasher(KEY).credential(CARD_A)
    with pytest.raises(SecretError, match=r"keys\.seal_key"):
        SiteKeys(KEY, None, GW).load(detail)
    other = SiteKeys(bytes(32), seal, GW)
    assert other.load(detail).generation == 1


def test_rekey_reports_batch_by_generation_and_bound_what_they_keep() -> None:
    """Pairs are sent at most MAX_REKEY_PAIRS a message, one message per generation (an
    ended change-over's pairs are dropped), and the same card reported twice is sent
    once."""
    reports = RekeyReports(GW)
    assert reports.take(0) is None
    for n in range(MAX_REKEY_PAIRS + 5):
        reports.add(2, n.to_bytes(32, "big"), (n + 1000).to_bytes(32, "big"))
    reports.add(2, (0).to_bytes(32, "big"), (7).to_bytes(32, "big"))
    first = reports.take(1)
    assert first is not None and len(first.pairs) == MAX_REKEY_PAIRS
    second = reports.take(2)
    assert second is not None and len(second.pairs) == 5
    assert reports.take(3) is None
    reports.add(2, b"\1" * 32, b"\2" * 32)
    reports.add(3, b"\3" * 32, b"\4" * 32)
    latest = reports.take(4)
    assert latest is not None and latest.generation == 3 and reports.take(5) is None


# -- end to end --------------------------------------------------------------------------


def test_a_site_key_rotates_without_locking_a_tenant_out(broker: Broker, tmp_path: Path
                                                         ) -> None:
    """rotate-site-key sends the new key; cards keep opening under the old key and are
    re-keyed by their first tap; a card enrolled or revoked meanwhile takes the new key;
    --finish is refused while a card is not re-keyed, --force drops it; after the
    change-over the re-keyed and new cards open under the new key alone, the dropped one
    does not, and the revoked one stays revoked."""
    folder = tmp_path / "central"
    keygen(folder)
    seal = X25519PrivateKey.generate()
    register_seal(folder, seal)
    with Central(folder, broker.host, broker.port) as central:
        central.add_gateway(GW, "b-1", KEY)
        for number, card in enumerate((CARD_A, CARD_B, CARD_C)):
            central.enroll(GW, card, f"P-{number}")
    serving = Serving(Central(folder, broker.host, broker.port, resync_interval_s=0.5),
                      heartbeat_every_s=1.0)
    office = serving.central
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", broker, folder / TRUSTED_KEYS_NAME)
    install_seal(gateway, seal)
    gateway.agent.start()
    try:
        wait_for(lambda: gateway.versions().get("list"), "the list applied")
        assert gateway.tap(CARD_A).granted

        status, said = cli(folder, broker, "rotate-site-key", GW)
        assert status == 0, said
        assert "3 card(s) will be re-keyed" in said
        seq = office.site_key_status(GW)
        wait_for(lambda: gateway.versions().get(SITE_STREAM) is not None, "the key applied")
        keys = gateway.agent.site_keys
        assert keys is not None and keys.ring.generation == 2
        assert keys.ring.previous is not None
        assert seq["changeover"] and seq["pending"] == 3
        new = CredentialHasher(bytes.fromhex(
            (folder / "site-keys" / f"{GW}.2.key").read_text().strip()))

        assert gateway.tap(CARD_A).granted  # under the old key: reported, re-keyed
        wait_for(lambda: office.site_key_status(GW)["pending"] == 2, "card A re-keyed")
        store = gateway.agent.store
        assert store is not None
        wait_for(lambda: store.lookup(new.credential(CARD_A)).grant is not None,
                 "card A's entry under the new hash at the gateway")

        office.enroll(GW, CARD_D, "P-9")  # hashed under the new key
        office.publish_delta(GW, upsert=[CARD_D])
        wait_for(lambda: store.lookup(new.credential(CARD_D)).grant is not None, "card D")
        assert gateway.tap(CARD_D).granted

        rev = office.revoke_card(GW, CARD_B)  # under both keys
        wait_for(lambda: gateway.versions().get("rev", 0) >= rev, "card B revoked")
        assert gateway.tap(CARD_B) == Decision(False, Reason.REVOKED)

        status, said = cli(folder, broker, "rotate-site-key", GW, "--finish")
        assert status == 2
        assert office.site_key_status(GW)["changeover"]
        status, said = cli(folder, broker, "rotate-site-key", GW, "--status")
        assert status == 0 and "generation 2 (change-over)" in said

        status, said = cli(folder, broker, "rotate-site-key", GW, "--finish", "--force")
        assert status == 0, said
        wait_for(lambda: keys.ring.previous is None, "the old key dropped")
        finished = office.site_key_status(GW)
        assert not finished["changeover"] and finished["pending"] == 0
        wait_for(lambda: store.lookup(CredentialHasher(KEY).credential(CARD_A)).grant is None
                 and store.lookup(new.credential(CARD_A)).grant is not None,
                 "the list under the new key alone")
        assert gateway.tap(CARD_A).granted
        assert gateway.tap(CARD_D).granted
        assert gateway.tap(CARD_B) == Decision(False, Reason.REVOKED)
        assert not gateway.tap(CARD_C).granted  # never tapped: dropped by --force
        kinds = gateway.kinds()
        assert kinds.count("site_key_changed") == 2

        status, said = cli(folder, broker, "rotate-site-key", GW, "--finish")
        assert status == 2  # nothing to finish
    finally:
        gateway.agent.stop()
        serving.stop()


def test_a_gateway_that_missed_the_key_gets_it_again_from_its_status(
        broker: Broker, tmp_path: Path) -> None:
    """A gateway offline while the rotation starts reports a lower ``site`` version in its
    status once back, and the office sends it the key again; a gateway without a
    registration record cannot be rotated (exit 2 naming register-gateway)."""
    folder = tmp_path / "central"
    keygen(folder)
    seal = X25519PrivateKey.generate()
    with Central(folder, broker.host, broker.port) as central:
        central.add_gateway(GW, "b-1", KEY)
        central.enroll(GW, CARD_A, "P-1")
    status, said = cli(folder, broker, "rotate-site-key", GW)
    assert status == 2, said
    register_seal(folder, seal)
    assert cli(folder, broker, "rotate-site-key", GW)[0] == 0  # nobody listening
    serving = Serving(Central(folder, broker.host, broker.port, resync_interval_s=0.5),
                      heartbeat_every_s=1.0)
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", broker, folder / TRUSTED_KEYS_NAME)
    install_seal(gateway, seal)
    gateway.agent.start()
    try:
        wait_for(lambda: gateway.versions().get(SITE_STREAM) is not None,
                 "the key sent again after the gateway's status")
        keys = gateway.agent.site_keys
        assert keys is not None and keys.ring.generation == 2
        wait_for(lambda: gateway.versions().get("list"), "the list applied")
        assert gateway.tap(CARD_A).granted  # under the old key, then re-keyed
        wait_for(lambda: serving.central.site_key_status(GW)["pending"] == 0, "re-keyed")
    finally:
        gateway.agent.stop()
        serving.stop()


def test_enrollments_made_at_the_gateway_follow_their_card_to_the_new_key(
        tmp_path: Path) -> None:
    """A provisional enrollment and a move-out recorded under the previous key are moved to
    the card's new hash, so the tenant keeps provisional access and the moved-out card
    stays refused once the previous key is dropped."""
    store = Store(tmp_path / "pg.db")
    try:
        old, new = CredentialHasher(KEY), CredentialHasher(NEW_KEY)
        now = int(time.time())
        store.tenants.add(Enrollment("e-1", old.credential(CARD_A), "101", now + 86_400,
                                     now + 3600, TenantState.PENDING, None, None, "landlord",
                                     now * 1000, now * 1000))
        store.tenants.add(Enrollment("e-2", old.credential(CARD_B), "102", now + 86_400,
                                     now + 3600, TenantState.PENDING, None, None, "landlord",
                                     now * 1000, now * 1000))
        store.tenants.end(now_ms=now * 1000, reason="moved_out", enrollment_id="e-2")
        assert store.lookup(old.credential(CARD_B)).revoked
        assert store.lookup(new.credential(CARD_A)).grant is None
        moved = store.tenants.rekey([(old.credential(CARD_A), new.credential(CARD_A)),
                                     (old.credential(CARD_B), new.credential(CARD_B))])
        assert moved == 3  # two enrollments and one local revocation
        assert store.lookup(new.credential(CARD_A)).grant is not None
        assert store.lookup(new.credential(CARD_B)).revoked
        assert store.lookup(old.credential(CARD_A)).grant is None
    finally:
        store.close()
