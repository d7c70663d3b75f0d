"""``[sync] brokers``: a gateway that lists several brokers connects to them in order and
moves to the next one when its broker is unreachable, goes away, or stops answering.

Real Mosquitto brokers (tests/broker.py), not clustered: each test watches the gateway's
own messages (its status, its events) arrive at whichever broker it is on. A real
clustered broker, with sessions that follow the gateway, is tests/test_cluster.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load_config
from tests.agentconf import write_agent
from tests.broker import Broker, BrokerPool, free_port
from tests.test_sync import CARD_A, Gateway, Office

WAIT_S = 45.0
"""A bound on a failover (a back-off step or two, or the dead-link detection's
3 x status_interval_s + keepalive_s); not an expectation."""


class Watchers:
    """One hand-driven office per broker, each only watching what the gateway sends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: list[Office] = []

    def on(self, broker: Broker) -> Office:
        """A new watcher subscribed on ``broker``."""
        folder = self.folder / f"watcher{len(self.made)}"
        folder.mkdir()
        office = Office(broker, folder)
        self.made.append(office)
        return office

    def close(self) -> None:
        """Disconnect every watcher."""
        for office in self.made:
            office.close()


@pytest.fixture
def watchers(tmp_path: Path) -> Iterator[Watchers]:
    """Watchers on demand, disconnected at teardown."""
    made = Watchers(tmp_path)
    try:
        yield made
    finally:
        made.close()


def started_gateway(folder: Path, trusted: Path, endpoints: list[Broker | int],
                    **sync: Any) -> Gateway:
    """An in-process agent whose ``[sync] brokers`` lists ``endpoints`` in order (a port
    alone: nothing listens there), with no ``host`` or ``port``."""
    folder.mkdir()
    listed = [f"127.0.0.1:{e}" if isinstance(e, int) else f"{e.host}:{e.port}"
              for e in endpoints]
    some = next(e for e in endpoints if isinstance(e, Broker))
    # Gateway fills host and port from a broker; None drops both from the file again.
    gateway = Gateway(folder, some, trusted, host=None, port=None, brokers=listed, **sync)
    gateway.agent.start()
    return gateway


def online_since(office: Office, since: float) -> None:
    """Wait for an ``online`` status the gateway published after ``since`` (Unix s)."""
    office.wait("status", lambda b: b["state"] == "online" and (b["ts_ms"] or 0)
                >= since * 1000, "the gateway online on this broker", WAIT_S)


def test_brokers_replace_host_and_port_and_are_checked(tmp_path: Path) -> None:
    """``brokers`` lists "host:port" items (IPv6 in brackets) tried in order; without it
    ``host`` and ``port`` are the one broker; both at once, a malformed item or one listed
    twice is refused naming sync.brokers."""
    config = load_config(write_agent(tmp_path / "a", sync={
        "brokers": ["mqtt-1.example:8883", "[2001:db8::1]:8883", "10.0.0.3:1883"]}))
    assert config.sync.endpoints == (("mqtt-1.example", 8883), ("2001:db8::1", 8883),
                                     ("10.0.0.3", 1883))
    plain = load_config(write_agent(tmp_path / "b", sync={"host": "mqtt.example",
                                                          "port": 1883}))
    assert plain.sync.endpoints == (("mqtt.example", 1883),)
    for sync in ({"brokers": ["a.example:1883"], "host": "b.example"},
                 {"brokers": ["a.example"]}, {"brokers": ["a.example:0"]},
                 {"brokers": ["2001:db8::1:8883"]},
                 {"brokers": ["a.example:1883", "a.example:1883"]}):
        with pytest.raises(ConfigError, match=r"sync\.brokers"):
            load_config(write_agent(tmp_path / "c", sync=sync))


def test_an_unreachable_first_broker_is_passed_over(tmp_path: Path, brokers: BrokerPool,
                                                    watchers: Watchers) -> None:
    """With nothing listening at the first listed broker, the gateway connects to the
    second and works there: its status and its events arrive."""
    live = brokers.start()
    watcher = watchers.on(live)
    since = time.time()
    gateway = started_gateway(tmp_path / "gw", watcher.trusted,
                              [free_port(), live])
    try:
        online_since(watcher, since)
        gateway.tap(CARD_A)
        watcher.wait("events", lambda b: any(e["kind"] == "access_denied"
                                             for e in b["events"]), "the tap's event")
    finally:
        gateway.agent.stop()


def test_a_lost_broker_is_replaced_by_the_next_in_order_round_the_list(
        tmp_path: Path, brokers: BrokerPool, watchers: Watchers) -> None:
    """Connected to the first broker, the gateway moves to the second when the first
    goes away (events included), and back to the first when the second goes too."""
    first, second = brokers.start(), brokers.start()
    on_first, on_second = watchers.on(first), watchers.on(second)
    since = time.time()
    gateway = started_gateway(tmp_path / "gw", on_first.trusted,
                              [first, second])
    try:
        online_since(on_first, since)
        assert "status" not in on_second.received
        first.stop()
        online_since(on_second, since)
        gateway.tap(CARD_A)
        on_second.wait("events", lambda b: any(e["kind"] == "access_denied"
                                               for e in b["events"]), "the tap's event")
        first.start()
        again = watchers.on(first)  # the restarted broker kept no subscription
        restarted = time.time()
        second.stop()
        online_since(again, restarted)
    finally:
        gateway.agent.stop()


def test_a_broker_that_stops_answering_is_left_for_the_next(
        tmp_path: Path, brokers: BrokerPool, watchers: Watchers) -> None:
    """A frozen broker (its connections open, nothing answered) is detected by the
    gateway's dead-link check, and the gateway moves to the next broker."""
    first, second = brokers.start(), brokers.start()
    on_first, on_second = watchers.on(first), watchers.on(second)
    since = time.time()
    gateway = started_gateway(tmp_path / "gw", on_first.trusted,
                              [first, second], keepalive_s=5)
    try:
        online_since(on_first, since)
        first.pause()
        online_since(on_second, since)
    finally:
        first.resume()
        gateway.agent.stop()
