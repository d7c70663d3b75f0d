"""Benchmark: a revocation from the office to enforcement at the door and back.

The office is the ``Central`` library running its serve loop (``Central.run``) in a
thread of this process; the gateway is the real agent as a child process
(``python -m agent.cli run``, simulated reader), both on a local mosquitto
(tests/broker.py, persistence on, ``set_tcp_nodelay`` unless ``--nagle``). After the
gateway has applied its first list (``--revocations`` enrolled cards), the office
revokes one card at a time with ``Central.revoke`` (the seq committed, the message
signed and published), and the clock stops when the gateway's ``applied`` report for
that seq has been stored by the office. Each time the benchmark then checks, outside
the timed span, that the agent's store says the card is revoked, and every
``--tap-every``-th card is also presented at the reader to confirm a denial.

Then the same during a snapshot: the office enrolls ``--snapshot-entries`` more cards and
publishes the whole list as a snapshot (in the office's chunks of
``provisioning.publish.CHUNK_ENTRIES``, paced as the office paces them:
``DEFAULT_CHUNK_RATE`` bytes a second, or ``--chunk-rate``; 0: unpaced), and while the
gateway receives, stages and swaps it in, cards are revoked one at a time as before. A
revocation counts as "during" if its ``applied`` report was stored before the snapshot's.
After the snapshot has applied, every card revoked during it must still be revoked (the
swap keeps revocations newer than the snapshot).

Prints one JSON object as its last line: ``count``, ``p50_ms``, ``p99_ms``, ``max_ms``,
``mean_ms`` (office publish → gateway applied and enforced → ``applied`` stored at the
office), ``taps_denied`` (sample taps, each denied as ``revoked``), and for the second
part ``during_snapshot_count``, ``during_snapshot_p50_ms``, ``during_snapshot_p99_ms``,
``during_snapshot_max_ms``, ``snapshot_entries``, ``snapshot_sent_s`` (from the office
having published it to its last chunk handed to the broker client), ``snapshot_applied_s``
(to the gateway's report stored) and ``chunk_rate``.

Run: ``python bench/revocation.py`` (1,000 revocations; a 1,000,000-entry snapshot) or
``--quick`` (100; 20,000).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.broker

from bench.applied import AppliedHook, OfficeBench
from protocol.messages import Revoked
from protocol.signing import b64
from provisioning.publish import DEFAULT_CHUNK_RATE
from tests.harness import (
    GATEWAY,
    HASHER,
    AgentProcess,
    card_id,
)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def card(i: int) -> str:
    """The EM4100 value of revocable card ``i``."""
    return f"{0xB000000000 + i:010X}"


def during_snapshot(central: Any, agent: AgentProcess, hook: AppliedHook,
                    args: argparse.Namespace) -> tuple[list[float], float, float]:
    """Revoke cards one at a time while the gateway applies a snapshot of
    ``--snapshot-entries``; the latencies of those applied before it, how long its chunks
    took to send, and how long it took to apply."""
    base = args.revocations
    central.enroll_many(GATEWAY, [(card_id(card(base + i)), f"P-S{i}")
                                  for i in range(args.snapshot_entries)])
    version = central.publish_snapshot(GATEWAY)
    published = time.perf_counter()
    during: list[float] = []
    revoked: list[bytes] = []
    i = 0
    while hook.at("list", version) is None and i < args.snapshot_entries:
        cred = HASHER.credential(card_id(card(base + i)))
        started = time.perf_counter()
        seq = central.revoke(GATEWAY, [Revoked(kind="credential", hash=b64(cred))])
        at = hook.wait("rev", seq, timeout=600)
        revoked.append(cred)
        list_at = hook.at("list", version)
        if list_at is None or at < list_at:
            during.append((at - started) * 1000)
        i += 1
    snapshot_s = hook.wait("list", version, timeout=1800) - published
    sent_s = max(0.0, hook.wait_sent(version, timeout=60) - published)
    store = agent.store()
    for cred in revoked:
        if not store.lookup(cred).revoked:
            raise SystemExit("a card revoked during the snapshot is not revoked after it")
    return during, sent_s, snapshot_s


def main() -> int:
    """Run the benchmark and print its JSON figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--revocations", type=int, default=1_000)
    parser.add_argument("--tap-every", type=int, default=10, metavar="N",
                        help="present every N-th revoked card at the reader (default 10)")
    parser.add_argument("--nagle", action="store_true",
                        help="leave the broker's set_tcp_nodelay off (mosquitto's default)")
    parser.add_argument("--snapshot-entries", type=int, default=1_000_000, metavar="N",
                        help="cards in the snapshot applied during the second part")
    parser.add_argument("--chunk-rate", type=int, default=DEFAULT_CHUNK_RATE,
                        metavar="BYTES_PER_S", help="the office's pacing of snapshot chunks "
                        f"(default {DEFAULT_CHUNK_RATE:,}, the office's; 0: unpaced)")
    parser.add_argument("--quick", action="store_true",
                        help="100 revocations, a 20,000-entry snapshot")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep the logs")
    args = parser.parse_args()
    if args.quick:
        args.revocations, args.snapshot_entries = 100, 20_000
    if args.chunk_rate < 0:
        raise SystemExit("--chunk-rate: 0 (unpaced) or more bytes per second")
    hook = AppliedHook()
    with tempfile.TemporaryDirectory(prefix="permitgate-bench-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        rig = OfficeBench.start(folder, hook, broker={"tcp_nodelay": not args.nagle},
                                chunk_rate=args.chunk_rate)
        broker, gw, office = rig.broker, rig.gw, rig.office
        central = office.central
        central.enroll_many(GATEWAY, [(card_id(card(i)), f"P-R{i}")
                                      for i in range(args.revocations)])
        stop = threading.Event()
        serving = threading.Thread(target=central.run, args=(stop,), name="office")
        agent = AgentProcess(gw, broker, office.trusted_keys, status_interval_s=5)
        latencies: list[float] = []
        denied = 0
        try:
            serving.start()
            if not central.subscribed.wait(15):
                raise SystemExit("the office did not subscribe")
            agent.start()
            hook.first("list", timeout=60)
            for i in range(args.revocations):
                cred = HASHER.credential(card_id(card(i)))
                started = time.perf_counter()
                seq = central.revoke(GATEWAY, [Revoked(kind="credential", hash=b64(cred))])
                latencies.append((hook.wait("rev", seq) - started) * 1000)
                if not agent.store().lookup(cred).revoked:
                    raise SystemExit(f"revocation {seq} acknowledged but not in the store")
                if i % args.tap_every == 0:
                    decision = agent.decide(card(i))
                    if (decision.kind, decision.reason) != ("access_denied", "revoked"):
                        raise SystemExit(f"card {i}: {decision.kind} ({decision.reason}) "
                                         "after its revocation was applied")
                    denied += 1
            during, sent_s, snapshot_s = during_snapshot(central, agent, hook, args)
        finally:
            agent.close()
            stop.set()
            serving.join(30)
            rig.close()
    figures: dict[str, Any] = {
        "benchmark": "revocation",
        "count": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "max_ms": round(max(latencies), 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
        "taps_denied": denied,
        "during_snapshot_count": len(during),
        "during_snapshot_p50_ms": round(percentile(during, 0.50), 3) if during else None,
        "during_snapshot_p99_ms": round(percentile(during, 0.99), 3) if during else None,
        "during_snapshot_max_ms": round(max(during), 3) if during else None,
        "snapshot_entries": args.snapshot_entries,
        "snapshot_sent_s": round(sent_s, 2),
        "snapshot_applied_s": round(snapshot_s, 2),
        "chunk_rate": args.chunk_rate,
        "broker_tcp_nodelay": not args.nagle,
        "gateway": "agent child process (python -m agent.cli run), simulated reader",
        "office": "Central.run in a thread of this process",
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
