"""What a message lost in transit, or an office that starts late, no longer costs.

A command: the office's heartbeat names the latest command it sent (``cmd_seq``); a gateway
below it asks again (a ``resync`` request with reason ``behind_command``), and the office
sends its latest mode command and its latest command again under their own seqs, signed
anew, which the gateway applies once. The event chain: a batch whose first event follows
a pruned one carries the gateway's chain anchor, and an office that holds nothing before
that event checks its link against it.

The gateway's half runs on the applier (no broker) and on an in-process agent against a
real Mosquitto; the office's half is the reference office (``Central``) against the same
broker; one test runs both together.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from agent.decision import Mode
from agent.store import Store
from agent.sync import fit_batch
from protocol.chain import Event
from protocol.messages import (
    BEHIND_COMMAND,
    Command,
    EventAck,
    EventBatch,
    Heartbeat,
    Snapshot,
)
from protocol.signing import load_trusted_keys, open_envelope
from provisioning.central import TRUSTED_KEYS_NAME, Central, keygen
from tests.agentconf import KEY
from tests.broker import Broker
from tests.conftest import wait_for
from tests.test_central import MAX_BYTES, GatewayPeer, Serving
from tests.test_sync import CARD_A, GW, Gateway
from tests.test_sync import Office as HandOffice
from tests.test_sync_apply import (
    Rig,
    rig_fixture,  # noqa: F401 - the rig fixture
)

# -- the wire ---------------------------------------------------------------------------


def test_fields_without_a_value_stay_off_the_wire() -> None:
    """A heartbeat without ``cmd_seq`` and a batch without an anchor carry no such keys
    (a peer older than them refuses unknown keys); an anchor needs both fields and must
    be the first event's predecessor."""
    header: dict[str, Any] = {"gateway": GW, "seq": 1, "issued_at": 1, "expires_at": 2}
    beat = Heartbeat(type="heartbeat", list_version=0, rev_seq=0, all_seq=0, **header)
    assert "cmd_seq" not in json.loads(beat.model_dump_json())
    assert json.loads(beat.model_copy(update={"cmd_seq": 4}).model_dump_json())["cmd_seq"] == 4
    event = {"seq": 8, "event_id": "0" * 36, "ts_ms": 1, "kind": "k", "door": None,
             "reader": None, "direction": None, "reason": None, "cred": None, "data": {},
             "prev_hash": "a" * 64, "hash": "b" * 64}
    plain = EventBatch.model_validate({"type": "events", "gateway": GW, "events": [event]})
    assert not {"anchor_seq", "anchor_hash"} & set(json.loads(plain.model_dump_json()))
    anchored = {"type": "events", "gateway": GW, "events": [event], "anchor_seq": 7,
                "anchor_hash": "a" * 64}
    assert EventBatch.model_validate(anchored).anchor_seq == 7
    for broken in ({"anchor_hash": None}, {"anchor_seq": None}, {"anchor_seq": 6}):
        with pytest.raises(ValidationError):
            EventBatch.model_validate({**anchored, **broken})


# -- the gateway ------------------------------------------------------------------------


def heartbeat(rig: Rig, seq: int, cmd_seq: int | None) -> Heartbeat:
    """A heartbeat of the empty lists naming ``cmd_seq``."""
    return Heartbeat(type="heartbeat", list_version=0, rev_seq=0, all_seq=0,
                     cmd_seq=cmd_seq, **rig.header(seq))


def mode(rig: Rig) -> Mode:
    """The site mode the applier has set."""
    return rig.host.mode


def test_a_heartbeat_naming_a_newer_command_makes_the_gateway_ask_for_it(rig: Rig) -> None:
    """Only a heartbeat whose ``cmd_seq`` is above the gateway's ``cmd`` stream makes it
    ask for the commands again (``behind_command``); none or an equal one does not."""
    rig.snapshot(1, [[]])  # a gateway with a list (one without asks for it on a heartbeat)
    rig.send("hb", heartbeat(rig, 1, None))
    assert rig.sent.resyncs == []
    rig.send("hb", heartbeat(rig, 2, 1))
    assert rig.sent.resyncs == [(BEHIND_COMMAND, False)]
    rig.send("cmd", Command(type="command", action="lockdown", **rig.header(1)))
    rig.send("hb", heartbeat(rig, 3, 1))
    assert rig.sent.resyncs == [(BEHIND_COMMAND, False)]


