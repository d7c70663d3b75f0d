"""Real processes for the sync fault tests and the sync benchmarks.

Not a test module: tests/test_sync_faults.py and bench/*.py build on it. It runs the
agent (``python -m agent.cli run``) with sync enabled and the office's
``permitgate-central serve`` as child processes against a broker from tests/broker.py,
and reads both sides' databases to compare what was sent with what arrived.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.store import Store, StoredEvent
from drivers.serial_reader import em4100_frame
from protocol.chain import GENESIS, Event, event_hash
from protocol.hashing import CredentialHasher
from provisioning.central import TRUSTED_KEYS_NAME, Central, keygen
from tests.agentconf import DoorSpec, ReaderSpec, write_agent
from tests.broker import Broker
from tests.conftest import PtyPeer
from tests.waiting import wait_for as wait_for  # noqa: PLC0414 - bench/backlog.py imports it

REPO = Path(__file__).resolve().parent.parent
SITE_KEY = bytes(range(32))
GATEWAY = "gw-f"
VALID = ("67003B51C6", "67003BA86C", "1122334455")
"""EM4100 values the office enrolls at the start (all granted once the list is applied)."""
UNKNOWN = ("DEADBEEF00", "DEADBEEF01")
"""Two cards nobody enrolled: alternating them gives one denial (one event) per tap."""
HASHER = CredentialHasher(SITE_KEY)


def card_id(value: str) -> str:
    """The normalised id the serial reader reports for an EM4100 ``value``."""
    return f"em4100:{value}"


class JsonLog:
    """The JSON-lines log a child process writes to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def size(self) -> int:
        """The current length in bytes (an offset for ``records``)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def records(self, since: int = 0) -> list[dict[str, Any]]:
        """Every complete JSON line from byte offset ``since``."""
        try:
            with self.path.open("rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return []
        records = []
        for line in data.split(b"\n"):
            if line.startswith(b"{") and line.endswith(b"}"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a kill
        return records

    def find(self, event: str, since: int = 0, **fields: Any) -> dict[str, Any] | None:
        """The first record named ``event`` (with ``fields``) from offset ``since``."""
        for record in self.records(since):
            if record.get("event") == event and all(record.get(k) == v
                                                    for k, v in fields.items()):
                return record
        return None

    def wait(self, event: str, since: int = 0, timeout: float = 30.0,
             **fields: Any) -> dict[str, Any]:
        """Wait for ``find`` to return a record."""
        return wait_for(lambda: self.find(event, since, **fields),
                        f"{event} {fields or ''} in {self.path.name}", timeout)


class _Child:
    """A child process whose output goes to a log file (one file per start)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log = JsonLog(folder / f"{name}-0.log")

    def _spawn(self, argv: list[str], cwd: Path) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} runs already")
        self.log = JsonLog(self.folder / f"{self.name}-{self.starts}.log")
        self.starts += 1
        with self.log.path.open("wb") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as on a crash or a power cut; waits for the process to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status (a stuck process is killed)."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout:g} s") from None

    def text(self) -> str:
        """The current log, for failure messages."""
        try:
            return self.log.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Office:
    """A central folder (keys from ``keygen``), one registered gateway, the cards ``VALID``
    enrolled, and a ``Central`` for reading its state and one-shot publishing."""

    def __init__(self, folder: Path, broker: Broker, site_key: Path,
                 gateway: str = GATEWAY, **central: Any) -> None:
        self.folder = folder
        self.broker = broker
        self.gateway = gateway
        keygen(folder)
        self.central = Central(folder, broker.host, broker.port, **central)
        self.central.add_gateway(gateway, "site-f", site_key)
        self.central.enroll_many(gateway, [(card_id(c), f"P-{c}") for c in VALID])
        self.trusted_keys = folder / TRUSTED_KEYS_NAME

    def close(self) -> None:
        """Release the folder and the database."""
        self.central.close()

    def report(self) -> dict[str, Any]:
        """The ``show`` report of the gateway."""
        return self.central.gateway_report(self.gateway)

    def acked_upto(self) -> int:
        """The highest contiguous event seq the office has stored."""
        return int(self.report()["events"]["acked_upto"])

    def online(self) -> bool | None:
        """What the gateway's last status said (None before any)."""
        online: bool | None = self.report()["online"]
        return online

    def events(self) -> list[dict[str, Any]]:
        """Every event stored for the gateway, in seq order."""
        return self.central.events(self.gateway)


