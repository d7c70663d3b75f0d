"""Benchmark: card read to relay command, with the event committed durably first.

Builds a store with ``--entries`` credentials and ``--revocations`` revocations (timing the
whole-list apply), starts the real agent with a simulated reader and a relay that notes
when it is told to unlock, presents ``--decisions`` cards (80 % valid, 10 % unknown, 10 %
revoked), and prints one JSON object as its last line:

- ``p50_ms``/``p99_ms``: from the read handed to the agent to the relay command for
  grants, to the durable commit of the event for denials (no relay command follows);
- ``grant_p99_ms``: grants only; ``rss_mb``: the process's peak resident memory;
- ``apply_s``: time to apply the whole list in one transaction.

Run: ``python bench/decision.py`` (1,000,000 entries) or ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.agentconf

from agent.config import ReaderConfig, parse_config
from agent.decision import Decision
from agent.runtime import Agent, ReadTiming
from agent.store import CredentialEntry, Store
from common import logs
from drivers.simulated import SimBus, SimulatedRelay
from protocol.hashing import CredentialHasher
from tests.agentconf import DoorSpec, ReaderSpec, agent_toml


def bench_config(folder: Path, unlock_s: float) -> str:
    """The agent's configuration: one door, one simulated reader without debounce, the
    store and a generated site key in ``folder``."""
    return agent_toml(folder, site_id="bench", gateway_id="bench-gw",
                      store={"path": str(folder / "bench.db")},
                      keys={"generate_missing": True},
                      doors=(DoorSpec("bench", unlock_s=unlock_s),),
                      readers=(ReaderSpec("bench-in", door="bench", debounce_s=0),))


class TimedRelay(SimulatedRelay):
    """A simulated relay that records when it is told to unlock."""

    def __init__(self, bus: SimBus) -> None:
        super().__init__("bench.relay", {}, bus)
        self.unlocked_at: list[float] = []
        self.event = threading.Event()

    def set(self, unlocked: bool) -> None:
        """Record the time of an unlock command."""
        if unlocked:
            self.unlocked_at.append(time.perf_counter())
            self.event.set()
        super().set(unlocked)


def card(i: int) -> str:
    """The card id of enrolled credential ``i``."""
    return f"em4100:{i:010X}"


def entries(hasher: CredentialHasher, n: int, hash_all: bool) -> Iterator[CredentialEntry]:
    """``n`` allowlist entries. Cards the benchmark presents are hashed with the site key;
    the rest get cheap distinct stand-ins (the office sends hashes: the gateway never
    computes them while applying a list)."""
    for i in range(n):
        cred = (hasher.credential(card(i)) if hash_all or i % 97 == 0
                else hashlib.sha256(b"c%d" % i).digest())
        yield CredentialEntry(cred, hashlib.sha256(b"p%d" % i).digest(),
                              valid_until=4_000_000_000)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> int:
    """Run the benchmark and print its JSON figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--revocations", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=2_000)
    parser.add_argument("--quick", action="store_true", help="20k entries, 300 decisions")
    args = parser.parse_args()
    if args.quick:
        args.entries, args.revocations, args.decisions = 20_000, 2_000, 300
    logs.configure("warning", "json", sys.stderr)
    rng = random.Random(7)
    unlock_s = 0.005
    with tempfile.TemporaryDirectory(prefix="permitgate-bench-") as tmp:
        folder = Path(tmp)
        config = parse_config(bench_config(folder, unlock_s), "<bench>")
        bus = SimBus()
        relay = TimedRelay(bus)
        agent = Agent(config, bus=bus, devices={"bench.relay": relay})
        timings: list[tuple[Decision, ReadTiming]] = []
        decided = threading.Event()

        def on_decision(_r: ReaderConfig, decision: Decision, timing: ReadTiming) -> None:
            timings.append((decision, timing))
            decided.set()

        agent.on_decision = on_decision
        agent.start()
        store: Store | None = agent.store
        assert store is not None and agent.hasher is not None
        started = time.perf_counter()
        store.replace_allowlist(entries(agent.hasher, args.entries, hash_all=False), 1)
        apply_s = time.perf_counter() - started
        revoked_ids = range(args.entries - args.revocations, args.entries)
        store.revoke([(agent.hasher.credential(card(i)) if i % 97 == 0
                       else hashlib.sha256(b"c%d" % i).digest(), "credential")
                      for i in revoked_ids], 1)
        presentable = list(range(0, args.entries - args.revocations, 97))
        revoked_presentable = [i for i in revoked_ids if i % 97 == 0] or [args.entries - 1]
        samples: list[float] = []
        grants: list[float] = []
        commits: list[float] = []
        for n in range(args.decisions):
            roll = rng.random()
            if roll < 0.8:
                card_id = card(rng.choice(presentable))
            elif roll < 0.9:
                card_id = f"em4100:FF{n:08X}"
            else:
                card_id = card(rng.choice(revoked_presentable))
            relay.event.clear()
            decided.clear()
            bus.tap("bench-in", card_id)
            if not decided.wait(5):
                raise SystemExit(f"no decision for read {n}")
            decision, timing = timings[-1]
            if decision.granted:
                if not relay.event.wait(5):
                    raise SystemExit(f"relay not driven for grant {n}")
                latency = relay.unlocked_at[-1] - timing.received
                grants.append(latency * 1000)
                # Wait for the relock so the next grant drives the relay again.
                deadline = time.monotonic() + 5
                while bus.relays.get("bench.relay") and time.monotonic() < deadline:
                    time.sleep(0.001)
            else:
                latency = timing.committed - timing.received
            samples.append(latency * 1000)
            commits.append((timing.committed - timing.received) * 1000)
        agent.stop()
        report = agent.store_path
        figures: dict[str, Any] = {
            "benchmark": "decision",
            "entries": args.entries,
            "revocations": args.revocations,
            "decisions": len(samples),
            "granted": len(grants),
            "p50_ms": round(percentile(samples, 0.50), 3),
            "p99_ms": round(percentile(samples, 0.99), 3),
            "max_ms": round(max(samples), 3),
            "mean_ms": round(statistics.fmean(samples), 3),
            "grant_p50_ms": round(percentile(grants, 0.50), 3) if grants else None,
            "grant_p99_ms": round(percentile(grants, 0.99), 3) if grants else None,
            "commit_p99_ms": round(percentile(commits, 0.99), 3),
            "apply_s": round(apply_s, 2),
            "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "db_mb": round(report.stat().st_size / 1e6, 1),
            "synchronous": "FULL",
        }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
