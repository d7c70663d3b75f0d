"""Benchmark: the card path and the agent's memory while every kind of list work lands at once.

"Years unattended on a Pi": a gateway that has been cut off comes back and, all at the
same time, drains a backlog of ``--backlog`` events to the office (with the office's
acknowledgements), applies a new signed snapshot of ``--entries`` entries (replacing a
list of the same size) and receives ``--revocations`` revocations (in messages of
``--rev-items``, by default the office's ``REVOCATION_ITEMS``), while 8 readers are tapped
at a combined ``--rate`` taps/s for ``--duration`` seconds.

The parts are the real ones:

- the gateway is the agent as a child process (``python -m agent.cli run``), so the
  resident set measured is the agent's alone (the office builds a whole snapshot in
  memory, which would otherwise be counted) and it has a GIL of its own, as on a gateway;
  4 doors, each with a simulated entry and exit reader (8 readers), taps sent through its
  control socket (``permitgate sim tap``'s way in: into the reader's queue, through the
  reader thread, into ``handle_read``);
- the office is the ``Central`` library serving (``Central.run``) in a thread of this
  process: it stores and acknowledges the backlog, publishes the snapshot
  (``publish_snapshot``: a signed manifest and chunks of ``CHUNK_ENTRIES``, paced at the
  office's default ``DEFAULT_CHUNK_RATE`` bytes a second, or ``--chunk-rate``; 0:
  unpaced) and the revocations (``revoke``), and stores the gateway's ``applied``
  reports;
- the broker is a private mosquitto (tests/broker.py) with persistence, ``set_tcp_nodelay``
  and the shipped 4 MiB ``message_size_limit``.

Before the measured run (not timed): the office enrolls ``--entries`` cards, the agent
starts once and takes them as list version 1, and stops; its outbox is then filled with
``--backlog`` events through its own store (the same hash chain the card path writes), as
if they had been decided during an outage. The measured run starts the agent again while
the office is not serving, so the backlog waits; the readers are tapped for
``--warmup`` seconds (60 by default: long enough for the SQLite page caches of the
readers' connections, up to 2 MB each, to fill as they do in service) and
``rss_start_mb`` is taken (the median of the samples in the last half of the warm-up).
Then the office starts serving, publishes the snapshot and the revocations (interleaved:
one revocation message, the snapshot, the rest), and the taps go on until ``--duration``
seconds after the first; ``rss_end_mb`` is the median of the samples of the last 5 % of
the run (at least 1 s), with the agent still running.
Each tapped card is, by a seeded PRNG, one of the list (80 %), unknown (10 %), or one
that is being revoked (10 %).

Decision latency is the agent's own: the ``ms`` it logs with every ``access_granted`` /
``access_denied`` (from ``handle_read`` receiving the read to the relay command for a
grant, or to the event's durable commit for a denial). The agent's resident set is read
from /proc/PID/status every ``--sample-ms``: ``VmRSS`` samples, and ``VmHWM`` (the
kernel's own peak, so no short peak between samples is missed) for ``rss_peak_mb``.

Prints one JSON object as its last line: ``taps`` (decisions measured), ``p50_ms``,
``p99_ms``, ``max_decision_ms``, ``load_p99_ms``/``load_max_ms`` (decisions made while
list work was under way) and ``after_load_p99_ms`` (after it), ``rss_start_mb``,
``rss_peak_mb``, ``rss_sampled_peak_mb``, ``rss_end_mb``, ``backlog_drained_s``,
``snapshot_applied_s``, ``revocations_applied_s`` (from the start of the load to the
office holding the last event, or the gateway's ``applied`` report),
``snapshot_sent_s`` (to the office handing the snapshot's last chunk to its broker
client), ``chunk_rate``, the sizes, the
replies the control socket gave the taps, and ``loadavg_start``/``loadavg_end`` (the
machine's 1-minute load average: other work on the machine shows in every figure). With
``--keep DIR`` the RSS samples (``rss.tsv``) and every decision (``decisions.tsv``, s
from the first tap and ms) are written there too, beside the processes' logs.

Run: ``python bench/load.py`` (10 minutes; 1,000,000 entries, 100,000 revocations,
100,000 events) or ``--quick`` (20 s; 50,000 / 10,000 / 5,000) for a smoke run.
``--rev-items N`` sends the revocations N per message (up to ``MAX_ITEMS``), to see what
the size of one message costs the card path and the agent's memory; ``--chunk-rate B``
paces the snapshot's chunks at B bytes a second (0: all at once, as before pacing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.broker

from agent.store import Store
from bench.applied import AppliedHook, OfficeBench
from protocol.chain import Event
from protocol.messages import MAX_ITEMS, Revoked
from protocol.signing import b64
from provisioning.publish import DEFAULT_CHUNK_RATE, REVOCATION_ITEMS
from tests.agentconf import DoorSpec, ReaderSpec, write_agent
from tests.broker import Broker
from tests.harness import (
    GATEWAY,
    HASHER,
    SITE_KEY,
    UNKNOWN,
    VALID,
    AgentProcess,
    card_id,
    wait_for,
)

MESSAGE_SIZE_LIMIT = 4 * 1024 * 1024
"""As config/mosquitto/permitgate.conf ships it."""
DOORS = ("a", "b", "c", "d")
READERS = tuple(f"{door}-{way}" for door in DOORS for way in ("in", "out"))
"""4 doors, an entry and an exit reader at each: 8 readers."""


class LoadAgent(AgentProcess):
    """The agent child process with 4 doors and 8 simulated readers (``READERS``)."""

    def __init__(self, folder: Path, broker: Broker, trusted_keys: Path) -> None:
        super().__init__(folder, broker, trusted_keys)
        # The same agent as AgentProcess's, with 8 readers instead of 1. A long ack
        # timeout: while the office is not serving (the warm-up) the first backlog batch
        # waits in the broker for it instead of being sent again every 2 s.
        self.config = write_agent(
            folder, key=SITE_KEY, site_id="site-f", gateway_id=GATEWAY,
            store={"path": "pg.db"},
            sync={"enabled": True, "host": broker.host, "port": broker.port, "tls": False,
                  "trusted_keys": str(trusted_keys), "status_interval_s": 5,
                  "keepalive_s": 30, "ack_timeout_s": 60.0, "resync_interval_s": 5},
            doors=tuple(DoorSpec(id=d, unlock_s=0.2) for d in DOORS),
            readers=tuple(ReaderSpec(id=r, door=r.split("-")[0],
                                     direction="entry" if r.endswith("-in") else "exit",
                                     debounce_s=0) for r in READERS))

    def start(self) -> None:
        """Start the agent; return once it runs and every reader is open."""
        super().start()
        wait_for(lambda: {r.get("reader") for r in self.log.records()
                          if r.get("event") == "reader_online"} >= set(READERS),
                 "every reader online", timeout=30)


class RssSampler:
    """Reads a process's VmRSS (and VmHWM) from /proc every ``every_s``."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid = pid
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        """(perf_counter, VmRSS in MB)"""
        self.hwm_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def read(self) -> tuple[float, float] | None:
        """(VmRSS, VmHWM) in MB now, or None once the process is gone."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return (int(fields["VmRSS"].split()[0]) / 1024,
                int(fields["VmHWM"].split()[0]) / 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.read()
            if now is None:
                return
            self.samples.append((time.perf_counter(), now[0]))
            self.hwm_mb = now[1]
            self._stop.wait(self.every_s)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (one last reading of the peak first)."""
        last = self.read()
        if last is not None:
            self.hwm_mb = last[1]
        self._stop.set()
        self._thread.join(5)

    def median(self, start: float, end: float) -> float:
        """The median VmRSS of the samples taken within [start, end]."""
        window = [mb for at, mb in self.samples if start <= at <= end]
        if not window:
            raise SystemExit("no RSS sample in the window")
        return statistics.median(window)