class ServeProcess(_Child):
    """``permitgate-central serve`` on the office folder, as a child process."""

    def __init__(self, office: Office, heartbeat_every_s: float = 0.0) -> None:
        super().__init__(office.folder.parent, "central")
        self.office = office
        self.heartbeat_every_s = heartbeat_every_s

    def start(self, *, wait: bool = True) -> None:
        """Start serving; with ``wait``, return once its subscription is acknowledged."""
        broker = self.office.broker
        self._spawn([sys.executable, "-m", "provisioning.central_cli", "serve",
                     "--dir", str(self.office.folder), "--host", broker.host,
                     "--port", str(broker.port),
                     "--heartbeat-every", str(self.heartbeat_every_s),
                     "--log-format", "json"], REPO)
        if wait:
            self.log.wait("central_subscribed", timeout=30)


class AgentProcess(_Child):
    """The agent with sync enabled (plain MQTT, no TLS) as a child process.

    Its entry reader is the real serial driver on ``pty`` when one is given, else the
    simulated reader, driven through the agent's ``sim.sock`` as ``permitgate sim tap``
    does. ``sync`` overrides ``[sync]`` settings.
    """

    def __init__(self, folder: Path, broker: Broker, trusted_keys: Path, *,
                 pty: PtyPeer | None = None, gateway: str = GATEWAY,
                 **sync: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder, "agent")
        self.pty = pty
        self.db = folder / "pg.db"
        self.site_key = folder / "site.key"
        self.config = write_agent(
            folder, key=SITE_KEY, site_id="site-f", gateway_id=gateway,
            store={"path": "pg.db"},
            sync={"enabled": True, "host": broker.host, "port": broker.port, "tls": False,
                  "trusted_keys": str(trusted_keys), "status_interval_s": 1,
                  "keepalive_s": 5, "ack_timeout_s": 2.0, "resync_interval_s": 1, **sync},
            doors=(DoorSpec(unlock_s=0.2, relay={
                "driver": "simulated", "options": {"state_file": folder / "relay.json"}}),),
            readers=(ReaderSpec(debounce_s=0, driver="serial" if pty else "simulated",
                                options={"port": pty.path} if pty else None),))
        self._store: Store | None = None

    def start(self) -> None:
        """Start the agent; return once it runs and its reader is open."""
        self._spawn([sys.executable, "-m", "agent.cli", "run", "--config",
                     str(self.config), "--log-format", "json"], self.folder)
        self.log.wait("agent_started", timeout=30)
        self.log.wait("reader_online", timeout=30)

    def store(self) -> Store:
        """The agent's databases, opened from this process (reads only)."""
        if self._store is None:
            self._store = Store(self.db)
        return self._store

    def close(self) -> None:
        """Kill the process if it runs and close the store."""
        self.kill()
        if self._store is not None:
            self._store.close()
            self._store = None

    def tap(self, value: str) -> None:
        """Present the EM4100 card ``value`` at the entry reader."""
        if self.pty is not None:
            self.pty.write(em4100_frame(value))
            return
        message = {"op": "tap", "reader": "front-in", "card": card_id(value)}
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(json.dumps(message).encode(), str(self.folder / "sim.sock"))

    def decide(self, value: str, timeout: float = 15.0) -> StoredEvent:
        """Present ``value`` and return the access event the agent commits for it."""
        store = self.store()
        before = self.last_seq()
        self.tap(value)

        def decided() -> StoredEvent | None:
            return next((e for e in store.events(after_seq=before)
                         if e.kind in ("access_granted", "access_denied")), None)

        return wait_for(decided, f"a decision on card {value}", timeout, interval=0.005)

    def last_seq(self) -> int:
        """The newest event's seq, read afresh."""
        newest = self.store().events(newest_first=True, limit=1)
        return newest[0].seq if newest else 0

    def decisions(self) -> int:
        """How many access decisions are committed."""
        db = self.store().db()
        return int(db.execute("SELECT count(*) FROM events WHERE kind IN "
                              "('access_granted', 'access_denied')").fetchone()[0])

    def outbox(self) -> int:
        """Events not yet acknowledged by the office."""
        return self.store().counts()["outbox"]

    def list_state(self) -> tuple[int, int]:
        """(applied list version, allowlist entries)."""
        store = self.store()
        return store.versions().get("list", 0), store.counts()["credentials"]


