"""Benchmark: a city's office ingest. ``--gateways`` simulated gateways (real MQTT
connections) send their event backlogs to ``--instances`` ``permitgate-central serve``
processes on one PostgreSQL database, through an MQTT 5 shared subscription
(``serve --share``), until every event is acknowledged.

The parts:

- a private Mosquitto (tests/broker.py) with ``max_connections`` raised above the
  gateways' count (and the open-file limit raised to the hard limit, which mosquitto
  inherits); it logs errors and warnings only: with ``log_type all`` it writes a line per
  message, which on this 2-core machine takes CPU from the office;
- a PostgreSQL database made for the run on the local server (``$PERMITGATE_TEST_PG``,
  as tests/pg.py; dropped afterwards), named in the office folder's ``database.url``;
- the office instances, each ``permitgate-central serve --share ingest --client-id
  office-N``, as in production;
- the gateways: ``--sim-processes`` processes of this script, each driving its share of
  the gateways' paho clients from one selector loop (paho's external-loop interface: one
  thread per client would not fit). Each gateway sends its outbox as agent/sync.py does:
  batches of ``--batch`` events, one in flight, the next once an ack covers it, the same
  again from the oldest unacknowledged event after ``--ack-timeout`` seconds. The events
  carry a real hash chain (computed before the clock starts). The acks' JSON is read for
  ``upto``; every 50th ack's signature is verified (a gateway verifies each, but that is
  the gateway's CPU, not the office's, and here both share two cores).

The clock starts when every gateway is connected and subscribed and the simulators are
told to go, and stops when the last gateway holds the ack of its last event.

Prints one JSON object as its last line: ``gateways``, ``instances``, ``events``,
``batch``, ``seconds``, ``events_per_s`` (acknowledged end to end), ``lost`` (events sent
but not stored), ``duplicates_stored`` (rows beyond one per ``(gateway, seq)``),
``resends`` (batches sent again after an ack timeout), ``acks``, CPU seconds used during
the run by the office instances, the broker and the simulators, and the machine's load
average before and after (other work on the machine skews the figure).

Run: ``python bench/office_ingest.py`` (1,000 gateways, 1,000 events each, in batches of
500, the agent's default ``sync.batch_size``: a city's backlog after an outage) or
``--quick`` (50 gateways) for a smoke run; ``--events`` and ``--batch`` change the shape
(small batches are the steady state's, and cost the office a transaction each).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.broker

import psycopg
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol.chain import GENESIS, Event, event_hash
from protocol.signing import load_trusted_keys, open_envelope
from protocol.topics import Topics
from provisioning.central import TRUSTED_KEYS_NAME, Central, keygen
from provisioning.db.backend import set_database
from tests.broker import Broker
from tests.pg import postgres_url, scratch_database
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
VERIFY_EVERY = 50
START_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 1800.0
T0_MS = 1_798_761_600_000  # 2027-01-01T00:00Z: the simulated events' day


class QuietBroker(Broker):
    """tests/broker.py's Mosquitto with errors and warnings logged, not every message."""

    def _common_lines(self) -> list[str]:
        return [line for line in super()._common_lines()
                if not line.startswith(("log_type", "connection_messages"))] + [
            "log_type error", "log_type warning", "connection_messages false"]


def gateway_ids(count: int) -> list[str]:
    """The simulated gateways' ids."""
    return [f"gw{n:05d}" for n in range(count)]


def chain(gateway: str, count: int) -> list[dict[str, Any]]:
    """``count`` access events of one gateway with a valid hash chain, as the agent's
    store writes them."""
    events = []
    prev = GENESIS
    for seq in range(1, count + 1):
        event = Event("access_granted", door="front", reader="front-in", direction="entry",
                      reason="granted", cred=f"{seq % 0xFFFFFF:010x}", data={})
        event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{gateway}/{seq}"))
        ts_ms = T0_MS + seq * 1000
        digest = event_hash(prev, seq, event_id, ts_ms, event)
        events.append({"seq": seq, "event_id": event_id, "ts_ms": ts_ms, "kind": event.kind,
                       "door": event.door, "reader": event.reader,
                       "direction": event.direction, "reason": event.reason,
                       "cred": event.cred, "data": {}, "prev_hash": prev, "hash": digest,
                       "attachment": None})
        prev = digest
    return events


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_open_files() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- a simulator process: many gateways, one selector loop -------------------------------