def test_a_command_sent_again_applies_once_and_never_after_a_later_one(rig: Rig) -> None:
    """A command that expired on the way is refused and asked for again; the copy signed
    anew under the same seq applies; a further copy is a replay, and after a later
    command a rollback: neither changes anything."""
    rig.snapshot(1, [[]])  # a gateway with a list (one without asks for it on a heartbeat)
    stale = {**rig.header(1), "issued_at": int(rig.clock.now) - 7200,
             "expires_at": int(rig.clock.now) - 3600}
    rig.send("cmd", Command(type="command", action="lockdown", **stale))
    assert (rig.last().status, rig.last().reason) == ("refused", "expired")
    assert mode(rig) is Mode.NORMAL
    rig.send("hb", heartbeat(rig, 1, 1))
    assert rig.sent.resyncs == [(BEHIND_COMMAND, False)]
    again = Command(type="command", action="lockdown", **rig.header(1))
    rig.send("cmd", again)
    assert (rig.last().seq, rig.last().status) == (1, "applied")
    assert mode(rig) is Mode.LOCKDOWN
    rig.send("cmd", again)
    assert (rig.last().status, rig.last().reason) == ("refused", "replay")
    rig.send("cmd", Command(type="command", action="normal", **rig.header(2)))
    rig.send("cmd", again)
    assert (rig.last().seq, rig.last().reason) == (1, "rollback")
    assert mode(rig) is Mode.NORMAL
    assert rig.applier.versions()["cmd"] == 2


def test_the_first_batch_after_a_pruned_event_carries_the_chain_anchor(
        broker: Broker, tmp_path: Path) -> None:
    """Once the gateway pruned the events before its oldest unacknowledged one, the batch
    starting there carries the anchor (seq and hash of the newest pruned event) that the
    first event's ``prev_hash`` links to."""
    office = HandOffice(broker, tmp_path)
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", broker, office.trusted)
    gateway.agent.start()
    store = gateway.agent.store
    assert store is not None
    try:
        office.wait("status", lambda b: b["state"] == "online", "the gateway online")
        gateway.tap(CARD_A)
        office.wait("events", lambda b: any(e["kind"] == "access_denied"
                                            for e in b["events"]), "the tap's event")
        office.send("ack", EventAck(type="event_ack", upto=store.last_seq(),
                                    **office.header("ack")))
        wait_for(lambda: store.first_unacked() is None, "every event acknowledged")
        store.prune(retention_days=3650, max_events=0, keep_unacked=True)
        anchor_seq = int(store.meta("chain_anchor_seq") or 0)
        assert anchor_seq > 0
        gateway.tap(CARD_A)
        batch = office.wait("events", lambda b: b["events"][0]["seq"] == anchor_seq + 1,
                            "the batch after the anchor")
        assert batch["anchor_seq"] == anchor_seq
        assert batch["anchor_hash"] == store.meta("chain_anchor_hash")
        assert batch["events"][0]["prev_hash"] == batch["anchor_hash"]
    finally:
        gateway.agent.stop()
        office.close()


# -- the office -------------------------------------------------------------------------


@dataclass
class OfficeFolder:
    """A central folder with keys and the gateways gw1 and gw2, on the test broker."""

    folder: Path
    broker: Broker
    keys: dict[str, Ed25519PublicKey]

    def central(self, **options: Any) -> Central:
        """A new ``Central`` on this folder and broker."""
        return Central(self.folder, self.broker.host, self.broker.port, **options)


@pytest.fixture
def office(tmp_path: Path, broker: Broker) -> OfficeFolder:
    """Keys made by ``keygen``, gw1 and gw2 registered."""
    folder = tmp_path / "central"
    keygen(folder)
    with Central(folder, broker.host, broker.port) as central:
        for gateway in ("gw1", "gw2"):
            central.add_gateway(gateway, f"site-{gateway}", os.urandom(32))
    return OfficeFolder(folder, broker, load_trusted_keys(folder / TRUSTED_KEYS_NAME))


def next_body(peer: GatewayPeer, keys: dict[str, Ed25519PublicKey]) -> tuple[str, dict[
        str, Any]]:
    """The next message for ``peer``: its topic kind and its verified body as sent."""
    topic, payload = peer.next()
    return topic.rsplit("/", 1)[-1], json.loads(open_envelope(payload, topic, keys,
                                                              MAX_BYTES))


def resync(peer: GatewayPeer, reason: str) -> None:
    """Publish a resync request from ``peer``'s gateway."""
    peer.send("request", {"type": "resync", "gateway": peer.gateway, "reason": reason,
                          "list_version": 0, "rev_seq": 0, "all_seq": 0, "ts_ms": 0})


def test_heartbeats_name_the_latest_command_the_office_sent(office: OfficeFolder) -> None:
    """Before any command a heartbeat carries no ``cmd_seq``; after two commands it
    names the second's seq."""
    peer = GatewayPeer(office.broker, "gw1")
    try:
        with office.central() as central:
            central.heartbeat("gw1")
            central.command("gw1", "lockdown")
            second = central.command("gw1", "status")
            central.heartbeat("gw1")
        kinds = [next_body(peer, office.keys) for _ in range(4)]
        assert [k for k, _ in kinds] == ["hb", "cmd", "cmd", "hb"]
        assert "cmd_seq" not in kinds[0][1]
        assert kinds[3][1]["cmd_seq"] == second
    finally:
        peer.close()


