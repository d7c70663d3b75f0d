"""Key announcements on the applier (agent/sync_apply.py, agent/trust.py) with a real store.

The office of ``tests.test_sync_apply.Rig`` signs with ``office-1`` (its trusted-keys.txt
key); these tests announce a second key, retire the first, and check what each key's
messages then do.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.sync_apply import Applier
from agent.trust import KEYS_STREAM
from protocol.messages import AnnouncedKey, Command, KeyAnnouncement
from protocol.signing import b64, sign, signing_input
from tests.test_sync_apply import (
    CARD_A,
    CARD_B,
    KID,
    TOPICS,
    Rig,
    cred,
    revocation,
    rig_fixture,  # noqa: F401 - the rig fixture
)

NEW_KID = "office-2"
NEW_KEY = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)


def key(kid: str, private: Ed25519PrivateKey, state: str = "active",
        not_after: int | None = None) -> AnnouncedKey:
    """An announced key."""
    return AnnouncedKey(kid=kid, public_key=b64(private.public_key().public_bytes_raw()),
                        state=state, not_after=not_after)  # type: ignore[arg-type]


def announce(rig: Rig, seq: int, *keys: AnnouncedKey, signer: Ed25519PrivateKey | None = None,
             kid: str = KID) -> None:
    """Send a ``keys`` announcement signed by ``signer`` (the rig's key) as ``kid``."""
    topic = TOPICS.inbound("keys")
    body = KeyAnnouncement(type="keys", keys=list(keys), **rig.header(seq))
    rig.applier.handle(topic, sign(signer or rig.key, kid, topic, body))


def send_as(rig: Rig, kind: str, body: Any, signer: Ed25519PrivateKey, kid: str) -> None:
    """Sign ``body`` for the ``kind`` topic with ``signer`` under ``kid``."""
    topic = TOPICS.inbound(kind)
    rig.applier.handle(topic, sign(signer, kid, topic, body))


def rotated(rig: Rig) -> None:
    """Announce the new key beside the old one (seq 1)."""
    announce(rig, 1, key(KID, rig.key), key(NEW_KID, NEW_KEY))
    assert (rig.last().stream, rig.last().status) == (KEYS_STREAM, "applied")


def test_a_new_key_is_trusted_once_announced(rig: Rig) -> None:
    """A message under a key the gateway does not know is refused as unknown_key until a
    trusted key announces it, and accepted after."""
    send_as(rig, "rev", revocation(rig, 1, CARD_A), NEW_KEY, NEW_KID)
    assert (rig.last().reason, rig.applier.versions().get("rev")) == ("unknown_key", None)
    rotated(rig)
    send_as(rig, "rev", revocation(rig, 2, CARD_A), NEW_KEY, NEW_KID)
    assert rig.last().status == "applied"
    assert rig.store.lookup(cred(CARD_A)).revoked
    assert "keys_announced" in rig.kinds()


def test_an_announcement_signed_by_an_untrusted_key_is_refused(rig: Rig) -> None:
    """An announcement signed by a key the gateway does not trust (it names itself) is
    refused as unknown_key and adds nothing."""
    announce(rig, 1, key(NEW_KID, NEW_KEY), signer=NEW_KEY, kid=NEW_KID)
    assert (rig.last().stream, rig.last().reason) == (KEYS_STREAM, "unknown_key")
    assert KEYS_STREAM not in rig.applier.versions()
    assert set(rig.applier.trust.verifying(rig.clock.now)) == {KID}
    # Signed by the new key under the trusted key's id: the signature does not verify.
    announce(rig, 2, key(NEW_KID, NEW_KEY), signer=NEW_KEY, kid=KID)
    assert rig.last().reason == "bad_signature"


def test_a_replayed_or_older_announcement_is_refused(rig: Rig) -> None:
    """An announcement at or below the stored ``keys`` seq is refused (replay, rollback):
    an old set cannot bring a retired key back."""
    rotated(rig)
    announce(rig, 5, key(NEW_KID, NEW_KEY), key(KID, rig.key, "retired"))
    assert rig.last().status == "applied"
    announce(rig, 5, key(KID, rig.key), key(NEW_KID, NEW_KEY), signer=NEW_KEY, kid=NEW_KID)
    assert rig.last().reason == "replay"
    announce(rig, 1, key(KID, rig.key), key(NEW_KID, NEW_KEY), signer=NEW_KEY, kid=NEW_KID)
    assert rig.last().reason == "rollback"
    assert rig.applier.versions()[KEYS_STREAM] == 5
    assert set(rig.applier.trust.verifying(rig.clock.now)) == {NEW_KID}


def test_a_retired_key_is_refused_though_trusted_keys_lists_it(rig: Rig) -> None:
    """After the old key is announced retired (by the new one), its messages are refused
    as unknown_key saying it was retired, while the new key's apply."""
    rotated(rig)
    announce(rig, 2, key(NEW_KID, NEW_KEY), key(KID, rig.key, "retired"),
             signer=NEW_KEY, kid=NEW_KID)
    assert rig.last().status == "applied"
    rig.send("rev", revocation(rig, 3, CARD_A))
    assert (rig.last().status, rig.last().reason) == ("refused", "unknown_key")
    assert "retired" in rig.store.events(kind="sync_refused")[-1].data["detail"]
    assert not rig.store.lookup(cred(CARD_A)).revoked
    send_as(rig, "rev", revocation(rig, 4, CARD_B), NEW_KEY, NEW_KID)
    assert rig.last().status == "applied"
    assert rig.store.lookup(cred(CARD_B)).revoked


def test_a_retiring_key_is_trusted_until_its_not_after(rig: Rig) -> None:
    """A key announced ``retiring`` verifies until ``not_after`` and is refused from
    then on, with no further announcement."""
    rotated(rig)
    not_after = int(rig.clock.now) + 600
    announce(rig, 2, key(NEW_KID, NEW_KEY), key(KID, rig.key, "retiring", not_after),
             signer=NEW_KEY, kid=NEW_KID)
    rig.send("cmd", Command(type="command", action="status", **rig.header(3)))
    assert rig.last().status == "applied"
    rig.clock.now = not_after
    rig.send("cmd", Command(type="command", action="status", **rig.header(4)))
    assert (rig.last().status, rig.last().reason) == ("refused", "unknown_key")


def test_a_retirement_survives_a_restart_and_is_for_good(rig: Rig) -> None:
    """The announced set is stored: a new applier on the same store (a restart) still
    refuses the retired key, and a later announcement naming it active again or leaving
    it out does not bring it back."""
    rotated(rig)
    announce(rig, 2, key(NEW_KID, NEW_KEY), key(KID, rig.key, "retired"),
             signer=NEW_KEY, kid=NEW_KID)
    restarted = Applier(rig.store, rig.host, {KID: rig.key.public_key()}, gateway="gw-1",
                        config=rig.applier.config, outbound=rig.sent, clock=rig.clock)
    assert set(restarted.trust.verifying(rig.clock.now)) == {NEW_KID}
    rig.applier = restarted
    announce(rig, 3, key(NEW_KID, NEW_KEY), key(KID, rig.key), signer=NEW_KEY, kid=NEW_KID)
    assert rig.last().status == "applied"
    announce(rig, 4, key(NEW_KID, NEW_KEY), signer=NEW_KEY, kid=NEW_KID)
    assert set(rig.applier.trust.verifying(rig.clock.now)) == {NEW_KID}
    rig.send("rev", revocation(rig, 5, CARD_A))
    assert rig.last().reason == "unknown_key"


def test_an_announcement_without_an_active_key_is_malformed(rig: Rig) -> None:
    """An announcement that leaves no key active, or lists a key id twice, is refused as
    malformed and changes nothing."""
    topic = TOPICS.inbound("keys")
    for seq, keys in ((1, [key(KID, rig.key, "retired")]),
                      (2, [key(KID, rig.key), key(KID, rig.key)])):
        body = json.dumps({"type": "keys", "keys": [k.model_dump() for k in keys],
                           **rig.header(seq)})
        signature = b64(rig.key.sign(signing_input(topic, body)))
        rig.applier.handle(topic, json.dumps({"kid": KID, "sig": signature,
                                              "body": body}).encode())
        assert rig.last().reason == "malformed"
    assert set(rig.applier.trust.verifying(rig.clock.now)) == {KID}


def test_the_files_key_wins_over_a_different_announced_key(rig: Rig) -> None:
    """An announcement giving the file's key id another public key does not replace the
    file's key: messages under the file's key still verify."""
    announce(rig, 1, key(KID, NEW_KEY), key(NEW_KID, NEW_KEY))
    assert rig.last().status == "applied"
    rig.send("rev", revocation(rig, 2, CARD_A))
    assert rig.last().status == "applied"