@dataclass
class SimGateway:
    """One simulated gateway's outbox (agent/sync.py's pump, in short)."""

    id: str
    client: Client
    events: list[dict[str, Any]]
    batch: int
    acked: int = 0
    inflight: tuple[int, float] | None = None
    subscribed: bool = False
    payloads: dict[int, bytes] = field(default_factory=dict)
    resends: int = 0
    acks: int = 0

    def payload(self, start: int) -> tuple[int, bytes]:
        """The batch from index ``start`` (its last seq and its bytes), built once."""
        chunk = self.events[start:start + self.batch]
        cached = self.payloads.get(start)
        if cached is None:
            cached = json.dumps({"type": "events", "gateway": self.id, "events": chunk},
                                separators=(",", ":"), ensure_ascii=False).encode()
            self.payloads[start] = cached
        return chunk[-1]["seq"], cached

    def pump(self, now: float, ack_timeout_s: float) -> bool:
        """Send the next batch (or the same again after the ack timeout); whether done."""
        if self.acked >= len(self.events):
            return True
        if self.inflight is not None:
            if now - self.inflight[1] < ack_timeout_s:
                return False
            self.resends += 1
        last, payload = self.payload(self.acked)
        self.client.publish(Topics(self.id).outbound("events"), payload, qos=1)
        self.inflight = (last, now)
        return False


def simulate(args: argparse.Namespace) -> int:
    """A simulator process: connect its gateways, say ``ready``, wait for ``go`` on
    stdin, send until every event is acknowledged, print its figures as JSON."""
    raise_open_files()
    ids = gateway_ids(args.gateways)[args.first:args.first + args.count]
    keys = load_trusted_keys(Path(args.trusted))
    sel = selectors.DefaultSelector()
    gateways: dict[str, SimGateway] = {}
    acks_seen = 0

    def on_open(client: Client, _u: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(sock, selectors.EVENT_READ, client)

    def on_close(_c: Client, _u: Any, sock: Any) -> None:
        sel.unregister(sock)

    def on_write(client: Client, _u: Any, sock: Any) -> None:
        sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def on_unwrite(client: Client, _u: Any, sock: Any) -> None:
        sel.modify(sock, selectors.EVENT_READ, client)

    def on_connect(client: Client, gw: SimGateway, *_a: Any) -> None:
        client.subscribe(Topics(gw.id).inbound("ack"), qos=1)

    def on_subscribe(_c: Client, gw: SimGateway, *_a: Any) -> None:
        gw.subscribed = True

    def on_message(_c: Client, gw: SimGateway, msg: MQTTMessage) -> None:
        nonlocal acks_seen
        acks_seen += 1
        if acks_seen % VERIFY_EVERY == 0:
            body = json.loads(open_envelope(bytes(msg.payload), msg.topic, keys, 1 << 20))
        else:
            body = json.loads(json.loads(msg.payload)["body"])
        gw.acks += 1
        gw.acked = max(gw.acked, min(int(body["upto"]), len(gw.events)))
        if gw.inflight is not None and body["upto"] >= gw.inflight[0]:
            gw.inflight = None

    for gid in ids:
        client = Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=gid,
                        protocol=MQTTProtocolVersion.MQTTv5)
        gw = SimGateway(gid, client, chain(gid, args.events), args.batch)
        client.user_data_set(gw)
        client.on_socket_open = on_open
        client.on_socket_close = on_close
        client.on_socket_register_write = on_write
        client.on_socket_unregister_write = on_unwrite
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(args.host, args.port, keepalive=300)
        gateways[gid] = gw

    def turn(timeout: float) -> None:
        for key, mask in sel.select(timeout):
            client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read(max_packets=16)
            if mask & selectors.EVENT_WRITE:
                client.loop_write()

    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(g.subscribed for g in gateways.values()):
        if time.monotonic() > deadline:
            raise SystemExit("simulated gateways did not all subscribe")
        turn(0.05)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    cpu_start = cpu_s(os.getpid())
    pending = list(gateways.values())
    last_misc = time.monotonic()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while pending:
        now = time.monotonic()
        pending = [g for g in pending if not g.pump(now, args.ack_timeout)]
        turn(0.01)
        if now - last_misc > 1.0:
            last_misc = now
            for g in gateways.values():
                g.client.loop_misc()
        if now > deadline:
            raise SystemExit("the run did not finish in time")
    finished = time.time()
    print(json.dumps({
        "finished": finished, "acked": sum(g.acked for g in gateways.values()),
        "resends": sum(g.resends for g in gateways.values()),
        "acks": sum(g.acks for g in gateways.values()),
        "cpu_s": cpu_s(os.getpid()) - cpu_start}), flush=True)
    for g in gateways.values():
        g.client.disconnect()
        turn(0)
    return 0


