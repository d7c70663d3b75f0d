"""The real agent process: start, serve card reads over a pseudo-terminal, stop and crash.

Each test runs ``python -m agent.cli run`` as a child process with a configuration whose
entry reader is the real serial driver on a pty the test drives, and whose relay mirrors
its state to a file the test reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store import CredentialEntry, Store, StoredEvent
from drivers.serial_reader import em4100_frame
from protocol.hashing import CredentialHasher
from tests.agentconf import KEY, DoorSpec, ReaderSpec, write_agent
from tests.conftest import PtyPeer, wait_for

VALID = ("67003B51C6", "67003BA86C", "1122334455")


class AgentProcess:
    """A configured agent folder and the process running in it."""

    def __init__(self, folder: Path, port: str, fail_mode: str = "secure") -> None:
        self.folder = folder
        self.db = folder / "pg.db"
        self.relay_file = folder / "relay.json"
        self.config = write_agent(
            folder, store={"path": "pg.db"},
            doors=(DoorSpec(unlock_s=0.5, relay={
                "driver": "simulated", "options": {"state_file": self.relay_file}},
                extra={"fail_mode": fail_mode}),),
            readers=(ReaderSpec(driver="serial", debounce_s=0.2, options={"port": port}),))
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def seed(self) -> None:
        """Put the ``VALID`` cards on the allowlist before the agent starts."""
        hasher = CredentialHasher(KEY)
        store = Store(self.db)
        store.replace_allowlist(
            [CredentialEntry(hasher.credential(f"em4100:{c}")) for c in VALID], 1)
        store.close()

    def start(self) -> None:
        """Start the agent and wait until its reader is online."""
        before = self.count("reader_online")
        log = self.folder / f"agent-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config),
                 "--log-format", "json"], stdout=out, stderr=subprocess.STDOUT,
                cwd=self.folder)
        wait_for(lambda: self.count("reader_online") > before, "the reader to come online")

    def events(self) -> list[StoredEvent]:
        """Every stored event, read through a separate connection."""
        if not self.db.exists():
            return []
        store = Store(self.db)
        try:
            return list(store.iter_events())
        finally:
            store.close()

    def count(self, kind: str) -> int:
        """How many events of ``kind`` are stored."""
        return sum(1 for e in self.events() if e.kind == kind)

    def wait_count(self, kinds: tuple[str, ...], count: int) -> None:
        """Wait until exactly ``count`` events of ``kinds`` are stored."""
        wait_for(lambda: sum(self.count(k) for k in kinds) == count,
                 f"{count} event(s) of {', '.join(kinds)}")

    def relay_unlocked(self) -> bool:
        """The relay state last written by the agent."""
        return bool(json.loads(self.relay_file.read_text())["unlocked"])

    def logged_decisions(self) -> list[dict[str, object]]:
        """Decision lines the agent logged (only after their event committed)."""
        lines = []
        for log in self.logs:
            for line in log.read_text().splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    if record.get("event") in {"access_granted", "access_denied"}:
                        lines.append(record)
        return lines

    def kill(self) -> None:
        """End the process with ``sig`` if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def agent_process(tmp_path: Path, pty_peer: PtyPeer) -> Iterator[AgentProcess]:
    """A seeded agent folder whose reader port is ``pty_peer``."""
    agent = AgentProcess(tmp_path, pty_peer.path)
    agent.seed()
    try:
        yield agent
    finally:
        agent.kill()


def test_taps_through_the_serial_driver_become_decisions(agent_process: AgentProcess,
                                                         pty_peer: PtyPeer) -> None:
    """Frames written to the pty reach the running agent and become decisions with reasons,
    and a grant drives the relay."""
    agent_process.start()
    pty_peer.write(em4100_frame(VALID[0]))
    wait_for(lambda: agent_process.count("access_granted") == 1, "the grant")
    # The door's events, not the relay file: the unlock lasts only unlock_s, which a
    # poll of the file could miss on a busy machine.
    agent_process.wait_count(("door_unlocked",), 1)
    pty_peer.write(em4100_frame("DEADBEEF00"))
    wait_for(lambda: agent_process.count("access_denied") == 1, "the denial")
    denied = next(e for e in agent_process.events() if e.kind == "access_denied")
    assert denied.reason == "unknown_card"
    assert denied.direction == "entry"
    assert denied.cred is not None and "DEADBEEF00" not in json.dumps(denied.as_dict())
    agent_process.wait_count(("door_locked",), 2)  # at the start, and the relock
    assert agent_process.relay_unlocked() is False


