"""Sync under faults, with the real processes on both sides.

The agent runs as ``python -m agent.cli run`` with sync enabled and its entry reader on a
pseudo-terminal (the real serial driver); the office is ``permitgate-central serve`` as
a child process; the broker is a real mosquitto with persistence (tests/broker.py). Each
test breaks one link of that chain (the broker stopped or frozen, the agent or the
office killed at a bad moment) and then checks what the protocol promises: events reach
the office exactly once in order, a list is applied whole or not at all, the retained
status tells the truth. The helpers are in tests/harness.py.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.store import lists_path
from protocol.topics import Topics
from tests.broker import Broker, BrokerPool
from tests.conftest import PtyPeer, wait_for
from tests.harness import (
    GATEWAY,
    SITE_KEY,
    UNKNOWN,
    VALID,
    AgentProcess,
    Office,
    ServeProcess,
    TapStream,
    assert_delivered_exactly_once,
    card_id,
    wait_drained,
)

pytestmark = pytest.mark.timeout(180)


@dataclass
class Rig:
    """A broker with persistence, the office's serve, and one agent process."""

    broker: Broker
    office: Office
    serve: ServeProcess
    agent: AgentProcess

    def start(self) -> None:
        """Start serve and the agent; return once the first list is applied and the
        agent's start-up events are at the office."""
        self.serve.start()
        self.agent.start()
        wait_for(lambda: self.office.report()["list"]["applied"],
                 "the first list applied at the gateway")
        wait_drained(self.agent, self.office)


RigFactory = Callable[..., Rig]


@pytest.fixture
def make_rig(tmp_path: Path, brokers: BrokerPool, pty_peer: PtyPeer) -> Iterator[RigFactory]:
    """Builds the rig (not started); whatever the test did, everything is stopped."""
    made: list[Rig] = []

    def make(**sync: Any) -> Rig:
        # set_tcp_nodelay only makes small-batch drains quicker (no ~40 ms delayed-ACK
        # wait per message: tests/broker.py); no test depends on it for correctness.
        broker = brokers.start(persistence=True, tcp_nodelay=True)
        site_key = tmp_path / "site.key"
        site_key.write_text(SITE_KEY.hex())
        office = Office(tmp_path / "central", broker, site_key)
        serve = ServeProcess(office)
        agent = AgentProcess(tmp_path / "gw", broker, office.trusted_keys, pty=pty_peer,
                             **sync)
        rig = Rig(broker, office, serve, agent)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.broker.resume()
        rig.agent.close()
        rig.serve.kill()
        rig.office.close()


def retained_status(broker: Broker) -> dict[str, Any]:
    """The status message the broker retains for the gateway, as a fresh subscriber
    receives it."""
    got: list[dict[str, Any]] = []
    arrived = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"probe-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            got.append(json.loads(message.payload))
            arrived.set()

    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe(Topics(GATEWAY).outbound("status"), qos=1)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert arrived.wait(15), "no retained status"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def staging_tables(agent: AgentProcess) -> list[str]:
    """Snapshot staging tables left in the agent's list database."""
    conn = sqlite3.connect(f"file:{lists_path(agent.db)}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%_new'")]
    finally:
        conn.close()


def build_backlog(rig: Rig, count: int) -> int:
    """With serve stopped, tap ``count`` unknown cards; returns the last event's seq."""
    assert rig.serve.stop() == 0
    before = rig.agent.decisions()
    with TapStream(rig.agent, interval_s=0.004):
        wait_for(lambda: rig.agent.decisions() >= before + count, f"{count} decisions")
    return rig.agent.last_seq()


def test_broker_outage_during_a_tap_stream_loses_and_duplicates_nothing(
        make_rig: RigFactory) -> None:
    """With the broker stopped for a while during a steady stream of taps, decisions
    and their events go on locally; once it is back every event reaches the office
    exactly once, in order, and the outbox empties."""
    rig = make_rig()
    rig.start()
    agent, office = rig.agent, rig.office
    assert agent.decide(VALID[0]).kind == "access_granted"
    with TapStream(agent):
        flowing = agent.last_seq()
        wait_for(lambda: office.acked_upto() >= flowing + 10, "events flowing")
        mark = agent.log.size()
        rig.broker.stop()
        agent.log.wait("mqtt_disconnected", since=mark)
        acked_at_outage = office.acked_upto()
        decided = agent.decisions()
        wait_for(lambda: agent.decisions() >= decided + 40, "decisions during the outage")
        outage_last = agent.last_seq()
        assert office.acked_upto() == acked_at_outage
        assert agent.outbox() >= outage_last - acked_at_outage
        rig.broker.start()
        wait_for(lambda: office.acked_upto() >= outage_last,
                 "the outage's events at the office", timeout=90)
    wait_drained(agent, office)
    count = assert_delivered_exactly_once(agent, office)
    assert count >= outage_last


def test_agent_killed_while_draining_a_backlog_loses_and_duplicates_nothing(
        make_rig: RigFactory) -> None:
    """SIGKILL of the agent while it drains a backlog in small batches: after the
    restart the office holds exactly the agent's events, once each, and both chains
    verify."""
    rig = make_rig(batch_size=2)
    rig.start()
    agent, office = rig.agent, rig.office
    backlog_last = build_backlog(rig, 400)
    acked_before = office.acked_upto()
    rig.serve.start()
    wait_for(lambda: office.acked_upto() >= acked_before + 40, "the drain under way",
             interval=0.005)
    agent.kill()
    assert office.acked_upto() < backlog_last, "the backlog drained before the kill"
    agent.start()
    wait_drained(agent, office, timeout=120)
    assert_delivered_exactly_once(agent, office)
    assert len(agent.store().events(kind="agent_started")) == 2


