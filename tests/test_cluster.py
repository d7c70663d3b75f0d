"""A gateway on a clustered broker: a real three-node NATS cluster (tests/nats_cluster.py),
the real agent as a child process speaking MQTT 3.1.1 with ``[sync] brokers`` naming all
three nodes, and the office's own publishing and receiving code on another node.

The node the gateway is connected to (found from the nodes' ``/connz``) is killed with
SIGKILL while cards are being tapped; the gateway fails over to another node, every event
reaches the office exactly once, and a revocation the office sends after the kill is
applied.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import structlog
from paho.mqtt.client import Client, ConnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.store import StoredEvent
from protocol.hashing import log_prefix
from protocol.messages import Revoked
from protocol.signing import b64
from protocol.topics import office_subscription
from provisioning.db.sqlite import SqliteOfficeDatabase
from provisioning.keys import OfficeKeys
from provisioning.mqtt import DEFAULT_CLIENT_ID
from provisioning.publish import Publisher
from provisioning.receive import Receiver
from tests.broker import Broker
from tests.harness import (
    GATEWAY,
    HASHER,
    SITE_KEY,
    UNKNOWN,
    VALID,
    AgentProcess,
    Office,
    TapStream,
    assert_delivered_exactly_once,
    card_id,
    wait_drained,
)
from tests.nats_cluster import NatsCluster, NatsNode
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

FAILOVER_S = 120.0
"""A bound on the cluster's recovery after a node dies (JetStream elects new leaders and
the gateway's session is resumed on another node: about 20 s here); not an expectation."""

log = structlog.get_logger()
T = TypeVar("T")


class MqttOffice:
    """The office's publishing and receiving (``provisioning.publish``/``receive``: the
    code ``serve`` runs) on one worker thread, over an MQTT 3.1.1 connection to one node.

    ``serve``'s own client speaks MQTT 5, which NATS refuses; everything else is the
    reference office: the database, keys, numbering, signing, event storage (once per
    seq, chain checked), acks after the commit, answers to resync requests. Gateway
    messages are acknowledged to the broker only once handled, as ``serve`` does. A
    heartbeat goes to every gateway every ``heartbeat_every_s``.
    """

    def __init__(self, folder: Path, node: NatsNode, heartbeat_every_s: float) -> None:
        self._db = SqliteOfficeDatabase(folder / "central.db")
        self.publisher = Publisher(self._db, OfficeKeys(folder), self._send,
                                   clock=time.time)
        self.receiver = Receiver(self._db, self.publisher, clock=time.time,
                                 resync_interval_s=1.0)
        self.heartbeat_every_s = heartbeat_every_s
        self.errors: list[str] = []
        self.subscribed = threading.Event()
        self._jobs: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._stop = threading.Event()
        self._client = Client(callback_api_version=CallbackAPIVersion.VERSION2,
                              client_id=DEFAULT_CLIENT_ID,
                              protocol=MQTTProtocolVersion.MQTTv311, clean_session=False,
                              manual_ack=True)
        self._client.reconnect_delay_set(1, 2)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_a: self.subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect_async(node.host, node.port, keepalive=5)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="office", daemon=True)
        self._thread.start()

    def _on_connect(self, client: Client, _u: Any, _f: ConnectFlags, reason: ReasonCode,
                    _p: Properties | None) -> None:
        if not reason.is_failure:
            client.subscribe(office_subscription(), qos=1)

    def _on_message(self, _c: Client, _u: Any, message: MQTTMessage) -> None:
        self._jobs.put(("message", message.topic, bytes(message.payload), message.mid,
                        message.qos))

    def _send(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn`` on the worker (which alone publishes) and return its result."""
        future: Future[T] = Future()
        self._jobs.put(("call", fn, future))
        return future.result(timeout)

    def _run(self) -> None:
        next_beat = time.monotonic()
        while not self._stop.is_set():
            if self.subscribed.is_set() and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_every_s
                self._guarded(self.publisher.heartbeat_all)
                self._guarded(self.receiver.answer_due_resyncs)
            try:
                job = self._jobs.get(timeout=0.05)
            except queue.Empty:
                continue
            if job[0] == "message":
                _, topic, payload, mid, qos = job
                if self._guarded(partial(self.receiver.handle, topic, payload)):
                    self._client.ack(mid, qos)
            else:
                _, fn, future = job
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def _guarded(self, fn: Callable[[], object]) -> bool:
        try:
            fn()
        except Exception as exc:  # recorded: the test asserts there is none
            log.exception("test_office_error")
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return False
        return True

    def close(self) -> None:
        """Stop the worker, disconnect, close the database."""
        self._stop.set()
        self._thread.join(10)
        with contextlib.suppress(OSError, RuntimeError):
            self._client.disconnect()
        self._client.loop_stop()
        self._db.close()


def as_broker(node: NatsNode) -> Broker:
    """A node where the harness expects a Mosquitto ``Broker``: ``Office`` and
    ``AgentProcess`` read only its ``host`` and ``port``, which a node has (its MQTT
    listener)."""
    return cast(Broker, node)


def resumed_on(cluster: NatsCluster, agent: AgentProcess, mark: int) -> NatsNode | None:
    """The node the gateway last logged ``mqtt_connected`` to since log offset ``mark``,
    once that node's ``/connz`` shows it there (a node also lists a client whose connect
    it is still working on, and may yet refuse)."""
    connected = [r for r in agent.log.records(mark) if r.get("event") == "mqtt_connected"]
    if not connected:
        return None
    node = next(n for n in cluster.nodes if n.port == connected[-1]["port"])
    return node if cluster.node_of(GATEWAY) is node else None


def decision_on(agent: AgentProcess, value: str) -> StoredEvent:
    """Present the EM4100 card ``value`` and return the agent's decision on it (found by
    the card's credential prefix: taps of the stream before it may still be decided
    after it)."""
    prefix = log_prefix(HASHER.credential(card_id(value)))
    before = agent.last_seq()
    agent.tap(value)

    def decided() -> StoredEvent | None:
        return next((e for e in agent.store().events(after_seq=before)
                     if e.kind in ("access_granted", "access_denied") and e.cred == prefix),
                    None)

    return wait_for(decided, f"a decision on card {value}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A running three-node NATS cluster with MQTT; every node stopped at teardown."""
    nats = NatsCluster(tmp_path / "nats")
    try:
        nats.start()
        yield nats
    finally:
        nats.close()