class TapStream:
    """Taps cards one after another from a thread until stopped."""

    def __init__(self, agent: AgentProcess, cards: Sequence[str] = UNKNOWN,
                 interval_s: float = 0.03) -> None:
        self.agent = agent
        self.cards = cards
        self.interval_s = interval_s
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taps", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            # A killed agent's socket is gone: taps then go nowhere, as at a dead reader.
            with contextlib.suppress(OSError):
                self.agent.tap(self.cards[self.sent % len(self.cards)])
            self.sent += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TapStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop tapping and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def central_chain_problems(events: Sequence[dict[str, Any]]) -> list[str]:
    """Gaps, broken links and edited contents in the office's copy of a gateway's events
    (which must start at seq 1)."""
    problems = []
    prev_hash, expected = GENESIS, 1
    for ev in events:
        if ev["seq"] != expected:
            problems.append(f"expected seq {expected}, found {ev['seq']}")
        if ev["prev_hash"] != prev_hash:
            problems.append(f"seq {ev['seq']}: prev_hash does not link")
        recomputed = event_hash(ev["prev_hash"], ev["seq"], ev["event_id"], ev["ts_ms"], Event(
            ev["kind"], ev["door"], ev["reader"], ev["direction"], ev["reason"], ev["cred"],
            ev["data"]))
        if recomputed != ev["hash"]:
            problems.append(f"seq {ev['seq']}: contents do not match the hash")
        prev_hash, expected = ev["hash"], ev["seq"] + 1
    return problems


def drained(agent: AgentProcess, office: Office) -> bool:
    """Every event the agent stored is acknowledged and stored at the office."""
    last = agent.last_seq()
    return agent.outbox() == 0 and office.acked_upto() == last


def wait_drained(agent: AgentProcess, office: Office, timeout: float = 60.0) -> None:
    """Wait until ``drained`` holds on ten polls in a row (0.5 s without a new event)."""
    streak = [0]

    def steady() -> bool:
        streak[0] = streak[0] + 1 if drained(agent, office) else 0
        return streak[0] >= 10

    wait_for(steady, "the outbox to drain to the office", timeout)


def assert_delivered_exactly_once(agent: AgentProcess, office: Office) -> int:
    """The office holds exactly the agent's events, each once, in seq order, with intact
    chains on both sides; returns how many."""
    store = agent.store()
    mine = [(e.seq, e.event_id, e.prev_hash, e.hash) for e in store.iter_events()]
    theirs_full = office.events()
    theirs = [(e["seq"], e["event_id"], e["prev_hash"], e["hash"]) for e in theirs_full]
    assert len(theirs) == len({t[1] for t in theirs}), "an event id is stored twice"
    assert [s for s, *_ in mine] == list(range(1, len(mine) + 1)), "agent chain has gaps"
    differences = [(a, b) for a, b in zip(theirs, mine, strict=False) if a != b]
    assert theirs == mine, (f"the office holds {len(theirs)} events, the agent "
                            f"{len(mine)}; first difference (office, agent): "
                            f"{differences[0] if differences else 'in length'}")
    report = office.report()
    assert report["chain_problems"] == []
    assert report["events"]["acked_upto"] == len(mine)
    assert central_chain_problems(theirs_full) == []
    chain = store.verify_chain()
    assert chain.ok, chain.problems
    assert store.first_unacked() is None
    return len(mine)


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
