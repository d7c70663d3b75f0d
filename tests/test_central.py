"""Tests for the central office, :mod:`provisioning.central` and ``permitgate-central``.

Everything runs against a real Mosquitto (``broker`` fixture, tests/broker.py). The
gateway side is played by a raw paho client that checks every message the way a gateway
must: the envelope verifies against the ``trusted-keys.txt`` that ``keygen`` wrote (via
``agent.open_envelope``/``parse_central``), snapshot chunks hash to the manifest's
``chunk_sha256``. Events are made by the agent's own store (``agent.store.Store.append``),
so their hash chain is the real one.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.client import Client, ConnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.store import Store
from protocol.chain import Event
from protocol.hashing import CredentialHasher
from protocol.messages import (
    STREAM_TYPES,
    CentralBody,
    Chunk,
    Command,
    Delta,
    EventAck,
    EventBatch,
    Heartbeat,
    RefusedError,
    Revocation,
    Snapshot,
    chunk_digest,
    is_chunk,
    parse_central,
    parse_chunk,
)
from protocol.signing import b64, load_trusted_keys, open_envelope
from protocol.topics import Topics, stream_of
from provisioning.central import (
    PERMIT_KEY_NAME,
    TRUSTED_KEYS_NAME,
    Central,
    CentralUsageError,
    PublishError,
    keygen,
    permit_hash,
)
from provisioning.central_cli import main
from tests.broker import Broker

if TYPE_CHECKING:
    from tests.pg import OfficeDb

pytest_plugins = ("tests.pg",)  # office_db: the office runs on SQLite and on PostgreSQL

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 15.0
"""Upper bound for a message to arrive; a bound, not a measured expectation."""
MAX_BYTES = 16 * 1024 * 1024

CARDS = {
    "em4100:67003B51C6": "P-301",
    "em4100:67003BA86C": "P-302",
    "em4100:0102030405": "P-305",
}
OTHER_CARD = ("em4100:A1B2C3D4E5", "P-999")

CentralMessage = CentralBody


# -- helpers --------------------------------------------------------------------------


class FakeClock:
    """A settable ``clock`` (Unix seconds) for ``Central``."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Office:
    """A central folder with keys and two gateways, and the broker it talks to."""

    folder: Path
    broker: Broker
    site_keys: dict[str, bytes]
    keys: dict[str, Ed25519PublicKey]

    def central(self, **options: Any) -> Central:
        """A new ``Central`` on this folder and broker."""
        return Central(self.folder, self.broker.host, self.broker.port, **options)

    def cred(self, gateway: str, card: str) -> str:
        """The base64 credential hash a gateway's allowlist holds for ``card``."""
        return b64(CredentialHasher(self.site_keys[gateway]).credential(card))

    def permit(self, number: str) -> str:
        """The base64 permit hash, the same in every building."""
        key = bytes.fromhex((self.folder / PERMIT_KEY_NAME).read_text().strip())
        return b64(permit_hash(key, number))


@pytest.fixture
def office(tmp_path: Path, broker: Broker, office_db: OfficeDb) -> Iterator[Office]:
    """Keys made by ``keygen`` and gateways gw1 and gw2 registered, on each database."""
    folder = tmp_path / "central"
    keygen(folder)
    office_db.use(folder)
    site_keys = {"gw1": os.urandom(32), "gw2": os.urandom(32)}
    with Central(folder, broker.host, broker.port) as central:
        for gateway, key in site_keys.items():
            central.add_gateway(gateway, f"site-{gateway}", key)
    yield Office(folder, broker, site_keys,
                 load_trusted_keys(folder / TRUSTED_KEYS_NAME))