def test_killing_the_gateways_node_loses_no_event_and_no_revocation(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """With the node it is connected to killed mid-stream, a gateway listing all three
    nodes resumes its session on another, every event reaches the office exactly once,
    and a revocation sent after the kill is applied."""
    office_node = cluster.nodes[-1]
    site_key = tmp_path / "site.key"
    site_key.write_text(SITE_KEY.hex())
    office = Office(tmp_path / "central", as_broker(office_node), site_key)
    serving = MqttOffice(office.folder, office_node, heartbeat_every_s=2.0)
    agent = AgentProcess(tmp_path / "gw", as_broker(office_node), office.trusted_keys,
                         host=None, port=None, protocol="3.1.1",
                         brokers=cluster.endpoints)
    try:
        assert serving.subscribed.wait(60), cluster.logs()
        agent.start()
        wait_for(lambda: office.report()["list"]["applied"],
                 lambda: f"the first list applied at the gateway; {agent.text()[-3000:]}",
                 FAILOVER_S)
        first = wait_for(lambda: cluster.node_of(GATEWAY), "the gateway on a node")
        assert first is cluster.nodes[0], "the gateway tries the brokers in order"
        wait_drained(agent, office, FAILOVER_S)

        with TapStream(agent, UNKNOWN, interval_s=0.03):
            before = office.acked_upto()
            wait_for(lambda: office.acked_upto() >= before + 20, "events flowing")
            mark = agent.log.size()
            first.kill()
            at_kill = agent.last_seq()
            revoked = card_id(VALID[0])
            rev_seq = serving.call(lambda: serving.publisher.revoke(GATEWAY, (Revoked(
                kind="credential", hash=b64(HASHER.credential(revoked))),)))
            second = wait_for(lambda: resumed_on(cluster, agent, mark),
                              lambda: f"the gateway on another node\n{cluster.logs()}",
                              FAILOVER_S)
            assert second is not first
            wait_for(lambda: office.acked_upto() >= at_kill + 20,
                     "events tapped after the kill stored at the office", FAILOVER_S)

        wait_for(lambda: agent.store().versions().get("rev", 0) >= rev_seq,
                 "the revocation sent after the kill applied", FAILOVER_S)
        denied = decision_on(agent, VALID[0])
        assert (denied.kind, denied.reason) == ("access_denied", "revoked")
        assert decision_on(agent, VALID[1]).kind == "access_granted"
        wait_drained(agent, office, FAILOVER_S)
        delivered = assert_delivered_exactly_once(agent, office)
        assert delivered > at_kill
        assert serving.errors == []
        assert serving.receiver.malformed == 0
        connected = [r for r in agent.log.records() if r.get("event") == "mqtt_connected"]
        assert {r["port"] for r in connected} >= {first.port, second.port}
    finally:
        agent.close()
        serving.close()
        office.close()
