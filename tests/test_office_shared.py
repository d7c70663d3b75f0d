"""Several office instances on one PostgreSQL database sharing the gateways' traffic
through an MQTT 5 shared subscription (``permitgate-central serve --share GROUP``).

Against a real Mosquitto and the local PostgreSQL server (tests/pg.py). The gateways are
raw paho clients that send their outbox as the agent's sync worker does: one batch in
flight, the next once an ack covers it, the same batch again from the oldest
unacknowledged event after an ack timeout (agent/sync.py). Events come from the agent's
own store, so their hash chain is the real one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from structlog.testing import capture_logs

from protocol.messages import Chunk, EventAck, Heartbeat, Snapshot, chunk_digest, is_chunk
from protocol.messages import parse_central as parse
from protocol.signing import load_trusted_keys, open_envelope
from provisioning.central import (
    TRUSTED_KEYS_NAME,
    Central,
    CentralError,
    CentralUsageError,
    keygen,
)
from provisioning.db.backend import set_database
from provisioning.db.postgres import PostgresOfficeDatabase, PostgresServeLock
from tests.broker import Broker
from tests.conftest import wait_for
from tests.test_central import GatewayPeer, Serving, batch, make_events

pytest_plugins = ("tests.pg",)  # pg_url: a PostgreSQL database of the test's own

REPO = Path(__file__).resolve().parent.parent
GATEWAYS = ("gw1", "gw2", "gw3", "gw4")
WAIT_S = 60.0
"""Upper bound for the whole stream to be acknowledged; a bound, not an expectation."""
MAX_BYTES = 16 * 1024 * 1024


@dataclass
class Office:
    """An office folder on a PostgreSQL database, with its keys and gateways."""

    folder: Path
    url: str
    broker: Broker
    keys: dict[str, Ed25519PublicKey]

    def central(self, client_id: str, **options: Any) -> Central:
        """A ``Central`` of the share group ``ingest`` under ``client_id``."""
        return Central(self.folder, self.broker.host, self.broker.port, client_id=client_id,
                       share_group="ingest", **options)

    def serve(self, client_id: str, log: Path) -> subprocess.Popen[bytes]:
        """``permitgate-central serve --share ingest`` as a process of its own, logging
        JSON lines to ``log``; returned once it is subscribed."""
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "provisioning.central_cli", "serve", "--dir",
                 str(self.folder), "--host", self.broker.host, "--port",
                 str(self.broker.port), "--client-id", client_id, "--share", "ingest",
                 "--heartbeat-every", "0", "--log-format", "json"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

        def subscribed() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve {client_id} exited: {log.read_text()[-2000:]}")
            return "central_subscribed" in log.read_text()

        wait_for(subscribed, f"serve {client_id} to subscribe", WAIT_S)
        return process


@pytest.fixture
def office(tmp_path: Path, broker: Broker, pg_url: str) -> Office:
    """Keys made by ``keygen``, the folder pointed at a new PostgreSQL database, and
    gateways gw1 to gw4 registered."""
    folder = tmp_path / "central"
    keygen(folder)
    set_database(folder, pg_url)
    with Central(folder, broker.host, broker.port) as central:
        for gateway in GATEWAYS:
            central.add_gateway(gateway, f"site-{gateway}", os.urandom(32))
    return Office(folder, pg_url, broker, load_trusted_keys(folder / TRUSTED_KEYS_NAME))


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Office processes a test starts; killed at teardown if still running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@dataclass
class Outbox:
    """One gateway's outbox, sent as agent/sync.py sends it."""

    peer: GatewayPeer
    events: list[dict[str, Any]]
    keys: dict[str, Ed25519PublicKey]
    batch_size: int = 20
    ack_timeout_s: float = 2.0
    acked: int = 0
    ack_seqs: list[int] = field(default_factory=list)
    inflight: tuple[int, float] | None = None
    """The last seq of the batch in flight, and when it was sent."""

    def pump(self) -> bool:
        """Take in the acks that arrived, send the next batch (or the same one again
        after the ack timeout); whether every event is acknowledged."""
        while not self.peer.inbox.empty():
            topic, payload = self.peer.inbox.get_nowait()
            body = parse(open_envelope(payload, topic, self.keys, MAX_BYTES))
            if isinstance(body, EventAck):
                self.ack_seqs.append(body.seq)
                self.acked = max(self.acked, min(body.upto, len(self.events)))
                if self.inflight is not None and body.upto >= self.inflight[0]:
                    self.inflight = None
        if self.acked == len(self.events):
            return True
        now = time.monotonic()
        if self.inflight is None or now - self.inflight[1] >= self.ack_timeout_s:
            chunk = self.events[self.acked:self.acked + self.batch_size]
            self.peer.send("events", batch(self.peer.gateway, chunk))
            self.inflight = (chunk[-1]["seq"], now)
        return False