class GatewayPeer:
    """The gateway's side of the protocol: a raw paho client on its topics."""

    def __init__(self, broker: Broker, gateway: str) -> None:
        self.gateway = gateway
        self.topics = Topics(gateway)
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.raw: list[bytes] = []
        subscribed = threading.Event()
        self.client = Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"test-{gateway}-{uuid.uuid4().hex[:8]}",
                             protocol=MQTTProtocolVersion.MQTTv5)

        def on_connect(c: Client, _u: Any, _f: ConnectFlags, _rc: ReasonCode,
                       _p: Properties | None) -> None:
            c.subscribe([(self.topics.inbound("+"), 1), (self.topics.broadcast_revocations, 1)])

        def on_subscribe(_c: Client, _u: Any, _m: int, _codes: list[ReasonCode],
                         _p: Properties | None) -> None:
            subscribed.set()

        def on_message(_c: Client, _u: Any, msg: MQTTMessage) -> None:
            self.raw.append(bytes(msg.payload))
            self.inbox.put((msg.topic, bytes(msg.payload)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(WAIT_S), "the gateway peer was not subscribed"

    def next(self) -> tuple[str, bytes]:
        """The next message for this gateway (fails the test after ``WAIT_S``)."""
        try:
            return self.inbox.get(timeout=WAIT_S)
        except queue.Empty:
            pytest.fail(f"{self.gateway}: no message from the central office")

    def next_central(self, keys: dict[str, Ed25519PublicKey]) -> tuple[str, CentralMessage]:
        """The next message, verified and parsed as a signed central message."""
        topic, payload = self.next()
        assert not is_chunk(payload), f"unexpected chunk on {topic}"
        return topic, parse_central(open_envelope(payload, topic, keys, MAX_BYTES))

    def receive_snapshot(self, keys: dict[str, Ed25519PublicKey]
                         ) -> tuple[Snapshot, list[Chunk]]:
        """A manifest and its chunks, each chunk checked against the manifest's hash."""
        topic, manifest = self.next_central(keys)
        assert topic == self.topics.inbound("list")
        assert isinstance(manifest, Snapshot)
        chunks = []
        for index, digest in enumerate(manifest.chunk_sha256):
            topic, payload = self.next()
            assert topic == self.topics.inbound("list")
            assert is_chunk(payload)
            assert chunk_digest(payload) == digest
            chunk = parse_chunk(payload, MAX_BYTES)
            assert (chunk.version, chunk.index) == (manifest.seq, index)
            chunks.append(chunk)
        return manifest, chunks

    def send(self, kind: str, body: dict[str, Any] | bytes) -> None:
        """Publish on this gateway's outbound topic ``kind`` (QoS 1, acknowledged)."""
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_raw(self.topics.outbound(kind), payload)

    def send_raw(self, topic: str, payload: bytes) -> None:
        """Publish ``payload`` on any topic (QoS 1, acknowledged by the broker)."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers(office: Office) -> Iterator[Callable[[str], GatewayPeer]]:
    """Gateway peers on demand, all closed at teardown."""
    made: list[GatewayPeer] = []

    def make(gateway: str) -> GatewayPeer:
        peer = GatewayPeer(office.broker, gateway)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


class Serving:
    """``Central.run`` in a thread; ``stop`` re-raises anything it raised."""

    def __init__(self, central: Central, **options: Any) -> None:
        self.central = central
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, kwargs=options, daemon=True)
        self._thread.start()
        assert central.subscribed.wait(WAIT_S), "central did not subscribe"

    def _run(self, **options: Any) -> None:
        try:
            self.central.run(self._stop, **options)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self._error = exc

    def stop(self) -> None:
        """Stop the loop, wait for it, close the central."""
        self._stop.set()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "run() did not return"
        self.central.close()
        if self._error is not None:
            raise self._error


@pytest.fixture
def serving(office: Office) -> Iterator[Callable[..., Central]]:
    """Starts ``Central.run`` in a thread on demand; stopped at teardown."""
    loops: list[Serving] = []

    def start(**options: Any) -> Central:
        run_options = {k: options.pop(k) for k in ("heartbeat_every_s",) if k in options}
        loop = Serving(office.central(**options), **run_options)
        loops.append(loop)
        return loop.central

    yield start
    for loop in loops:
        loop.stop()


def make_events(tmp_path: Path, count: int) -> list[dict[str, Any]]:
    """``count`` events with a valid hash chain, as the agent's store writes them."""
    store = Store(tmp_path / f"gw-events-{uuid.uuid4().hex[:6]}.db")
    try:
        events = [store.append(Event("access_granted", door="front", reader="front-in",
                                     direction="entry", reason="granted",
                                     cred=f"{n:010x}", data={"n": n}))
                  for n in range(count)]
    finally:
        store.close()
    return [e.as_dict() for e in events]


def batch(gateway: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    """An ``events`` message body."""
    body = {"type": "events", "gateway": gateway, "events": events}
    EventBatch.model_validate(body)  # the test sends only well-formed batches
    return body


def wait_ack(peer: GatewayPeer, keys: dict[str, Ed25519PublicKey]) -> EventAck:
    """The next message, which must be a verified event ack."""
    topic, ack = peer.next_central(keys)
    assert topic == peer.topics.inbound("ack")
    assert isinstance(ack, EventAck)
    return ack


def run_cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    """``permitgate-central ARGS`` as a separate process."""
    done = subprocess.run([sys.executable, "-m", "provisioning.central_cli", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    if check is not None:
        assert done.returncode == check, done.stderr
    return done


# -- keys -----------------------------------------------------------------------------


def test_keygen_writes_a_private_key_a_trusted_line_and_never_overwrites(tmp_path: Path
                                                                        ) -> None:
    """keygen writes a 0600 PEM key and a trusted-keys line gateways can load, refuses a
    key id twice, and keeps the permit key when a second signing key is added."""
    folder = tmp_path / "c"
    first = keygen(folder)
    assert stat.S_IMODE(first.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.permit_key.stat().st_mode) == 0o600
    assert first.permit_key_created
    keys = load_trusted_keys(folder / TRUSTED_KEYS_NAME)
    assert list(keys) == [first.kid]
    permit_key = first.permit_key.read_bytes()
    with pytest.raises(CentralUsageError, match="listed already"):
        keygen(folder)
    second = keygen(folder, "central-2")
    assert not second.permit_key_created
    assert first.permit_key.read_bytes() == permit_key
    assert list(load_trusted_keys(folder / TRUSTED_KEYS_NAME)) == ["central-1",
                                                                         "central-2"]
    with pytest.raises(CentralUsageError, match="--kid"):
        keygen(folder, "bad id")


def test_permit_hash_is_the_same_construction_in_every_building(office: Office) -> None:
    """A permit hashes under the office permit key with the agent's construction, trimmed
    and upper-cased, independent of the building's site key."""
    key = bytes.fromhex((office.folder / PERMIT_KEY_NAME).read_text().strip())
    assert permit_hash(key, " p-301 ") == CredentialHasher(key).permit("P-301")
    assert permit_hash(key, "P-301") != CredentialHasher(office.site_keys["gw1"]).permit(
        "P-301")


# -- publishing -----------------------------------------------------------------------


def test_snapshot_chunks_match_the_manifest_and_carry_exactly_the_enrolled_hashes(
        office: Office, peers: Callable[[str], GatewayPeer]) -> None:
    """A snapshot's chunks hash to the signed manifest and carry exactly this gateway's
    entries and revocations (its own and the broadcast ones), as hashes only."""
    gw1 = peers("gw1")
    with office.central() as central:
        for card, permit in CARDS.items():
            central.enroll("gw1", card, permit, valid_from=1_700_000_000,
                           valid_until=1_900_000_000, doors=["front", "back"],
                           schedule="tenants")
        central.enroll("gw2", *OTHER_CARD)
        central.remove("gw1", "em4100:0102030405")
        central.enroll("gw1", "em4100:0102030405", "P-305")  # re-enrolled, every door
        rev_seq = central.revoke_card("gw1", "em4100:67003BA86C")
        all_seq = central.revoke_permit("P-777")
        version = central.publish_snapshot("gw1", chunk_entries=2)
    _, rev = gw1.next_central(office.keys)
    _, broadcast = gw1.next_central(office.keys)
    assert isinstance(rev, Revocation) and rev.gateway == "gw1"
    assert (rev.seq, rev.prev_seq) == (rev_seq, 0)
    assert isinstance(broadcast, Revocation) and broadcast.gateway == "*"
    assert (broadcast.seq, broadcast.prev_seq) == (all_seq, 0)
    manifest, chunks = gw1.receive_snapshot(office.keys)
    assert manifest.seq == version
    assert (manifest.gateway, manifest.rev_seq, manifest.all_seq) == ("gw1", rev_seq, all_seq)
    assert len(chunks) == 2
    entries = [e for c in chunks for e in c.entries]
    assert manifest.entries == len(entries) == 3
    expected = [
        (office.cred("gw1", "em4100:67003B51C6"), office.permit("P-301"), 1_700_000_000,
         1_900_000_000, ["front", "back"], "tenants"),
        (office.cred("gw1", "em4100:67003BA86C"), office.permit("P-302"), 1_700_000_000,
         1_900_000_000, ["front", "back"], "tenants"),
        (office.cred("gw1", "em4100:0102030405"), office.permit("P-305"), None, None, None,
         None),
    ]
    assert sorted(json.dumps(json.loads(e.model_dump_json())[:6]) for e in entries) == sorted(
        json.dumps(e) for e in expected)
    assert all(isinstance(e.confirmed_at, int) for e in entries)
    revoked = {(r.kind, r.hash) for c in chunks for r in c.revoked}
    assert revoked == {("credential", office.cred("gw1", "em4100:67003BA86C")),
                       ("permit", office.permit("P-777"))}
    assert manifest.revoked == 2
    secrets_in_clear = [*CARDS, *CARDS.values(), *OTHER_CARD, "P-777", "67003B51C6"]
    for payload in gw1.raw:
        for secret in secrets_in_clear:
            assert secret.encode() not in payload
            assert secret.lower().encode() not in payload


def test_every_message_verifies_and_no_seq_is_reused_across_a_restart(
        office: Office, peers: Callable[[str], GatewayPeer]) -> None:
    """Snapshots, deltas, revocations, commands and heartbeats verify for their own topic
    only, and a new Central on the same folder continues every stream's numbering."""
    gw1 = peers("gw1")
    seen: dict[str, list[int]] = {}

    def round_of_messages(central: Central) -> None:
        central.enroll("gw1", "em4100:67003B51C6", "P-301")
        central.publish_snapshot("gw1")
        central.publish_delta("gw1", upsert=["em4100:67003B51C6"],
                              remove=["em4100:0102030405"])
        central.revoke_permit("P-1", "gw1")
        central.revoke_permit("P-2")
        central.command("gw1", "lockdown")
        central.heartbeat("gw1")

    for _restart in range(2):
        with office.central() as central:
            round_of_messages(central)
        for _ in range(6):
            topic, payload = gw1.next()
            stream = stream_of(topic, "gw1")
            assert stream is not None
            body = open_envelope(payload, topic, office.keys, MAX_BYTES)
            message = parse_central(body)
            assert message.type in STREAM_TYPES[stream]
            assert message.gateway == ("*" if stream == "all" else "gw1")
            assert message.issued_at <= time.time() < message.expires_at
            other = Topics("gw2").inbound(stream) if stream != "all" else topic + "x"
            with pytest.raises(RefusedError, match="bad_signature"):
                open_envelope(payload, other, office.keys, MAX_BYTES)
            if isinstance(message, Snapshot):
                for _chunk in message.chunk_sha256:
                    assert is_chunk(gw1.next()[1])
            if isinstance(message, Delta):
                assert message.base == seen["list"][-1]
                assert message.upsert[0].cred == office.cred("gw1", "em4100:67003B51C6")
                assert message.remove == [office.cred("gw1", "em4100:0102030405")]
            if isinstance(message, Revocation):
                assert message.prev_seq == seen.get(stream, [0])[-1]
            if isinstance(message, Heartbeat):
                assert (message.list_version, message.rev_seq, message.all_seq) == (
                    seen["list"][-1], seen["rev"][-1], seen["all"][-1])
                assert message.expires_at - message.issued_at == 3600
            seen.setdefault(stream, []).append(message.seq)
    assert {stream: len(seqs) for stream, seqs in seen.items()} == {
        "list": 4, "rev": 2, "all": 2, "cmd": 2, "hb": 2}
    assert all(seqs == sorted(set(seqs)) for seqs in seen.values())


def test_an_unreachable_broker_spends_no_sequence_number(office: Office,
                                                         peers: Callable[[str], GatewayPeer]
                                                         ) -> None:
    """A one-shot publish that cannot connect fails with PublishError before allocating
    a version, so the next successful snapshot, at the same time, gets the version that
    time gives (one spent would have made it one more)."""
    clock = FakeClock()
    port = office.broker.port
    office.broker.stop()
    with office.central(connect_timeout_s=2.0, clock=clock) as central, pytest.raises(
            PublishError, match=f"{port}"):
        central.publish_snapshot("gw1")
    office.broker.start()
    gw1 = peers("gw1")
    with office.central(clock=clock) as central:
        assert central.publish_snapshot("gw1") == int(clock.now * 1000)
    manifest, _ = gw1.receive_snapshot(office.keys)
    assert manifest.seq == int(clock.now * 1000)


# -- receiving ------------------------------------------------------------------------


def test_events_are_stored_once_and_acked_only_up_to_the_contiguous_seq(
        office: Office, peers: Callable[[str], GatewayPeer],
        serving: Callable[..., Central], tmp_path: Path) -> None:
    """Duplicate and overlapping batches store each event once; the signed ack covers
    the highest contiguous seq (1-5 then 8-9: 5; then 6-7: 9), with increasing seqs."""
    gw1 = peers("gw1")
    central = serving()
    events = make_events(tmp_path, 9)
    acks = []
    for first, last, upto in ((1, 5, 5), (1, 5, 5), (8, 9, 5), (6, 7, 9), (4, 9, 9)):
        gw1.send("events", batch("gw1", events[first - 1:last]))
        ack = wait_ack(gw1, office.keys)
        assert ack.upto == upto, (first, last)
        acks.append(ack.seq)
    assert acks == sorted(set(acks))
    stored = central.events("gw1")
    assert [e["seq"] for e in stored] == list(range(1, 10))
    assert [e["hash"] for e in stored] == [e["hash"] for e in events]
    report = central.gateway_report("gw1")
    assert report["events"] == {"stored": 9, "highest_seq": 9, "acked_upto": 9}
    assert report["chain_problems"] == []


def test_a_tampered_prev_hash_is_recorded_as_a_chain_problem(
        office: Office, peers: Callable[[str], GatewayPeer],
        serving: Callable[..., Central], tmp_path: Path) -> None:
    """A broken link and a seq resent with other contents are recorded as chain problems
    (never dropped silently), and the events are still stored and acknowledged."""
    gw1 = peers("gw1")
    central = serving()
    events = make_events(tmp_path, 4)
    events[2] = {**events[2], "prev_hash": "f" * 64}
    gw1.send("events", batch("gw1", events[:3]))
    assert wait_ack(gw1, office.keys).upto == 3
    forged = {**events[1], "reason": "forced", "hash": "e" * 64}
    gw1.send("events", batch("gw1", [forged, events[3]]))
    assert wait_ack(gw1, office.keys).upto == 4
    problems = central.gateway_report("gw1")["chain_problems"]
    by_seq = {(p["seq"], p["problem"].split(" (")[0]) for p in problems}
    assert (3, "prev_hash does not match the hash of seq 2") in by_seq
    assert (3, "contents do not match the event's hash") in by_seq
    assert (2, "received again with different contents") in by_seq
    assert all(p["seq"] in (2, 3) for p in problems)
    assert central.events("gw1")[1]["reason"] == "granted"  # the first copy stays


def test_a_resync_request_yields_a_snapshot_at_most_once_per_interval(
        office: Office, peers: Callable[[str], GatewayPeer],
        serving: Callable[..., Central], tmp_path: Path) -> None:
    """A resync request is answered with a fresh snapshot; a second one within 10 s is
    deferred until the interval has passed, then answered."""
    clock = FakeClock()
    gw1 = peers("gw1")
    central = serving(clock=clock)
    central.enroll("gw1", "em4100:67003B51C6", "P-301")
    request = {"type": "resync", "gateway": "gw1", "reason": "gap", "list_version": 0,
               "rev_seq": 0, "all_seq": 0, "ts_ms": 0}
    gw1.send("request", request)
    manifest, chunks = gw1.receive_snapshot(office.keys)
    first = manifest.seq
    assert manifest.entries == 1
    assert chunks[0].entries[0].cred == office.cred("gw1", "em4100:67003B51C6")
    gw1.send("request", {**request, "reason": "again"})
    # An event batch is handled after the request (one worker, in order): its ack comes
    # before any second snapshot if, and only if, that snapshot was deferred.
    gw1.send("events", batch("gw1", make_events(tmp_path, 1)))
    wait_ack(gw1, office.keys)
    assert gw1.inbox.empty()
    clock.now += 10.5
    manifest, _ = gw1.receive_snapshot(office.keys)
    assert manifest.seq > first
    resync = central.gateway_report("gw1")["resync"]
    assert resync["reason"] == "again" and resync["answered_ms"] is not None


def test_status_applied_and_malformed_messages_are_recorded(
        office: Office, peers: Callable[[str], GatewayPeer],
        serving: Callable[..., Central], tmp_path: Path) -> None:
    """Status and applied reports are stored per gateway; malformed messages and messages
    from unknown gateways are counted and the loop goes on serving."""
    gw1 = peers("gw1")
    central = serving()
    gw1.send("status", {"type": "status", "gateway": "gw1", "state": "online",
                        "versions": {"list": 0, "rev": 0, "all": 0}})
    gw1.send("applied", {"type": "applied", "gateway": "gw1", "stream": "list", "seq": 3,
                         "status": "refused", "reason": "gap", "list_version": 2,
                         "ts_ms": 1})
    gw1.send("events", b"{not json")
    gw1.send("events", json.dumps(batch("gw2", make_events(tmp_path, 1))).encode())
    gw1.send("gossip", b"{}")
    gw1.send_raw(Topics("gw-unknown").outbound("events"), b"{}")
    gw1.send("events", batch("gw1", make_events(tmp_path, 1)))
    assert wait_ack(gw1, office.keys).upto == 1
    report = central.gateway_report("gw1")
    assert report["online"] is True
    assert report["list"]["applied"] == 2 and report["list"]["current"] is False
    assert report["applied"]["list"]["status"] == "refused"
    assert report["applied"]["list"]["reason"] == "gap"
    assert report["malformed"] == 3
    assert central.report()["unknown_gateway_messages"] == 1
    assert central.malformed == 4


def test_serve_sends_every_gateway_a_heartbeat_once_connected(
        office: Office, peers: Callable[[str], GatewayPeer],
        serving: Callable[..., Central]) -> None:
    """With a heartbeat interval, run() sends each gateway a signed heartbeat carrying its
    current list version and stream seqs as soon as it is connected."""
    with office.central() as central:
        version = central.publish_snapshot("gw2")
        all_seq = central.revoke_permit("P-1")
    gw1, gw2 = peers("gw1"), peers("gw2")
    serving(heartbeat_every_s=3600)
    for peer, list_version in ((gw1, 0), (gw2, version)):
        topic, beat = peer.next_central(office.keys)
        assert topic == peer.topics.inbound("hb")
        assert isinstance(beat, Heartbeat)
        assert (beat.gateway, beat.list_version, beat.rev_seq, beat.all_seq) == (
            peer.gateway, list_version, 0, all_seq)


def test_a_second_central_hands_its_publishing_to_the_running_one(
        office: Office, peers: Callable[[str], GatewayPeer],
        serving: Callable[..., Central]) -> None:
    """While run() holds the folder, another Central neither connects nor serves: its
    publishes go through the running one's worker, with the seqs the running one keeps."""
    gw1 = peers("gw1")
    serving()
    with office.central() as tool:
        seq = tool.command("gw1", "status")
        beats = tool.heartbeat_all()
        assert sorted(beats) == ["gw1", "gw2"]
        with pytest.raises(CentralUsageError, match="not enrolled"):
            tool.publish_delta("gw1", upsert=["em4100:67003B51C6"])
    _, command = gw1.next_central(office.keys)
    assert isinstance(command, Command) and (command.action, command.seq) == ("status", seq)
    _, beat = gw1.next_central(office.keys)
    assert isinstance(beat, Heartbeat) and beat.seq == beats["gw1"]
    # One connection under the office's client id: the tool never connected.
    assert office.broker.log().count("as permitgate-central ") == 1


def test_a_one_shot_command_leaves_queued_gateway_messages_for_serve(
        office: Office, peers: Callable[[str], GatewayPeer],
        serving: Callable[..., Central], tmp_path: Path) -> None:
    """Events queued for the office while serve is down survive a one-shot command that
    resumes the office session in between: the next serve receives and acknowledges them."""
    gw1 = peers("gw1")
    Serving(office.central()).stop()  # the office session and its subscription exist
    gw1.send("events", batch("gw1", make_events(tmp_path, 2)))
    with office.central() as tool:
        seq = tool.command("gw1", "status")
    _, command = gw1.next_central(office.keys)
    assert isinstance(command, Command) and command.seq == seq
    central = serving()
    assert wait_ack(gw1, office.keys).upto == 2
    assert [e["seq"] for e in central.events("gw1")] == [1, 2]


# -- the command line -----------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``main()`` configures structlog for the process; put the test session's back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


class _Lines:
    """The stdout lines of a process, read by a thread so waiting can have a bound."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        self._stdout = process.stdout
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._stdout:
            self.queue.put(line)

    def close(self) -> None:
        """After the process has exited: let the reader reach EOF, close the pipe."""
        self._thread.join(WAIT_S)
        self._stdout.close()


def _next_line(lines: _Lines, event: str) -> dict[str, Any]:
    """The next line ``serve`` logs for ``event``, read off its output as it comes (lines
    before it are skipped)."""
    while True:
        try:
            line = lines.queue.get(timeout=WAIT_S)
        except queue.Empty:
            pytest.fail(f"serve never logged {event}")
        record = cast(dict[str, Any], json.loads(line))
        if record.get("event") == event:
            return record


def _published_version(stdout: str) -> int:
    """The list version ``permitgate-central publish`` says it published."""
    found = re.search(r"published list version (\d+) ", stdout)
    assert found is not None, stdout
    return int(found.group(1))


def test_cli_keygen_add_gateway_enroll_publish_serve_and_show(
        tmp_path: Path, broker: Broker, office_db: OfficeDb) -> None:
    """The CLI end to end: keygen, add-gateway, enroll, publish (a verified snapshot),
    serve (a publish goes through it), and show --json reflecting an applied report."""
    folder = tmp_path / "office"
    site_key = tmp_path / "gw1.key"
    site_key.write_text(os.urandom(32).hex() + "\n")
    net = ["--dir", str(folder), "--host", broker.host, "--port", str(broker.port)]
    assert "wrote signing key central-1" in run_cli("keygen", str(folder)).stdout
    if office_db.url is not None:
        assert "PostgreSQL" not in run_cli("database", *net).stdout
        assert "schema ready" in run_cli("database", office_db.url, *net).stdout
        assert "PostgreSQL" in run_cli("database", *net).stdout
    run_cli("add-gateway", "gw1", "--site", "s1", "--site-key", str(site_key), *net)
    done = run_cli("enroll", "gw1", "--card", "em4100:67003b51c6", "--permit", "P-301",
                   "--until", "2030-12-31", "--doors", "front", *net)
    assert "67003" not in done.stdout
    keys = load_trusted_keys(folder / TRUSTED_KEYS_NAME)
    gw1 = GatewayPeer(broker, "gw1")
    serve: subprocess.Popen[str] | None = None
    lines: _Lines | None = None
    try:
        first = _published_version(run_cli("publish", "gw1", *net).stdout)
        manifest, chunks = gw1.receive_snapshot(keys)
        assert manifest.seq == first
        (entry,) = chunks[0].entries
        hasher = CredentialHasher(bytes.fromhex(site_key.read_text().strip()))
        assert entry.cred == b64(hasher.credential("em4100:67003B51C6"))
        assert entry.doors == ("front",)
        assert entry.valid_until is not None and entry.valid_until > time.time()

        serve = subprocess.Popen(
            [sys.executable, "-m", "provisioning.central_cli", "serve", *net,
             "--heartbeat-every", "0", "--log-format", "json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = _Lines(serve)
        _next_line(lines, "central_subscribed")
        refused = run_cli("serve", *net, check=1)
        assert "another 'serve'" in refused.stderr
        second = _published_version(run_cli("publish", "gw1", *net).stdout)
        assert second > first
        _next_line(lines, "request_served")
        manifest, _ = gw1.receive_snapshot(keys)
        assert manifest.seq == second
        gw1.send("applied", {"type": "applied", "gateway": "gw1", "stream": "list",
                             "seq": second, "status": "applied", "list_version": second,
                             "ts_ms": 1})
        _next_line(lines, "gateway_applied")
        gw1.send("events", batch("gw1", make_events(tmp_path, 2)))
        _next_line(lines, "events_stored")
        (event,) = [json.loads(line) for line in run_cli(
            "events", "gw1", "--json", "-n", "1", *net).stdout.splitlines()]
        assert (event["seq"], event["kind"]) == (2, "access_granted")
        assert "access_granted" in run_cli("events", "gw1", *net).stdout
        report = json.loads(run_cli("show", "--json", *net).stdout)
        (gateway,) = report["gateways"]
        assert gateway["list"] == {**gateway["list"], "published": second,
                                   "applied": second, "current": True}
        assert gateway["applied"]["list"]["status"] == "applied"
        assert f"applied v{second} (current)" in run_cli("show", *net).stdout
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(WAIT_S) == 0
    finally:
        gw1.close()
        if serve is not None:
            if serve.poll() is None:
                serve.kill()
            serve.wait()
        if lines is not None:
            lines.close()


@pytest.mark.parametrize(("argv", "named"), [
    (["enroll", "gw1", "--card", "67003B51C6", "--permit", "P"], "--card"),
    (["enroll", "gw1", "--card", "em4100:XYZ", "--permit", "P"], "--card"),
    (["enroll", "gw1", "--card", "em4100:67003B51C6", "--permit", "P", "--until", "soon"],
     "--until"),
    (["enroll", "gw1", "--card", "em4100:67003B51C6", "--permit", "P", "--doors", "Front"],
     "--doors"),
    (["enroll", "gw9", "--card", "em4100:67003B51C6", "--permit", "P"], "gw9"),
    (["revoke", "--card", "em4100:67003B51C6"], "--gateway"),
    (["revoke", "--permit", "P", "--all", "--gateway", "gw1"], "--all"),
    (["heartbeat"], "--all"),
    (["add-gateway", "gw2", "--site", "s", "--site-key", "/nonexistent"], "--site-key"),
    (["add-gateway", "GW", "--site", "s", "--site-key", "/nonexistent"], "GW"),
    (["publish", "gw1", "--tls-ca", "/nonexistent"], "--tls-ca"),
])
def test_cli_bad_input_exits_2_naming_the_argument(
        restore_logging: None,
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
        named: str) -> None:
    """Unusable arguments exit 2 with a message naming the argument; nothing is sent."""
    folder = tmp_path / "office"
    keygen(folder)
    site_key = tmp_path / "gw1.key"
    site_key.write_text(os.urandom(32).hex())
    assert main(["--dir", str(folder), "add-gateway", "gw1", "--site", "s",
                 "--site-key", str(site_key)]) == 0
    capsys.readouterr()
    assert main(["--dir", str(folder), *argv]) == 2
    assert named in capsys.readouterr().err


def test_cli_without_a_folder_exits_2(restore_logging: None, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A command without --dir (and without $PERMITGATE_CENTRAL_DIR), or with a folder
    that does not exist, exits 2 naming --dir."""
    monkeypatch.delenv("PERMITGATE_CENTRAL_DIR", raising=False)
    assert main(["show"]) == 2
    assert "--dir" in capsys.readouterr().err
    assert main(["--dir", str(tmp_path / "missing"), "show"]) == 2
    assert "--dir" in capsys.readouterr().err
