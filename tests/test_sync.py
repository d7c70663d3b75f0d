"""The agent's MQTT sync against a real mosquitto, with the office played message by message.

The office side here signs with ``protocol.signing.sign`` directly, so each test controls exactly
what is sent (forged, replayed, expired, out of order). tests/test_central.py and
tests/test_sync_faults.py run the real ``permitgate-central`` tool instead.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel

from agent.cli import status_report
from agent.decision import Decision, Mode, Reason
from agent.runtime import Agent, ReadTiming
from drivers.simulated import SimBus
from protocol.hashing import CredentialHasher
from protocol.messages import (
    Chunk,
    Command,
    Delta,
    Entry,
    EventAck,
    Heartbeat,
    Revocation,
    Revoked,
    Snapshot,
    chunk_digest,
)
from protocol.signing import b64, sign
from protocol.topics import Topics
from tests.agentconf import KEY, DoorSpec, ReaderSpec, agent_config
from tests.broker import Broker
from tests.conftest import wait_for

GW = "gw-1"
CARD_A = "em4100:67003B51C6"
CARD_B = "em4100:67003BA86C"
CARD_C = "em4100:1122334455"
PERMIT_A = b"P" * 32
HASHER = CredentialHasher(KEY)


class Office:
    """A hand-driven central office: signs messages and watches what the gateway sends."""

    def __init__(self, broker: Broker, folder: Path) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.kid = "office-1"
        raw = self.key.public_key().public_bytes_raw()
        self.trusted = folder / "trusted-keys.txt"
        self.trusted.write_text(f"{self.kid} {base64.b64encode(raw).decode()}\n")
        self.topics = Topics(GW)
        self.received: dict[str, list[dict[str, Any]]] = {}
        self.inbox: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id="office", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(f"pg/v1/gw/{GW}/out/#", qos=1)
        assert subscribed.wait(10)
        self.seq: dict[str, int] = {}

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        body = json.loads(message.payload)
        self.received.setdefault(kind, []).append(body)
        self.inbox.put((kind, body))

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    def send(self, kind: str, body: BaseModel, *, key: Ed25519PrivateKey | None = None,
             kid: str | None = None, topic: str | None = None) -> None:
        """Sign ``body`` and publish it on the gateway's ``kind`` topic."""
        target = topic or (self.topics.broadcast_revocations if kind == "all"
                           else self.topics.inbound(kind))
        payload = sign(key or self.key, kid or self.kid, target, body)
        self.publish_raw(target, payload)

    def publish_raw(self, topic: str, payload: bytes) -> None:
        """Publish bytes as they are."""
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def header(self, stream: str, *, seq: int | None = None, ttl: int = 3600,
               issued: int | None = None, gateway: str = GW) -> dict[str, Any]:
        """Common header fields with the stream's next seq (or ``seq``)."""
        if seq is None:
            seq = self.seq.get(stream, 0) + 1
        self.seq[stream] = max(self.seq.get(stream, 0), seq)
        now = int(time.time()) if issued is None else issued
        return {"gateway": gateway, "seq": seq, "issued_at": now, "expires_at": now + ttl}

    def snapshot(self, cards: list[str], *, chunk_size: int = 2, revoked: list[Revoked]
                 | None = None, version: int | None = None, confirmed: int | None = None
                 ) -> None:
        """Publish a whole list in chunks, manifest first."""
        entries = [Entry(cred=b64(HASHER.credential(c)),
                         permit=b64(PERMIT_A) if c == CARD_A else None, confirmed_at=confirmed)
                   for c in cards]
        revoked = revoked or []
        version = version or self.seq.get("list", 0) + 1
        chunks = [entries[i:i + chunk_size] for i in range(0, len(entries), chunk_size)] \
            or [[]]
        payloads = [Chunk(type="chunk", version=version, index=i, entries=part,
                          revoked=revoked if i == 0 else []).model_dump_json().encode()
                    for i, part in enumerate(chunks)]
        manifest = Snapshot(type="snapshot", entries=len(entries), revoked=len(revoked),
                            chunk_sha256=[chunk_digest(p) for p in payloads],
                            rev_seq=self.seq.get("rev", 0), all_seq=self.seq.get("all", 0),
                            **self.header("list", seq=version))
        self.send("list", manifest)
        for payload in payloads:
            self.publish_raw(self.topics.inbound("list"), payload)

    def wait(self, kind: str, match: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = 15.0) -> dict[str, Any]:
        """Wait for a message of ``kind`` from the gateway that ``match`` accepts."""
        def found() -> dict[str, Any] | None:
            return next((b for b in list(self.received.get(kind, [])) if match(b)), None)

        return wait_for(found, lambda: f"{what}; got {self.received}", timeout)