# -- the run -----------------------------------------------------------------------------


@dataclass
class Instance:
    """One office instance: its process and log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def subscribed(self) -> bool:
        """Whether it has logged its subscription (it exited: an error, with its log)."""
        if self.process.poll() is not None:
            raise SystemExit(f"{self.name} exited: {self.log.read_text()[-2000:]}")
        return "central_subscribed" in self.log.read_text()


def start_instance(folder: Path, broker: Broker, name: str, log: Path) -> Instance:
    """``permitgate-central serve --share ingest`` under client id ``name``."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "provisioning.central_cli", "serve", "--dir", str(folder),
             "--host", broker.host, "--port", str(broker.port), "--client-id", name,
             "--share", "ingest", "--heartbeat-every", "0", "--log-format", "json"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return Instance(name, process, log)


def start_simulators(args: argparse.Namespace, broker: Broker, trusted: Path
                     ) -> list[subprocess.Popen[str]]:
    """The simulator processes, each with its share of the gateways connected and
    subscribed, waiting for ``go``."""
    sims = []
    per = -(-args.gateways // args.sim_processes)
    for first in range(0, args.gateways, per):
        sims.append(subprocess.Popen(
            [sys.executable, __file__, "--role", "sim", "--gateways", str(args.gateways),
             "--first", str(first), "--count", str(per), "--events", str(args.events),
             "--batch", str(args.batch), "--ack-timeout", str(args.ack_timeout),
             "--host", broker.host, "--port", str(broker.port), "--trusted", str(trusted)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for sim in sims:
        assert sim.stdout is not None
        if sim.stdout.readline().strip() != "ready":
            raise SystemExit("a simulator did not get ready")
    return sims


def stop_all(sims: list[subprocess.Popen[str]], instances: list[Instance],
             broker: Broker) -> None:
    """Stop the simulators, the office instances (SIGTERM, then SIGKILL) and the broker."""
    for sim in sims:
        if sim.poll() is None:
            sim.kill()
        sim.wait()
    for instance in instances:
        instance.process.terminate()
    for instance in instances:
        try:
            instance.process.wait(30)
        except subprocess.TimeoutExpired:
            instance.process.kill()
            instance.process.wait()
    broker.stop()


def stored(url: str) -> tuple[int, int, dict[str, int]]:
    """Rows in ``events``, distinct ``(gateway, seq)``, and each gateway's ``acked_upto``."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT (gateway, seq)) FROM events"
                           ).fetchone()
        assert row is not None
        upto: dict[str, int] = {str(g): int(n) for g, n in conn.execute(
            "SELECT id, acked_upto FROM gateways")}
    return int(row[0]), int(row[1]), upto


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; its figures."""
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine skews the figure
    hard = raise_open_files()
    if hard < args.gateways + 256:
        raise SystemExit(f"open-file limit {hard} is too low for {args.gateways} gateways")
    with tempfile.TemporaryDirectory(prefix="office-ingest-") as tmp, \
            scratch_database() as conninfo:
        root = Path(tmp)
        template = root / "mosquitto.conf.in"
        template.write_text(f"listener 1883\nallow_anonymous true\n"
                            f"max_connections {args.gateways + 100}\n"
                            "max_queued_messages 100000\nmax_inflight_messages 100\n"
                            "set_tcp_nodelay true\n")
        broker = QuietBroker(root / "broker", template=template)
        broker.start()
        instances: list[Instance] = []
        sims: list[subprocess.Popen[str]] = []
        try:
            folder = root / "office"
            keygen(folder)
            url = postgres_url(conninfo)
            set_database(folder, url)
            ids = gateway_ids(args.gateways)
            with Central(folder, broker.host, broker.port) as central:
                for gid in ids:
                    central.add_gateway(gid, f"site-{gid}", os.urandom(32))
            for n in range(args.instances):
                name = f"office-{chr(ord('a') + n)}"
                instances.append(start_instance(folder, broker, name, root / f"{name}.log"))
            for instance in instances:
                wait_for(instance.subscribed, f"{instance.name} to subscribe",
                         START_TIMEOUT_S)
            sims.extend(start_simulators(args, broker, folder / TRUSTED_KEYS_NAME))
            broker_pid = broker._process.pid if broker._process else 0  # noqa: SLF001
            cpu_before = {i.name: cpu_s(i.process.pid) for i in instances}
            broker_before = cpu_s(broker_pid)
            started = time.time()
            for sim in sims:
                assert sim.stdin is not None
                sim.stdin.write("go\n")
                sim.stdin.flush()
            results = []
            for sim in sims:
                assert sim.stdout is not None
                results.append(json.loads(sim.stdout.readline()))
            seconds = max(r["finished"] for r in results) - started
            office_cpu = {i.name: round(cpu_s(i.process.pid) - cpu_before[i.name], 1)
                          for i in instances}
            broker_cpu = round(cpu_s(broker_pid) - broker_before, 1)
            for sim in sims:
                sim.wait(60)
        finally:
            stop_all(sims, instances, broker)
        rows, distinct, upto = stored(url)
    total = args.gateways * args.events
    return {
        "gateways": args.gateways, "instances": args.instances, "events": total,
        "batch": args.batch, "seconds": round(seconds, 2),
        "events_per_s": round(total / seconds),
        "lost": total - distinct, "duplicates_stored": rows - distinct,
        "all_acked_upto": all(upto.get(g) == args.events for g in ids),
        "resends": sum(r["resends"] for r in results),
        "acks": sum(r["acks"] for r in results),
        "office_cpu_s": office_cpu, "broker_cpu_s": broker_cpu,
        "simulators_cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "load_average_before": load_before,
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size (50 gateways)")
    parser.add_argument("--gateways", type=int)
    parser.add_argument("--events", type=int, help="events per gateway")
    parser.add_argument("--batch", type=int, help="events per batch")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--sim-processes", type=int, default=2)
    parser.add_argument("--ack-timeout", type=float, default=15.0,
                        help="seconds before a gateway sends a batch again (agent: 15)")
    parser.add_argument("--role", choices=("run", "sim"), default="run",
                        help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=1883, help=argparse.SUPPRESS)
    parser.add_argument("--trusted", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.gateways = args.gateways or (50 if quick else 1000)
    args.events = args.events or (40 if quick else 1000)
    args.batch = args.batch or (20 if quick else 500)
    if args.role == "sim":
        return simulate(args)
    figures = run(args)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