def test_behind_command_is_answered_with_the_latest_commands_under_their_own_seqs(
        office: OfficeFolder) -> None:
    """A ``behind_command`` request brings the latest mode command and the latest command
    again, in seq order, same seqs and actions, signed anew and not yet expired, and no
    snapshot; what the gateway's status says it applied is left out; a gateway that was
    sent no command gets nothing."""
    peer, other = GatewayPeer(office.broker, "gw1"), GatewayPeer(office.broker, "gw2")
    try:
        with office.central() as central:
            first = central.command("gw1", "lockdown")
            second = central.command("gw1", "status")
        originals = [next_body(peer, office.keys)[1] for _ in range(2)]
        serving = Serving(office.central(resync_interval_s=0.0))
        try:
            resync(peer, BEHIND_COMMAND)
            again = [next_body(peer, office.keys) for _ in range(2)]
            assert [(k, b["seq"], b["action"]) for k, b in again] == [
                ("cmd", first, "lockdown"), ("cmd", second, "status")]
            for (_, body), original in zip(again, originals, strict=True):
                assert body["expires_at"] >= original["expires_at"] > time.time()
            peer.send("status", {"type": "status", "gateway": "gw1", "state": "online",
                                 "versions": {"cmd": first}})
            resync(peer, BEHIND_COMMAND)
            kind, body = next_body(peer, office.keys)
            assert (kind, body["seq"], body["action"]) == ("cmd", second, "status")
            resync(other, BEHIND_COMMAND)
            resync(other, "gap")
            kind, body = next_body(other, office.keys)
            assert kind == "list" and Snapshot.model_validate(body).seq > 0
        finally:
            serving.stop()
    finally:
        peer.close()
        other.close()


def test_a_batch_anchor_checks_the_first_link_when_nothing_precedes_it(
        office: OfficeFolder, tmp_path: Path) -> None:
    """Events whose predecessor the gateway pruned are stored without a chain problem when
    their batch's anchor matches the first ``prev_hash``, and with one naming the anchor
    when it does not."""
    store = Store(tmp_path / "gw-events.db")
    try:
        for n in range(6):
            store.append(Event("access_granted", door="front", reader="front-in",
                               direction="entry", reason="granted", cred=f"{n:010x}"))
        store.mark_acked(3)
        store.prune(retention_days=3650, max_events=0, keep_unacked=True)
        anchor = (int(store.meta("chain_anchor_seq") or 0),
                  store.meta("chain_anchor_hash") or "")
        assert anchor[0] == 3
        events = store.events(after_seq=3)
    finally:
        store.close()
    good = EventBatch.model_validate_json(fit_batch("gw1", events, MAX_BYTES,
                                                    anchor=anchor)[0])
    forged = EventBatch.model_validate_json(fit_batch("gw2", events, MAX_BYTES,
                                                      anchor=(3, "f" * 64))[0])
    with office.central() as central:
        assert central.store_events("gw1", good).problems == ()
        problems = central.store_events("gw2", forged).problems
        assert problems == ("seq 4: prev_hash does not match the chain anchor (seq 3) "
                            "the gateway sent",)
        assert central.gateway_report("gw1")["chain_problems"] == []


# -- both -------------------------------------------------------------------------------


def test_a_command_lost_on_the_way_is_recovered_from_the_heartbeat(
        broker: Broker, tmp_path: Path) -> None:
    """A lockdown published while no session of the gateway existed is lost; the office's
    next heartbeat names it, the gateway asks for it, and the office's answer puts the
    gateway in lockdown, reported applied under the command's own seq."""
    folder = tmp_path / "central"
    keygen(folder)
    with Central(folder, broker.host, broker.port) as central:
        central.add_gateway(GW, "b-1", KEY)
        central.enroll(GW, CARD_A, "P-301")
        seq = central.command(GW, "lockdown")  # no subscriber yet: dropped
    serving = Serving(Central(folder, broker.host, broker.port, resync_interval_s=0.5),
                      heartbeat_every_s=1.0)
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", broker, folder / TRUSTED_KEYS_NAME)
    gateway.agent.start()
    try:
        wait_for(lambda: gateway.versions().get("cmd") == seq, "the command applied")
        assert gateway.agent.policy.mode is Mode.LOCKDOWN
        wait_for(lambda: serving.central.gateway_report(GW)["applied"].get("cmd"),
                 "the command reported applied")
        applied = serving.central.gateway_report(GW)["applied"]["cmd"]
        assert (applied["seq"], applied["status"]) == (seq, "applied")
    finally:
        gateway.agent.stop()
        serving.stop()