def test_office_killed_while_receiving_a_backlog_loses_and_duplicates_nothing(
        make_rig: RigFactory) -> None:
    """SIGKILL of the office's serve in the middle of a backlog, with taps going on,
    then a restart: every event is still stored exactly once."""
    rig = make_rig(batch_size=5)
    rig.start()
    agent, office = rig.agent, rig.office
    backlog_last = build_backlog(rig, 600)
    acked_before = office.acked_upto()
    with TapStream(agent, interval_s=0.05):
        rig.serve.start()
        wait_for(lambda: office.acked_upto() >= acked_before + 50, "the drain under way",
                 interval=0.005)
        rig.serve.kill()
        at_kill = office.acked_upto()
        assert at_kill < backlog_last, "the backlog drained before the kill"
        # The agent goes on sending (its batch times out and is sent again) while the
        # office is down; the broker queues all of it for the office's session.
        mark = agent.log.size()
        agent.log.wait("event_ack_timeout", since=mark)
        rig.serve.start()
        wait_for(lambda: office.acked_upto() >= backlog_last, "the backlog at the office",
                 timeout=90)
    wait_drained(agent, office)
    assert_delivered_exactly_once(agent, office)
    records = rig.serve.log.records()
    stored = [r for r in records if r["event"] == "events_stored"]
    # A copy is either stored-and-dropped as a duplicate, or answered by the ack of an
    # earlier copy handled while it waited in the queue (provisioning/serve.py).
    copies = sum(r["received"] - r["new"] for r in stored) + sum(
        1 for r in records if r["event"] == "events_copy_answered_already")
    assert copies > 0, "no duplicate was received"


def test_agent_killed_while_staging_a_snapshot_keeps_a_whole_list(
        make_rig: RigFactory) -> None:
    """SIGKILL while a 200,000-entry snapshot is being staged leaves the old list whole
    (or, had the commit won the race, the new one whole); after the restart the gateway
    asks again and the new list is applied."""
    rig = make_rig()
    rig.start()
    agent, office = rig.agent, rig.office
    old = agent.list_state()
    assert old[1] == len(VALID)
    new_cards = [f"{0xA000000000 + i:010X}" for i in range(200_000)]
    office.central.enroll_many(GATEWAY, [(card_id(c), f"P-{c}") for c in new_cards])
    new_size = len(VALID) + len(new_cards)
    mark = agent.log.size()
    version = office.central.publish_snapshot(GATEWAY)
    agent.log.wait("snapshot_started", since=mark, version=version, timeout=60)
    agent.kill()
    assert staging_tables(agent), "the kill did not land while the snapshot was staged"
    assert agent.list_state() in (old, (version, new_size))
    agent.start()
    agent.log.wait("resync_requested", reason="interrupted_snapshot")
    wait_for(lambda: agent.list_state()[1] == new_size, "the new list applied", timeout=90)
    list_version, _ = agent.list_state()
    assert list_version >= version
    wait_for(lambda: office.report()["list"]["current"], "the office to see it applied")
    assert agent.decide(new_cards[-1]).kind == "access_granted"


def test_killed_gateway_is_offline_by_its_will_and_online_after_restart(
        make_rig: RigFactory) -> None:
    """After SIGKILL the broker publishes the agent's will, so the retained status and
    the office say offline; after a restart both say online again."""
    rig = make_rig()
    rig.start()
    wait_for(lambda: rig.office.online() is True, "the gateway online")
    assert retained_status(rig.broker)["state"] == "online"
    rig.agent.kill()
    wait_for(lambda: rig.office.online() is False, "the office to see the will")
    assert retained_status(rig.broker)["state"] == "offline"
    rig.agent.start()
    wait_for(lambda: rig.office.online() is True, "the gateway online again")
    assert retained_status(rig.broker)["state"] == "online"


def test_a_frozen_broker_is_detected_and_events_flow_after_it_resumes(
        make_rig: RigFactory) -> None:
    """With the broker frozen (SIGSTOP: the TCP connection stays open, nothing
    answers) the agent does not stay connected and silent: it reports the silent link
    or a disconnect; after SIGCONT it reconnects and its events reach the office."""
    rig = make_rig(keepalive_s=5, status_interval_s=1)
    rig.start()
    agent, office = rig.agent, rig.office
    mark = agent.log.size()
    rig.broker.pause()
    try:
        with TapStream(agent, interval_s=0.2):
            wait_for(lambda: agent.log.find("mqtt_link_silent", since=mark) is not None
                     or agent.log.find("mqtt_disconnected", since=mark) is not None,
                     "the dead link noticed", timeout=60)
    finally:
        rig.broker.resume()
    agent.log.wait("mqtt_connected", since=mark, timeout=90)
    for card in UNKNOWN * 3:
        agent.tap(card)
    last = agent.last_seq()
    wait_for(lambda: office.acked_upto() >= last, "events after the freeze", timeout=60)
    wait_drained(agent, office)
    assert_delivered_exactly_once(agent, office)