class Readers:
    """Taps the agent's 8 readers at a combined ``rate`` per second (Poisson arrivals,
    a random reader each time, seeded) through its control socket, and counts replies."""

    def __init__(self, folder: Path, target: Path, rate: float, cards: Sequence[str],
                 revoked: Sequence[str], *, seed: int = 7) -> None:
        self.target = str(target)
        self.rate = rate
        self.cards = cards
        self.revoked = revoked
        self.random = random.Random(seed)
        self.sent = 0
        self.replies: dict[str, int] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(folder / "taps.sock"))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._send = threading.Thread(target=self._run, name="taps", daemon=True)
        self._recv = threading.Thread(target=self._answers, name="tap-replies", daemon=True)

    def _card(self) -> str:
        roll = self.random.random()
        if roll < 0.8:
            return card_id(self.random.choice(self.cards))
        if roll < 0.9:
            return card_id(self.random.choice(UNKNOWN))
        return card_id(self.random.choice(self.revoked))

    def _run(self) -> None:
        next_at = time.perf_counter()
        while not self._stop.is_set():
            message = {"op": "tap", "reader": self.random.choice(READERS),
                       "card": self._card()}
            with contextlib.suppress(OSError):
                self._sock.sendto(json.dumps(message).encode(), self.target)
                self.sent += 1
            next_at += self.random.expovariate(self.rate)
            self._stop.wait(max(0.0, next_at - time.perf_counter()))

    def _answers(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = json.loads(data)
            key = (("granted" if reply["granted"] else reply["reason"]) if reply.get("ok")
                   else f"error:{reply.get('error')}")
            self.replies[key] = self.replies.get(key, 0) + 1

    def start(self) -> None:
        """Start tapping."""
        self._send.start()
        self._recv.start()

    def stop(self) -> None:
        """Stop tapping, wait a moment for the last replies, close the socket."""
        self._stop.set()
        self._send.join(5)
        self._recv.join(5)
        self._sock.close()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def list_card(i: int) -> str:
    """The EM4100 value of list card ``i``."""
    return f"{0xC000000000 + i:010X}"


def fill_outbox(db: Path, count: int) -> int:
    """Append ``count`` denials through the agent's store (the agent stopped, as if they
    had been decided during an outage). Returns the last seq."""
    store = Store(db)
    try:
        # Not measured, and the same events either way: without a sync per event the fill
        # takes seconds instead of minutes (100,000 fsyncs). The agent reopens the file
        # with its own synchronous=FULL.
        store._writer.execute("PRAGMA synchronous=OFF")  # noqa: SLF001 - see above
        for i in range(count):
            store.append(Event("access_denied", door="a", reader="a-in",
                               direction="entry", reason="unknown_card",
                               cred=f"{i:010x}"))
        return store.last_seq()
    finally:
        store.close()


def decisions(agent: AgentProcess) -> list[tuple[float, float]]:
    """(wall time, ms) of every access decision the agent logged in this run."""
    found = []
    for record in agent.log.records():
        if record.get("event") in ("access_granted", "access_denied") and "ms" in record:
            at = datetime.fromisoformat(record["timestamp"]).timestamp()
            found.append((at, float(record["ms"])))
    return found


def arguments() -> argparse.Namespace:
    """The command line, with ``--quick`` applied and checked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of tapping, warm-up included (default 600)")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds of taps before the load starts (default 60)")
    parser.add_argument("--rate", type=float, default=50.0, help="taps/s over all readers")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--revocations", type=int, default=100_000)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--rev-items", type=int, default=REVOCATION_ITEMS, metavar="N",
                        help=f"revocations per message (default {REVOCATION_ITEMS:,}, as "
                        f"the office sends them; at most MAX_ITEMS, {MAX_ITEMS:,})")
    parser.add_argument("--chunk-rate", type=int, default=DEFAULT_CHUNK_RATE,
                        metavar="BYTES_PER_S", help="the office's pacing of snapshot chunks "
                        f"(default {DEFAULT_CHUNK_RATE:,}, the office's; 0: unpaced)")
    parser.add_argument("--sample-ms", type=float, default=100.0)
    parser.add_argument("--agent-cpu", type=int, metavar="N",
                        help="run the agent on CPU N alone and the office and broker on the "
                        "others, as on a gateway, which shares its CPU with neither "
                        "(default: every process on every CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="20 s; 50,000 entries, 10,000 revocations, 5,000 events")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep the logs")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 20.0, 4.0
        args.entries, args.revocations, args.backlog = 50_000, 10_000, 5_000
    if not 1 <= args.rev_items <= MAX_ITEMS:
        raise SystemExit(f"--rev-items: 1 to {MAX_ITEMS}")
    if args.agent_cpu is not None and (args.agent_cpu not in os.sched_getaffinity(0)
                                       or len(os.sched_getaffinity(0)) < 2):
        parser.error(f"--agent-cpu {args.agent_cpu}: not one of at least two CPUs this "
                     f"process may use ({sorted(os.sched_getaffinity(0))})")
    if args.chunk_rate < 0:
        raise SystemExit("--chunk-rate: 0 (unpaced) or more bytes per second")
    if args.revocations > args.entries:
        raise SystemExit("--revocations: at most --entries (list cards are revoked)")
    return args


@contextlib.contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """Processes started inside run on ``cpu`` alone (a child inherits the mask of the
    thread that starts it); nothing changes with None."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main() -> int:
    """Run the benchmark and print its JSON figures."""
    args = arguments()
    if args.agent_cpu is not None:
        # Before any thread or child: the office's thread and the broker inherit this.
        os.sched_setaffinity(0, os.sched_getaffinity(0) - {args.agent_cpu})
    hook = AppliedHook()
    with tempfile.TemporaryDirectory(prefix="permitgate-bench-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        rig = OfficeBench.start(folder, hook, info_only=True, broker={
            "tcp_nodelay": True, "message_size_limit": MESSAGE_SIZE_LIMIT},
            request_timeout_s=900, chunk_rate=args.chunk_rate)
        broker, gw, office = rig.broker, rig.gw, rig.office
        central = office.central
        agent = LoadAgent(gw, broker, office.trusted_keys)
        serving: threading.Thread | None = None
        stop_office = threading.Event()
        sampler: RssSampler | None = None
        readers: Readers | None = None

        def serve() -> threading.Thread:
            thread = threading.Thread(target=central.run, args=(stop_office,), name="office")
            thread.start()
            if not central.subscribed.wait(30):
                raise SystemExit("the office did not subscribe")
            return thread

        try:
            # -- before the run: a gateway holding a list of --entries, and a backlog --
            prepared = time.perf_counter()
            cards = [list_card(i) for i in range(args.entries - len(VALID))]
            central.enroll_many(GATEWAY, [(card_id(c), f"P-L{c}") for c in cards])
            serving = serve()
            with on_cpu(args.agent_cpu):
                agent.start()
            # The office answers the new gateway's request with its first list (its
            # version is the office's to choose: time-based, docs/protocol.md).
            first = hook.first("list", timeout=900)
            if agent.list_state() != (first, args.entries):
                raise SystemExit(f"the first list did not arrive whole: {agent.list_state()}")
            agent.stop()
            agent.close()
            stop_office.set()
            serving.join(60)
            serving, stop_office = None, threading.Event()
            backlog_last = fill_outbox(agent.db, args.backlog)
            revoked = cards[-args.revocations:]
            items = [Revoked(kind="credential", hash=b64(HASHER.credential(card_id(c))))
                     for c in revoked]
            prepare_s = time.perf_counter() - prepared

            # -- the run --
            with on_cpu(args.agent_cpu):
                agent.start()
            sampler = RssSampler(agent.pid, args.sample_ms / 1000)
            sampler.start()
            readers = Readers(folder, gw / "sim.sock", args.rate,
                              [*VALID, *cards[:len(cards) - args.revocations]], revoked)
            readers.start()
            started = time.perf_counter()
            started_wall = time.time()
            time.sleep(max(0.0, args.warmup - (time.perf_counter() - started)))
            t0 = time.perf_counter()
            t0_wall = time.time()
            load_start = os.getloadavg()[0]
            rss_start = sampler.median(t0 - args.warmup / 2, t0)
            serving = serve()
            step = args.rev_items
            batches = [items[i:i + step] for i in range(0, len(items), step)]
            rev_seqs = [central.revoke(GATEWAY, batches[0])]
            version = central.publish_snapshot(GATEWAY)
            rev_seqs += [central.revoke(GATEWAY, batch) for batch in batches[1:]]
            published = time.perf_counter() - t0

            backlog_s = hook.wait_stored(backlog_last, timeout=900) - t0
            sent_s = hook.wait_sent(version, timeout=900) - t0
            snapshot_s = hook.wait("list", version, timeout=900) - t0
            revocations_s = max(hook.wait("rev", s, timeout=900) for s in rev_seqs) - t0
            load_s = max(backlog_s, snapshot_s, revocations_s)
            load_end_wall = t0_wall + load_s
            end = started + args.duration
            if time.perf_counter() > end - 2:
                raise SystemExit(f"the load took {load_s:.1f} s: --duration "
                                 f"{args.duration:g} leaves no time after it")
            time.sleep(max(0.0, end - time.perf_counter()))
            finished = time.perf_counter()
            tail = max(1.0, 0.05 * args.duration)
            rss_end = sampler.median(finished - tail, finished)
            readers.stop()
            sampler.stop()
            store = agent.store()
            state = (store.versions().get("list"), store.counts())
            for c in revoked[:: max(1, len(revoked) // 20)]:
                if not store.lookup(HASHER.credential(card_id(c))).revoked:
                    raise SystemExit(f"card {c}: revocation reported applied, not in force")
            agent.stop()
        finally:
            if readers is not None:
                readers.stop()
            if sampler is not None:
                sampler.stop()
            agent.close()
            stop_office.set()
            if serving is not None:
                serving.join(60)
            rig.close()
        decided = [(at, ms) for at, ms in decisions(agent) if at >= started_wall]
        latencies = [ms for _, ms in decided]
        under_load = [ms for at, ms in decided if t0_wall <= at <= load_end_wall]
        after_load = [ms for at, ms in decided if at > load_end_wall]
        counts = state[1]
        if args.keep:
            with (folder / "rss.tsv").open("w") as out:
                out.writelines(f"{at - started:.2f}\t{mb:.1f}\n" for at, mb in sampler.samples)
            with (folder / "decisions.tsv").open("w") as out:
                out.writelines(f"{at - started_wall:.3f}\t{ms}\n" for at, ms in decided)
    if state[0] != version or counts["credentials"] != args.entries:
        raise SystemExit(f"the gateway holds list {state[0]} with {counts['credentials']} "
                         f"entries, not version {version} with {args.entries}")
    figures: dict[str, Any] = {
        "benchmark": "load",
        "taps": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "max_decision_ms": round(max(latencies), 3),
        "load_taps": len(under_load),
        "load_p99_ms": round(percentile(under_load, 0.99), 3) if under_load else None,
        "load_max_ms": round(max(under_load), 3) if under_load else None,
        "after_load_p99_ms": round(percentile(after_load, 0.99), 3) if after_load else None,
        "rss_start_mb": round(rss_start, 1),
        "rss_peak_mb": round(sampler.hwm_mb, 1),
        "rss_sampled_peak_mb": round(max(mb for _, mb in sampler.samples), 1),
        "rss_end_mb": round(rss_end, 1),
        "backlog_drained_s": round(backlog_s, 2),
        "snapshot_applied_s": round(snapshot_s, 2),
        "revocations_applied_s": round(revocations_s, 2),
        "publish_s": round(published, 2),
        "snapshot_sent_s": round(sent_s, 2),
        "chunk_rate": args.chunk_rate,
        "agent_cpu": args.agent_cpu,
        "duration_s": round(finished - started, 1),
        "warmup_s": args.warmup,
        "rate_per_s": args.rate,
        "taps_sent": readers.sent,
        "replies": dict(sorted(readers.replies.items())),
        "entries": args.entries,
        "revocations": args.revocations,
        "revocation_messages": len(rev_seqs),
        "backlog": args.backlog,
        "revocations_held": counts["revocations"],
        "prepare_s": round(prepare_s, 1),
        "loadavg_start": round(load_start, 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "gateway": "agent child process (python -m agent.cli run), 8 simulated readers",
        "office": "Central.run in a thread of this process",
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