class Gateway:
    """An in-process agent with sync enabled, a simulated reader and relay."""

    def __init__(self, folder: Path, broker: Broker, trusted: Path, **sync: Any) -> None:
        self.config = agent_config(
            folder, site_id="b-1", gateway_id=GW,
            sync={"enabled": True, "host": broker.host, "port": broker.port, "tls": False,
                  "trusted_keys": str(trusted), "status_interval_s": 1,
                  "ack_timeout_s": 2.0, "resync_interval_s": 1, **sync},
            doors=(DoorSpec(unlock_s=0.2),), readers=(ReaderSpec(debounce_s=0),))
        self.bus = SimBus()
        self.decisions: list[Decision] = []
        self.agent = Agent(self.config, bus=self.bus)
        self.agent.on_decision = self._collect

    def _collect(self, _r: Any, decision: Decision, _t: ReadTiming) -> None:
        self.decisions.append(decision)

    def tap(self, card: str) -> Decision:
        """Present ``card`` and return the decision."""
        count = len(self.decisions)
        self.bus.tap("front-in", card)
        wait_for(lambda: len(self.decisions) > count, "a decision")
        return self.decisions[count]

    def kinds(self) -> list[str]:
        """Kinds of the stored events."""
        store = self.agent.store
        assert store is not None
        return [e.kind for e in store.events()]

    def versions(self) -> dict[str, int]:
        """Applied stream versions."""
        assert self.agent.store is not None
        return self.agent.store.versions()


@pytest.fixture
def office(broker: Broker, tmp_path: Path) -> Iterator[Office]:
    """The hand-driven office on the test broker."""
    o = Office(broker, tmp_path)
    try:
        yield o
    finally:
        o.close()


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def make_gateway(broker: Broker, office: Office, tmp_path: Path) -> Iterator[GatewayFactory]:
    """Starts gateways (stopped at teardown) that trust ``office``."""
    started: list[Gateway] = []

    def make(**sync: Any) -> Gateway:
        folder = tmp_path / f"gw{len(started)}"
        folder.mkdir()
        gw = Gateway(folder, broker, office.trusted, **sync)
        gw.agent.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.agent.stop()


def online(office: Office) -> None:
    """Wait for the gateway's online status."""
    office.wait("status", lambda b: b["state"] == "online", "the gateway online")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_snapshot_in_chunks_is_applied_and_acknowledged(make_gateway: GatewayFactory,
                                                        office: Office, protocol: str) -> None:
    """Over MQTT 5 and 3.1.1 alike, a signed manifest and its chunks replace the list
    atomically; the gateway reports the version applied, and the cards are then decided
    from it."""
    gw = make_gateway(protocol=protocol)
    online(office)
    office.wait("request", lambda b: b["reason"] == "no_list", "a first resync request")
    office.snapshot([CARD_A, CARD_B, CARD_C], chunk_size=2)
    office.wait("applied", lambda b: b["stream"] == "list" and b["status"] == "applied",
                "the snapshot applied")
    assert gw.versions()["list"] == 1
    assert gw.tap(CARD_A).granted
    assert gw.tap("em4100:0000000001").reason is Reason.UNKNOWN_CARD
    assert "snapshot_applied" in gw.kinds()


