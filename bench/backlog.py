"""Benchmark: draining an event backlog to the office while the door keeps deciding.

A gateway was cut off from the broker and buffered ``--events`` events in its outbox
(appended through the agent's own store, the same hash chain the card path writes).
Then the broker comes up: the agent (in this process, simulated reader) sends its outbox
in batches of ``--batch-size`` to the office's ``permitgate-central serve`` (a child
process), which stores each event once and acknowledges it; the agent forgets nothing
before that acknowledgement. While the backlog drains, a card is tapped every
``--tap-every-ms`` and every decision is timed. mosquitto (tests/broker.py) runs with
persistence, as in production, and with ``set_tcp_nodelay`` unless ``--nagle``.

Prints one JSON object as its last line:

- ``events``: the backlog drained; ``seconds``/``events_per_s``: from the broker's start
  (it accepts connections; the agent and ``serve`` are started right then, so no paho
  reconnect back-off is counted) until the agent holds the office's acknowledgement of
  the last backlog event; ``agent_connected_s``/``office_connected_s``: when each side's
  MQTT connection was up (the office's includes its process start);
- ``drain_events_per_s``: the same events over the time after both were connected;
- ``max_decision_ms``: the slowest decision during the drain, from the read handed to
  the agent to its event committed (as bench/decision.py times it); ``max_tap_ms``: the
  same from the moment the card was presented (includes the reader thread's wake-up);
  ``p99_decision_ms`` and ``taps``.

Run: ``python bench/backlog.py`` (100,000 events) or ``--quick`` (5,000) for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.broker

from agent.config import ReaderConfig, parse_config
from agent.decision import Decision
from agent.runtime import Agent, ReadTiming
from agent.store import CredentialEntry, Store
from common import logs
from drivers.simulated import SimBus
from protocol.chain import Event
from tests.agentconf import DoorSpec, ReaderSpec, agent_toml
from tests.broker import Broker
from tests.harness import (
    GATEWAY,
    HASHER,
    SITE_KEY,
    UNKNOWN,
    VALID,
    Office,
    ServeProcess,
    card_id,
    wait_for,
)


def agent_config(folder: Path, broker: Broker, trusted: Path, batch_size: int) -> str:
    """The in-process agent's configuration: sync on (plain MQTT) with ``batch_size``, one
    door, one simulated reader without debounce, store and key in ``folder``."""
    return agent_toml(folder, site_id="bench", gateway_id=GATEWAY,
                      sync={"enabled": True, "host": broker.host, "port": broker.port,
                            "tls": False, "trusted_keys": str(trusted),
                            "batch_size": batch_size, "status_interval_s": 5},
                      doors=(DoorSpec(unlock_s=0.2),), readers=(ReaderSpec(debounce_s=0),))


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def fill_outbox(db: Path, count: int) -> int:
    """Append ``count`` denials through the agent's store (before the agent runs, as if
    they had been decided during the outage); the allowlist gets the ``VALID`` cards.
    Returns the last seq."""
    store = Store(db)
    try:
        store.replace_allowlist([CredentialEntry(HASHER.credential(card_id(c)))
                                 for c in VALID], 1)
        for i in range(count):
            store.append(Event("access_denied", door="front", reader="front-in",
                               direction="entry", reason="unknown_card",
                               cred=f"{i:010x}"))
        return store.last_seq()
    finally:
        store.close()


class Taps:
    """Presents a card every ``every_s`` and times each decision."""

    def __init__(self, agent: Agent, bus: SimBus, every_s: float) -> None:
        self.bus = bus
        self.every_s = every_s
        self.presented: list[float] = []
        self.timings: list[tuple[float, ReadTiming]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taps", daemon=True)
        agent.on_decision = self._decided

    def _decided(self, _r: ReaderConfig, _d: Decision, timing: ReadTiming) -> None:
        self.timings.append((time.perf_counter(), timing))

    def _run(self) -> None:
        cards = [card_id(c) for c in (*UNKNOWN, VALID[0], *UNKNOWN)]
        n = 0
        next_at = time.perf_counter()
        while not self._stop.is_set():
            self.presented.append(time.perf_counter())
            self.bus.tap("front-in", cards[n % len(cards)])
            n += 1
            next_at += self.every_s
            self._stop.wait(max(0.0, next_at - time.perf_counter()))

    def start(self) -> None:
        """Start tapping."""
        self._thread.start()

    def stop(self) -> None:
        """Stop tapping."""
        self._stop.set()
        self._thread.join(5)

    def window(self, start: float, end: float) -> tuple[list[float], list[float]]:
        """(read → committed, presented → committed) in ms, for decisions whose card was
        presented within [start, end]."""
        decided, tapped = [], []
        for presented, (_, timing) in zip(self.presented, self.timings, strict=False):
            if start <= presented <= end:
                decided.append((timing.committed - timing.received) * 1000)
                tapped.append((timing.committed - presented) * 1000)
        return decided, tapped


def main() -> int:
    """Run the benchmark and print its JSON figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--tap-every-ms", type=float, default=20.0)
    parser.add_argument("--nagle", action="store_true",
                        help="leave the broker's set_tcp_nodelay off (mosquitto's default)")
    parser.add_argument("--quick", action="store_true", help="5,000 events")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep the logs")
    args = parser.parse_args()
    if args.quick:
        args.events = 5_000
    with tempfile.TemporaryDirectory(prefix="permitgate-bench-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        logs.configure("warning", "json", (folder / "bench.log").open("w"))
        broker = Broker(folder / "broker", persistence=True, tcp_nodelay=not args.nagle)
        gw = folder / "gw"
        gw.mkdir()
        (gw / "site.key").write_text(SITE_KEY.hex())
        (gw / "site.key").chmod(0o600)
        office = Office(folder / "central", broker, gw / "site.key")
        serve = ServeProcess(office)
        # The office's persistent session (its subscription) exists before the outage,
        # as in production: the broker keeps it, and queues for it, across restarts.
        broker.start()
        serve.start()
        serve.stop()
        broker.stop()
        generated = time.perf_counter()
        backlog_last = fill_outbox(gw / "pg.db", args.events)
        generate_s = time.perf_counter() - generated
        config = parse_config(agent_config(gw, broker, office.trusted_keys, args.batch_size),
                              "<bench>")
        bus = SimBus()
        agent = Agent(config, bus=bus)
        taps = Taps(agent, bus, args.tap_every_ms / 1000)
        try:
            # The broker comes back; the office and the gateway connect at once (rather
            # than at their next reconnect attempt, which paho backs off up to 60 s).
            broker.start()
            t0 = time.perf_counter()
            t0_wall = time.time()
            serve.start(wait=False)
            agent.start()
            sync, store = agent.sync, agent.store
            assert sync is not None and store is not None
            taps.start()
            wait_for(lambda: sync.counters.reconnects > 0, "the agent connected",
                     timeout=60, interval=0.002)
            agent_connected = time.perf_counter() - t0

            def drained() -> bool:
                first = store.first_unacked()
                return first is None or first > backlog_last

            wait_for(drained, "the backlog acknowledged", timeout=600, interval=0.002)
            t1 = time.perf_counter()
            taps.stop()
            subscribed = serve.log.wait("central_subscribed")["timestamp"]
            office_connected = datetime.fromisoformat(subscribed).timestamp() - t0_wall
            office_acked = office.acked_upto()
            stored = len(office.events())
        finally:
            taps.stop()
            agent.stop()
            serve.stop()
            broker.stop()
            office.close()
        decided, tapped = taps.window(t0, t1)
        events = backlog_last
        seconds = t1 - t0
        figures: dict[str, Any] = {
            "benchmark": "backlog",
            "events": events,
            "seconds": round(seconds, 3),
            "events_per_s": round(events / seconds),
            "agent_connected_s": round(agent_connected, 3),
            "office_connected_s": round(office_connected, 3),
            "drain_events_per_s": round(events / (seconds - max(agent_connected,
                                                                 office_connected))),
            "max_decision_ms": round(max(decided), 3),
            "p99_decision_ms": round(percentile(decided, 0.99), 3),
            "max_tap_ms": round(max(tapped), 3),
            "taps": len(decided),
            "batch_size": args.batch_size,
            "generate_s": round(generate_s, 1),
            "office_acked_upto": office_acked,
            "office_stored": stored,
            "broker_tcp_nodelay": not args.nagle,
            "gateway": "in-process agent, simulated reader",
            "office": "permitgate-central serve (child process)",
        }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