def test_sigterm_stops_with_the_door_locked_and_every_event_kept(
        agent_process: AgentProcess, pty_peer: PtyPeer) -> None:
    """SIGTERM during a stream of taps ends the process with status 0 within the
    shutdown bound, the relay locked, and an intact chain ending in agent_stopped."""
    agent_process.start()
    for granted, card in enumerate(VALID, start=1):
        pty_peer.write(em4100_frame(card))
        agent_process.wait_count(("access_granted",), granted)
    assert agent_process.proc is not None
    agent_process.proc.send_signal(signal.SIGTERM)
    assert agent_process.proc.wait(timeout=10) == 0
    assert agent_process.relay_unlocked() is False
    events = agent_process.events()
    assert events[-1].kind == "agent_stopped"
    assert any(e.kind == "door_locked" and e.reason == "shutdown" for e in events)
    store = Store(agent_process.db)
    report = store.verify_chain()
    store.close()
    assert report.ok, report.problems
    logged = {int(str(r["seq"])) for r in agent_process.logged_decisions()}
    stored = {e.seq for e in events if e.kind.startswith("access_")}
    assert logged == stored


def test_fail_safe_door_is_left_unlocked_on_sigterm(tmp_path: Path,
                                                    pty_peer: PtyPeer) -> None:
    """A fail-safe (egress) door's relay ends unlocked when the agent stops."""
    agent = AgentProcess(tmp_path, pty_peer.path, fail_mode="safe")
    try:
        agent.start()
        assert agent.relay_unlocked() is False
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=10) == 0
        assert agent.relay_unlocked() is True
    finally:
        agent.kill()


def test_sigkill_mid_stream_loses_and_duplicates_nothing(agent_process: AgentProcess,
                                                         pty_peer: PtyPeer) -> None:
    """After SIGKILL during a steady stream of taps, the next start continues one
    gap-free hash chain: every decision the first process logged is stored once, no event
    id repeats, and the relay starts locked."""
    agent_process.start()
    stop = threading.Event()
    written = [0]

    def tap_stream() -> None:
        while not stop.is_set():
            # Alternate known and unknown cards so the reader's debounce never merges them.
            card = VALID[written[0] % 2] if written[0] % 3 else f"{written[0]:010X}"
            try:
                pty_peer.write(em4100_frame(card))
            except OSError:
                return
            written[0] += 1
            # The pace of the stream is the behaviour under test (taps keep arriving while
            # the process is killed), not a stand-in for a condition: about 33 frames a s.
            stop.wait(0.03)

    streamer = threading.Thread(target=tap_stream)
    streamer.start()
    try:
        wait_for(lambda: agent_process.count("access_granted")
                 + agent_process.count("access_denied") >= 20, "20 decisions")
        assert agent_process.proc is not None
        agent_process.proc.send_signal(signal.SIGKILL)
        agent_process.proc.wait(10)
    finally:
        stop.set()
        streamer.join()
    first_run = agent_process.events()
    agent_process.start()
    before = len([e for e in agent_process.events() if e.kind.startswith("access_")])
    for n, card in enumerate(VALID, start=1):
        pty_peer.write(em4100_frame(card))
        agent_process.wait_count(("access_granted", "access_denied"), before + n)
    assert agent_process.proc is not None
    agent_process.proc.send_signal(signal.SIGTERM)
    assert agent_process.proc.wait(timeout=10) == 0

    events = agent_process.events()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.event_id for e in events}) == len(events)
    assert [e.event_id for e in events[:len(first_run)]] == [e.event_id for e in first_run]
    store = Store(agent_process.db)
    report = store.verify_chain()
    store.close()
    assert report.ok, report.problems
    stored_decisions = {e.seq for e in events if e.kind.startswith("access_")}
    logged = [int(str(r["seq"])) for r in agent_process.logged_decisions()]
    assert len(logged) == len(set(logged))
    assert set(logged) <= stored_decisions
    restarts = [i for i, e in enumerate(events) if e.kind == "agent_started"]
    assert len(restarts) == 2
    after_restart = events[restarts[1]:]
    assert any(e.kind == "door_locked" and e.reason == "startup" for e in after_restart)
    assert agent_process.relay_unlocked() is False


def test_unreadable_store_folder_is_reported_and_exits_non_zero(tmp_path: Path,
                                                                pty_peer: PtyPeer) -> None:
    """A store path whose folder cannot be created gives a clear error and status 1."""
    agent = AgentProcess(tmp_path, pty_peer.path)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    text = agent.config.read_text().replace('path = "pg.db"', 'path = "blocker/pg.db"')
    agent.config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(agent.config)],
        capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path)
    assert result.returncode == 1
    assert "blocker" in result.stderr and "store directory" in result.stderr


def test_sim_tap_reaches_a_running_default_agent(tmp_path: Path) -> None:
    """The embedded defaults start with no configuration, and ``permitgate sim tap``
    from another process produces a decision for the demo tenant."""
    env = {**os.environ, "PERMITGATE_CONFIG": ""}
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run"], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        db = tmp_path / "permitgate-data" / "permitgate.db"
        sock = db.parent / "sim.sock"
        wait_for(sock.exists, "the simulation socket")
        tap = subprocess.run([sys.executable, "-m", "agent.cli", "sim", "tap", "front-in",
                              "em4100:67003B51C6"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=30, check=False)
        assert tap.returncode == 0, tap.stderr

        def granted() -> bool:
            store = Store(db)
            try:
                return any(e.kind == "access_granted" for e in store.iter_events())
            finally:
                store.close()

        wait_for(granted, "the demo tenant's grant")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