def test_permit_revocation_stops_the_card_and_is_acknowledged(
        make_gateway: GatewayFactory, office: Office) -> None:
    """A signed broadcast revocation of a permit stops every card of it at once, and the
    gateway tells the office it applied that seq."""
    gw = make_gateway()
    online(office)
    office.snapshot([CARD_A, CARD_B])
    office.wait("applied", lambda b: b["stream"] == "list", "the snapshot")
    assert gw.tap(CARD_A).granted
    office.send("all", Revocation(type="revocation", items=[
        Revoked(kind="permit", hash=b64(PERMIT_A))], **office.header("all", gateway="*")))
    office.wait("applied", lambda b: b["stream"] == "all" and b["seq"] == 1,
                "the revocation applied")
    assert gw.tap(CARD_A) == Decision(False, Reason.REVOKED)
    assert gw.tap(CARD_B).granted


def refusal_cases(office: Office) -> list[tuple[str, Callable[[], None]]]:
    """(reason, how to provoke it) for every kind of bad message."""
    other = Ed25519PrivateKey.generate()
    rev: dict[str, Any] = {"type": "revocation", "items": [Revoked(kind="credential",
                                                   hash=b64(HASHER.credential(CARD_B)))]}
    old = int(time.time()) - 7200
    return [
        ("bad_signature", lambda: office.send("rev", Revocation(
            **rev, **office.header("rev", seq=50)), key=other)),
        ("unknown_key", lambda: office.send("rev", Revocation(
            **rev, **office.header("rev", seq=51)), key=other, kid="stranger")),
        # Revocations are applied whatever their times (they only take access away):
        # the time checks are shown on commands.
        ("expired", lambda: office.send("cmd", Command(
            type="command", action="lockdown",
            **office.header("cmd", seq=52, issued=old, ttl=60)))),
        ("from_future", lambda: office.send("cmd", Command(
            type="command", action="lockdown",
            **office.header("cmd", seq=53, issued=int(time.time()) + 3600)))),
        ("wrong_target", lambda: office.send("rev", Revocation(
            **rev, **office.header("rev", seq=54, gateway="gw-2")))),
        ("wrong_stream", lambda: office.send("cmd", Revocation(
            **rev, **office.header("cmd", seq=55)))),
        ("malformed", lambda: office.publish_raw(office.topics.inbound("rev"),
                                                 b"\x00not json at all")),
        ("oversized", lambda: office.publish_raw(office.topics.inbound("rev"),
                                                 b"{" + b" " * 70_000 + b"}")),
        ("bad_signature", lambda: office.publish_raw(
            office.topics.inbound("rev"),
            sign(office.key, office.kid, office.topics.inbound("cmd"),  # signed for cmd
                 Revocation(**rev, **office.header("rev", seq=56))))),
    ]


def test_bad_messages_are_refused_counted_and_change_nothing(
        make_gateway: GatewayFactory, office: Office) -> None:
    """Forged, unknown-key, expired, future, misaddressed, misrouted, malformed, oversized
    and topic-swapped messages are each refused with their reason, reported to the office,
    counted, recorded, and nothing is applied; the agent keeps deciding."""
    gw = make_gateway(max_message_bytes=65_536)
    online(office)
    office.snapshot([CARD_B])
    office.wait("applied", lambda b: b["stream"] == "list", "the snapshot")
    for reason, provoke in refusal_cases(office):
        before = len([b for b in office.received.get("applied", [])
                      if b.get("reason") == reason])
        provoke()

        def refused(body: dict[str, Any], r: str = reason, n: int = before) -> bool:
            count = len([x for x in office.received["applied"] if x.get("reason") == r])
            return bool(body["status"] == "refused" and body["reason"] == r and count > n)

        office.wait("applied", refused, f"the {reason} refusal")
    assert gw.tap(CARD_B).granted
    assert gw.versions().get("rev", 0) == 0
    assert gw.agent.sync is not None
    counts = gw.agent.sync.counters.refused
    assert counts["bad_signature"] == 2 and counts["expired"] == 1
    assert "sync_refused" in gw.kinds()


