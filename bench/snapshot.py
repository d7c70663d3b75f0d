"""Benchmark: a whole signed allowlist from the office to applied at the gateway.

The office is the ``Central`` library running its serve loop (``Central.run``) in a
thread of this process; the gateway is the real agent as a child process
(``python -m agent.cli run``, simulated reader); the broker is a local mosquitto
(tests/broker.py, persistence on, ``message_size_limit`` 4 MiB as in the shipped
config/mosquitto/permitgate.conf; a 10,000-entry chunk is about 1.3 MB). Once the
gateway holds a small first list, ``--entries`` entries in all are enrolled and
``Central.publish_snapshot`` sends them as the next version: a signed manifest and
chunks of 10,000 entries. The clock runs from that call until the gateway's ``applied``
report for the version is stored by the office; the agent then holds exactly the new
list, and a card from it is granted.

Prints one JSON object as its last line: ``entries``, ``seconds`` (publish → applied at
the office), ``publish_s`` (the part until the office had built, signed and handed every
chunk to the broker client), ``chunks``, ``enroll_s``.

Run: ``python bench/snapshot.py`` (1,000,000 entries) or ``--quick`` (20,000).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.broker

from bench.applied import AppliedHook, OfficeBench
from provisioning.central import MAX_CHUNK_ENTRIES
from tests.harness import (
    GATEWAY,
    VALID,
    AgentProcess,
    card_id,
)

MESSAGE_SIZE_LIMIT = 4 * 1024 * 1024
"""As config/mosquitto/permitgate.conf ships it."""


def main() -> int:
    """Run the benchmark and print its JSON figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="20,000 entries")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep the logs")
    args = parser.parse_args()
    if args.quick:
        args.entries = 20_000
    hook = AppliedHook()
    with tempfile.TemporaryDirectory(prefix="permitgate-bench-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        rig = OfficeBench.start(folder, hook, broker={
            "tcp_nodelay": True, "message_size_limit": MESSAGE_SIZE_LIMIT},
            request_timeout_s=600)
        broker, gw, office = rig.broker, rig.gw, rig.office
        central = office.central
        stop = threading.Event()
        serving = threading.Thread(target=central.run, args=(stop,), name="office")
        agent = AgentProcess(gw, broker, office.trusted_keys, status_interval_s=5,
                             ack_timeout_s=60)
        try:
            serving.start()
            if not central.subscribed.wait(15):
                raise SystemExit("the office did not subscribe")
            agent.start()
            hook.first("list", timeout=60)  # the first list (its version is the office's)
            extra = [f"{0xC000000000 + i:010X}" for i in range(args.entries - len(VALID))]
            enrolled = time.perf_counter()
            central.enroll_many(GATEWAY, [(card_id(c), f"P-S{c}") for c in extra])
            enroll_s = time.perf_counter() - enrolled
            started = time.perf_counter()
            version = central.publish_snapshot(GATEWAY)
            published = time.perf_counter()
            applied = hook.wait("list", version, timeout=600)
            assert agent.list_state() == (version, args.entries)
            if agent.decide(extra[-1]).kind != "access_granted":
                raise SystemExit("a card of the new list was not granted")
        finally:
            agent.close()
            stop.set()
            serving.join(60)
            rig.close()
    figures: dict[str, Any] = {
        "benchmark": "snapshot",
        "entries": args.entries,
        "seconds": round(applied - started, 2),
        "publish_s": round(published - started, 2),
        "chunks": -(-args.entries // MAX_CHUNK_ENTRIES),
        "enroll_s": round(enroll_s, 2),
        "gateway": "agent child process (python -m agent.cli run)",
        "office": "Central.run in a thread of this process",
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