def _stored(url: str) -> dict[str, tuple[int, int, int]]:
    """Per gateway: events stored, distinct seqs stored, highest seq."""
    with psycopg.connect(url) as conn:
        return {gw: (n, d, top) for gw, n, d, top in conn.execute(
            "SELECT gateway, count(*), count(DISTINCT seq), max(seq) FROM events "
            "GROUP BY gateway")}


def test_a_killed_instance_loses_and_duplicates_nothing(
        office: Office, tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """Two serves share the gateways' events; one is frozen while the broker hands it
    messages, then killed: the gateways' resent batches reach the other, every event is
    stored exactly once, every gateway's outbox is acknowledged to its last event, and no
    ack seq is used twice."""
    logs = {name: tmp_path / f"{name}.log" for name in ("office-a", "office-b")}
    office_a = office.serve("office-a", logs["office-a"])
    processes.append(office_a)
    processes.append(office.serve("office-b", logs["office-b"]))
    outboxes = [Outbox(GatewayPeer(office.broker, gw), make_events(tmp_path, 300),
                       office.keys) for gw in GATEWAYS]
    try:
        def pumped(at_least: int) -> bool:
            done = [o.pump() for o in outboxes]
            return all(done) or min(o.acked for o in outboxes) >= at_least

        wait_for(lambda: pumped(60), "the first events of every gateway acknowledged", WAIT_S)
        assert "events_stored" in logs["office-a"].read_text()  # it did take its share
        office_a.send_signal(signal.SIGSTOP)
        offset = len(office.broker.log())
        wait_for(lambda: pumped(10**9) or "Sending PUBLISH to office-a" in
                 office.broker.log()[offset:],
                 "the broker to hand the frozen instance a message", WAIT_S)
        office_a.kill()
        office_a.wait()
        wait_for(lambda: all(o.pump() for o in outboxes),
                 lambda: f"every event acknowledged: {[o.acked for o in outboxes]}", WAIT_S)
    finally:
        for outbox in outboxes:
            outbox.peer.close()
    assert "Sending PUBLISH to office-a" in office.broker.log()[offset:]
    assert _stored(office.url) == dict.fromkeys(GATEWAYS, (300, 300, 300))
    for outbox in outboxes:
        assert len(outbox.ack_seqs) == len(set(outbox.ack_seqs))
    db = PostgresOfficeDatabase(office.url)
    try:
        for gw in GATEWAYS:
            record = db.gateway(gw)
            assert record is not None and record.acked_upto == 300
            assert db.chain_problems(gw) == []
    finally:
        db.close()


def test_two_instances_send_each_gateway_its_lists_in_order(office: Office) -> None:
    """Resync requests shared out to two serves are each answered with a snapshot of a
    1,000-entry list by one of them, and the gateway receives every manifest with its
    chunk right after it, versions in allocation order up to the last one allocated,
    from both instances (tests/test_office_pg.py shows the turn that keeps them so)."""
    with Central(office.folder, office.broker.host, office.broker.port) as tool:
        tool.enroll_many("gw1", ((f"em4100:{n:010X}", f"P-{n}") for n in range(1000)))
    serving = [Serving(office.central(f"office-{n}", resync_interval_s=0)) for n in "ab"]
    gw1 = GatewayPeer(office.broker, "gw1")
    requests = 16
    try:
        for _ in range(requests):
            gw1.send("request", {"type": "resync", "gateway": "gw1", "reason": "test",
                                 "list_version": 0, "rev_seq": 0, "all_seq": 0, "ts_ms": 0})
        received: list[tuple[str, int]] = []
        manifest: Snapshot | None = None
        for _ in range(2 * requests):
            topic, payload = gw1.next()
            if is_chunk(payload):
                chunk = Chunk.model_validate_json(payload)
                assert manifest is not None
                assert chunk_digest(payload) == manifest.chunk_sha256[chunk.index]
                received.append(("chunk", chunk.version))
                continue
            body = parse(open_envelope(payload, topic, office.keys, MAX_BYTES))
            assert isinstance(body, Snapshot)
            manifest = body
            received.append(("snapshot", body.seq))
    finally:
        gw1.close()
        for loop in serving:
            loop.stop()
    versions = [v for kind, v in received if kind == "snapshot"]
    assert len(versions) == requests and versions == sorted(set(versions))
    assert received == [(kind, v) for v in versions for kind in ("snapshot", "chunk")]
    db = PostgresOfficeDatabase(office.url)
    try:
        assert [g.list_version for g in db.gateways() if g.id == "gw1"] == [versions[-1]]
    finally:
        db.close()
    log = office.broker.log()
    for client in ("office-a", "office-b"):
        assert f"Received PUBLISH from {client} (d0, q1, r0, m" in log
        assert "'pg/v1/gw/gw1/in/list'" in log


def test_heartbeats_go_out_from_one_instance(office: Office) -> None:
    """Two serves with heartbeats on: one of them sends each gateway its heartbeat, the
    other leaves them to it (the seq received is the only one allocated)."""
    peers = [GatewayPeer(office.broker, gw) for gw in GATEWAYS]
    serving: list[Serving] = []
    received: dict[str, int] = {}
    try:
        with capture_logs() as logs:
            serving += [Serving(office.central(f"office-{n}"), heartbeat_every_s=3600)
                        for n in "ab"]
            for peer in peers:
                topic, body = peer.next_central(office.keys)
                assert topic == peer.topics.inbound("hb") and isinstance(body, Heartbeat)
                received[peer.gateway] = body.seq
            # Both have decided before either stops (the other would then take over).
            wait_for(lambda: any(e["event"] == "heartbeats_sent_by_another_instance"
                                 for e in logs), "the other instance to leave heartbeats")
    finally:
        for loop in serving:
            loop.stop()
        for peer in peers:
            peer.close()
    db = PostgresOfficeDatabase(office.url)
    try:
        assert {g.id: g.hb_seq for g in db.gateways()} == received
    finally:
        db.close()


def test_who_may_serve_a_shared_database(office: Office) -> None:
    """Serves of one database need distinct client ids; one without a share group must be
    alone; a share group needs PostgreSQL; a one-shot command hands its operation to
    whichever serve takes it first."""
    first = Serving(office.central("office-a"))
    try:
        twin = office.central("office-a")
        with pytest.raises(CentralError, match="client id 'office-a'"):
            twin.run(threading.Event())
        twin.close()
        lone = Central(office.folder, office.broker.host, office.broker.port)
        with pytest.raises(CentralError, match="another 'serve' is running"):
            lone.run(threading.Event())
        lone.close()
        second = Serving(office.central("office-b"))
        with Central(office.folder, office.broker.host, office.broker.port) as tool:
            status = tool.command("gw1", "status")
            assert tool.command("gw1", "normal") > status
        second.stop()
    finally:
        first.stop()
    sqlite_folder = office.folder.parent / "district"
    keygen(sqlite_folder)
    with pytest.raises(CentralUsageError, match="--share"):
        Central(sqlite_folder, share_group="ingest")


def test_a_request_taken_by_a_serve_that_died_is_closed(office: Office) -> None:
    """A request taken by a serve whose database session has ended is closed as failed
    when its command looks again; one taken by a serve still running stays open."""
    db = PostgresOfficeDatabase(office.url)
    serve_db = PostgresOfficeDatabase(office.url)
    lock = PostgresServeLock(serve_db, "office-a", "ingest")
    try:
        assert lock.hold(exclusive=True)
        request = db.queue_request("heartbeat", json.dumps({"gateway": "gw1"}), 1)
        assert serve_db.take_request(request, 2)
        assert db.request_outcome(request) is None
        lock.release()
        outcome = db.request_outcome(request)
        assert outcome is not None and (outcome.error_kind, outcome.error) == (
            "failure", "serve stopped while performing it")
        assert not serve_db.take_request(request, 3)
    finally:
        lock.release()
        serve_db.close()
        db.close()