def test_replay_and_rollback_are_refused(make_gateway: GatewayFactory,
                                        office: Office) -> None:
    """The same revocation sent twice, an older seq, an older snapshot and an old command
    are refused as replay or rollback and not applied again."""
    gw = make_gateway()
    online(office)
    office.snapshot([CARD_A, CARD_B], version=5)
    office.wait("applied", lambda b: b["stream"] == "list", "the snapshot")
    rev = Revocation(type="revocation", items=[Revoked(
        kind="credential", hash=b64(HASHER.credential(CARD_B)))], **office.header("rev", seq=3))
    office.send("rev", rev)
    office.wait("applied", lambda b: b["stream"] == "rev" and b["status"] == "applied",
                "the revocation")
    office.send("rev", rev)
    office.wait("applied", lambda b: b.get("reason") == "replay", "the replay refusal")
    office.send("rev", Revocation(type="revocation", items=rev.items,
                                  **office.header("rev", seq=2)))
    office.wait("applied", lambda b: b.get("reason") == "rollback", "the rollback refusal")
    office.snapshot([CARD_A, CARD_B, CARD_C], version=4)
    office.wait("applied", lambda b: b["stream"] == "list" and b.get("reason") == "rollback",
                "the old snapshot refused")
    assert gw.versions()["list"] == 5
    assert gw.tap(CARD_C).reason is Reason.UNKNOWN_CARD
    assert gw.tap(CARD_B).reason is Reason.REVOKED


def test_delta_on_the_wrong_base_is_refused_and_asks_for_a_resync(
        make_gateway: GatewayFactory, office: Office) -> None:
    """A delta on the current version applies; one that skips a version is refused as a
    gap and the gateway asks the office for a resync."""
    gw = make_gateway()
    online(office)
    office.snapshot([CARD_A])
    office.wait("applied", lambda b: b["stream"] == "list", "the snapshot")
    office.send("list", Delta(type="delta", base=1, upsert=[
        Entry(cred=b64(HASHER.credential(CARD_B)), doors=("front",))],
        **office.header("list", seq=2)))
    office.wait("applied", lambda b: b["stream"] == "list" and b["seq"] == 2, "delta 2")
    assert gw.tap(CARD_B).granted
    office.send("list", Delta(type="delta", base=3, remove=[b64(HASHER.credential(CARD_B))],
                              **office.header("list", seq=4)))
    office.wait("applied", lambda b: b.get("reason") == "gap", "the gap refusal")
    office.wait("request", lambda b: b["reason"] == "gap", "a resync request")
    assert gw.versions()["list"] == 2


def test_events_leave_the_outbox_only_when_acknowledged(make_gateway: GatewayFactory,
                                                        office: Office) -> None:
    """Events are sent in order with their hash chain; without an ack they are sent
    again after the ack timeout; a signed ack empties the outbox up to its seq."""
    gw = make_gateway()
    online(office)
    gw.tap(CARD_A)
    first = office.wait("events", lambda b: any(e["kind"] == "access_denied"
                                                for e in b["events"]), "a batch")
    seqs = [e["seq"] for e in first["events"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert all(len(e["hash"]) == 64 for e in first["events"])
    resent = office.wait("events", lambda b: b is not first and b["events"][0]["seq"] ==
                         seqs[0], "the batch again after the ack timeout")
    assert resent["events"][0]["event_id"] == first["events"][0]["event_id"]
    store = gw.agent.store
    assert store is not None
    upto = store.last_seq()
    office.send("ack", EventAck(type="event_ack", upto=upto, **office.header("ack")))
    def drained() -> bool:
        pending = store.first_unacked()
        return pending is None or pending > upto

    wait_for(drained, "the outbox to drain")


def test_commands_switch_modes_and_survive_a_restart(broker: Broker, office: Office,
                                                     tmp_path: Path) -> None:
    """A signed lockdown command denies every card, is acknowledged, and is still in
    force after the agent restarts, even when a status command came after it; a normal
    command lifts it."""
    folder = tmp_path / "gw"
    folder.mkdir()
    gw = Gateway(folder, broker, office.trusted)
    gw.agent.start()
    try:
        online(office)
        office.snapshot([CARD_A])
        office.wait("applied", lambda b: b["stream"] == "list", "the snapshot")
        office.send("cmd", Command(type="command", action="lockdown", **office.header("cmd")))
        office.wait("applied", lambda b: b["stream"] == "cmd", "the command applied")
        assert gw.tap(CARD_A).reason is Reason.LOCKDOWN
        office.send("cmd", Command(type="command", action="status", **office.header("cmd")))
        office.wait("applied", lambda b: b["stream"] == "cmd" and b["seq"] == 2,
                    "the status command applied")
    finally:
        gw.agent.stop()
    again = Gateway(folder, broker, office.trusted)
    again.agent.start()
    try:
        assert again.agent.policy.mode is Mode.LOCKDOWN
        assert again.tap(CARD_A).reason is Reason.LOCKDOWN
        office.send("cmd", Command(type="command", action="normal", **office.header("cmd")))
        wait_for(lambda: again.agent.policy.mode is Mode.NORMAL, "normal mode")
        assert again.tap(CARD_A).granted
    finally:
        again.agent.stop()


def test_stale_lists_raise_an_alarm_and_apply_the_offline_policy(
        make_gateway: GatewayFactory, office: Office) -> None:
    """Without a fresh heartbeat the gateway records sync_stale and, under recent_only,
    admits only recently confirmed permits; a heartbeat makes it fresh again."""
    gw = make_gateway(heartbeat_max_age_s=2, offline_policy="recent_only",
                      recent_window_h=1)
    online(office)
    now = int(time.time())
    office.snapshot([CARD_A], confirmed=now)
    office.wait("applied", lambda b: b["stream"] == "list", "the snapshot")
    office.send("list", Delta(type="delta", base=1, upsert=[
        Entry(cred=b64(HASHER.credential(CARD_B)), confirmed_at=now - 7200)],
        **office.header("list", seq=2)))
    office.wait("applied", lambda b: b["stream"] == "list" and b["seq"] == 2, "the delta")
    wait_for(lambda: "sync_stale" in gw.kinds(), "the stale alarm")
    assert gw.tap(CARD_A).granted
    assert gw.tap(CARD_B).reason is Reason.STALE_UNCONFIRMED
    office.send("hb", Heartbeat(type="heartbeat", list_version=2, rev_seq=0, all_seq=0,
                                **office.header("hb")))
    wait_for(lambda: "sync_fresh" in gw.kinds(), "fresh again")
    assert gw.tap(CARD_B).granted


def test_a_heartbeat_sends_an_unacknowledged_batch_again_at_once(
        make_gateway: GatewayFactory, office: Office) -> None:
    """A batch still unacknowledged when a heartbeat arrives (the office may have started
    after it was sent) goes again at once, not after the ack timeout."""
    make_gateway(ack_timeout_s=3600.0)
    online(office)
    first = office.wait("events", lambda b: True, "the first batch")
    office.send("hb", Heartbeat(type="heartbeat", list_version=0, rev_seq=0, all_seq=0,
                                **office.header("hb")))
    again = office.wait("events", lambda b: b is not first and b["events"][0]["seq"] ==
                        first["events"][0]["seq"], "the batch again after the heartbeat")
    assert again["events"] == first["events"]


def test_heartbeat_ahead_of_the_gateway_asks_for_a_resync(make_gateway: GatewayFactory,
                                                         office: Office) -> None:
    """A heartbeat saying the office is at a newer version than the gateway holds (a
    message was lost or blocked) makes the gateway ask for a resync."""
    make_gateway()
    online(office)
    office.snapshot([CARD_A])
    office.wait("applied", lambda b: b["stream"] == "list", "the snapshot")
    office.send("hb", Heartbeat(type="heartbeat", list_version=1, rev_seq=4, all_seq=0,
                                **office.header("hb")))
    office.wait("request", lambda b: b["reason"] == "behind_heartbeat", "a resync request")


def test_a_corrupted_chunk_aborts_the_snapshot_and_keeps_the_old_list(
        make_gateway: GatewayFactory, office: Office) -> None:
    """A chunk whose bytes do not match the manifest's hash aborts the snapshot: the old
    list stays in force, whole, and the gateway asks for a resync."""
    gw = make_gateway()
    online(office)
    office.snapshot([CARD_A])
    office.wait("applied", lambda b: b["stream"] == "list", "the first snapshot")
    entries = [Entry(cred=b64(HASHER.credential(c))) for c in (CARD_B, CARD_C)]
    good = Chunk(type="chunk", version=2, index=0, entries=entries).model_dump_json().encode()
    manifest = Snapshot(type="snapshot", entries=2, revoked=0,
                        chunk_sha256=[chunk_digest(good)], rev_seq=0, all_seq=0,
                        **office.header("list", seq=2))
    office.send("list", manifest)
    forged = good.replace(b'"index":0', b'"index":0 ')
    office.publish_raw(office.topics.inbound("list"), forged)
    office.wait("applied", lambda b: b.get("reason") == "bad_chunk", "the chunk refused")
    assert gw.versions()["list"] == 1
    assert gw.tap(CARD_A).granted
    assert gw.tap(CARD_B).reason is Reason.UNKNOWN_CARD


def test_permit_hash_lookup_uses_the_snapshot_permit(make_gateway: GatewayFactory,
                                                     office: Office) -> None:
    """A permit revocation inside a snapshot's revoked set stops the card that carries
    that permit hash."""
    gw = make_gateway()
    online(office)
    office.snapshot([CARD_A, CARD_B], revoked=[Revoked(kind="permit", hash=b64(PERMIT_A))])
    office.wait("applied", lambda b: b["stream"] == "list", "the snapshot")
    assert gw.tap(CARD_A).reason is Reason.REVOKED
    assert gw.tap(CARD_B).granted


def test_status_carries_settings_versions_and_refusals(make_gateway: GatewayFactory,
                                                       office: Office) -> None:
    """The retained status carries the settings the office must respect, every stream
    version (the ``mode`` and ``staging`` pseudo-streams included) and the refusal counts;
    ``status --json`` shows the same staleness, counts and versions."""
    gw = make_gateway(heartbeat_max_age_s=3600, batch_size=100)
    online(office)
    office.snapshot([CARD_A])
    office.wait("applied", lambda b: b["stream"] == "list", "the snapshot")
    office.send("cmd", Command(type="command", action="lockdown", **office.header("cmd")))
    office.wait("applied", lambda b: b["stream"] == "cmd", "the command applied")
    office.send("rev", Revocation(type="revocation", items=[Revoked(
        kind="credential", hash=b64(HASHER.credential(CARD_A)))], **office.header("rev")),
        key=Ed25519PrivateKey.generate())
    office.wait("applied", lambda b: b.get("reason") == "bad_signature", "the refusal")
    status = office.wait("status", lambda b: b["refused"] == {"bad_signature": 1}
                         and "mode" in b["versions"], "a status with the refusal")
    assert status["settings"] == {"heartbeat_max_age_s": 3600,
                                  "max_message_bytes": 4 * 1024 * 1024, "batch_size": 100}
    assert status["versions"] == {"list": 1, "staging": 1, "rev": 0, "all": 0, "cmd": 1,
                                  "mode": 1}
    assert status["stale"] is False and status["mode"] == "lockdown"
    store = gw.agent.store
    assert store is not None

    def report() -> dict[str, Any]:
        return dict(status_report(gw.config, store)["sync"])

    wait_for(lambda: report()["refused"] == {"bad_signature": 1}, "the count recorded")
    shown = report()
    assert shown["stale"] is False and shown["link"] == "connected"
    assert shown["versions"] == status["versions"]
    assert shown["heartbeat_max_age_s"] == 3600
