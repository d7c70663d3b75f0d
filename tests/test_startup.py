"""The agent starts in one safe order, once per data folder, and a failed start leaves
no trace; decisions on one card at two readers are serialised."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.datalock import AlreadyRunningError, DataLock, holder_pid
from agent.decision import Decision
from agent.runtime import Agent
from agent.store import CredentialEntry, Store
from drivers.base import CardRead
from drivers.simulated import SimBus
from protocol.hashing import CredentialHasher, SecretError
from tests.agentconf import KEY, DoorSpec, ReaderSpec, write_agent
from tests.conftest import wait_for

CARD = "em4100:67003B51C6"


def run_agent(config: Path, folder: Path) -> subprocess.Popen[str]:
    """``permitgate run`` as a child process, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config),
         "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=folder)


def event_kinds(db: Path) -> list[str]:
    """The kinds of every stored event, oldest first."""
    store = Store(db)
    try:
        return [e.kind for e in store.iter_events()]
    finally:
        store.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A configured folder with an agent process running on it."""
    config = write_agent(tmp_path)
    proc = run_agent(config, tmp_path)
    wait_for(lambda: holder_pid(tmp_path / "agent.lock") == proc.pid
             and "agent_started" in event_kinds(tmp_path / "pg.db"), "the agent to start")
    yield config, proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def test_second_agent_on_one_data_folder_exits_2_naming_the_first(
        running: tuple[Path, subprocess.Popen[str]], tmp_path: Path) -> None:
    """A second agent on the same data folder exits 2 naming the running one's pid; the
    first keeps its socket, stops cleanly and records its stop, and the chain verifies."""
    config, first = running
    second = run_agent(config, tmp_path)
    out, err = second.communicate(timeout=30)
    assert second.returncode == 2, (out, err)
    assert f"another agent is running on this data folder (pid {first.pid})" in err
    assert (tmp_path / "sim.sock").exists()
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=30)
    assert first.returncode == 0
    kinds = event_kinds(tmp_path / "pg.db")
    assert kinds.count("agent_started") == 1 and kinds[-1] == "agent_stopped"
    verify = subprocess.run([sys.executable, "-m", "agent.cli", "events", "verify", "-c",
                             str(config)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_missing_tls_file_stops_the_start_before_anything_is_recorded(
        tmp_path: Path) -> None:
    """With sync on and ``ca.crt`` missing the agent exits 2 naming ``sync.ca_file``, and
    creates no database, lock or event: nothing says it ever ran."""
    (tmp_path / "trusted-keys.txt").write_text(
        "k1 " + "A" * 43 + "=\n")
    config = write_agent(tmp_path, sync={"enabled": True, "trusted_keys": "./trusted-keys.txt",
                                         "ca_file": "./ca.crt"})
    proc = run_agent(config, tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, (out, err)
    assert "sync.ca_file" in err and "ca.crt: file not found" in err
    assert not (tmp_path / "pg.db").exists()
    assert not (tmp_path / "agent.lock").exists()
    assert "agent_started" not in out and "agent_stopped" not in out


def test_unparsable_certificate_is_named_at_start(tmp_path: Path) -> None:
    """TLS files that exist but do not load as a certificate and key stop the start with
    exit 2 naming them, before any event."""
    (tmp_path / "trusted-keys.txt").write_text("k1 " + "A" * 43 + "=\n")
    for name in ("ca.crt", "gateway.crt", "gateway.key"):
        (tmp_path / name).write_text("not a PEM file\n")
    config = write_agent(tmp_path, sync={
        "enabled": True, "trusted_keys": "./trusted-keys.txt", "ca_file": "./ca.crt",
        "cert_file": "./gateway.crt", "key_file": "./gateway.key"})
    proc = run_agent(config, tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "sync.ca_file" in err and "not a usable CA certificate" in err
    assert not (tmp_path / "pg.db").exists()


def test_bad_site_key_exits_2_without_a_stray_stop_line(tmp_path: Path) -> None:
    """A malformed site key exits 2 with the file named and prints no ``agent_stopped``
    line for an agent that never started."""
    config = write_agent(tmp_path)
    (tmp_path / "site.key").write_bytes(b"short")
    proc = run_agent(config, tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"{tmp_path / 'site.key'}: a site key is 32 bytes" in err
    assert "agent_stopped" not in out + err
    assert not (tmp_path / "pg.db").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_site_key_readable_by_others_is_refused_at_start(tmp_path: Path, mode: int) -> None:
    """A site key its group or other users can read is refused at start (exit 2) with
    the chmod that fixes it; nothing is recorded."""
    config = write_agent(tmp_path)
    (tmp_path / "site.key").chmod(mode)
    proc = run_agent(config, tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"(mode {mode:04o})" in err and f"chmod 600 {tmp_path / 'site.key'}" in err
    assert not (tmp_path / "pg.db").exists()


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    """The data lock refuses a second holder naming the first's pid, and is free again
    once released."""
    first = DataLock.acquire(tmp_path / "agent.lock")
    with pytest.raises(AlreadyRunningError, match=f"pid {os.getpid()}"):
        DataLock.acquire(tmp_path / "agent.lock")
    first.release()
    DataLock.acquire(tmp_path / "agent.lock").release()


def test_in_process_agent_releases_its_folder_on_stop(tmp_path: Path) -> None:
    """An agent that stopped lets the next one start on the same folder; one that failed
    at its secrets never took the folder."""
    config_path = write_agent(tmp_path)
    config = load_config(config_path)
    for _ in range(2):
        agent = Agent(config, config_path=config_path, bus=SimBus())
        agent.start()
        agent.stop()
    (tmp_path / "site.key").chmod(0o644)
    agent = Agent(config, config_path=config_path, bus=SimBus())
    with pytest.raises(SecretError, match="chmod 600"):
        agent.start()
    (tmp_path / "site.key").chmod(0o600)
    agent = Agent(config, config_path=config_path, bus=SimBus())
    agent.start()
    agent.stop()


def test_hard_anti_passback_holds_for_simultaneous_taps(tmp_path: Path) -> None:
    """The same card at two entry readers of one door at the same instant is granted
    once, in every one of 200 rounds (decide and record happen under one lock)."""
    config_path = write_agent(
        tmp_path, policy={"anti_passback": "hard"},
        doors=(DoorSpec(unlock_s=0.05),),
        readers=(ReaderSpec("in-a"), ReaderSpec("in-b"),
                 ReaderSpec("out", direction="exit")))
    config = load_config(config_path)
    agent = Agent(config, config_path=config_path, bus=SimBus())
    agent.start()
    try:
        assert agent.store is not None
        agent.store.replace_allowlist([CredentialEntry(CredentialHasher(KEY).credential(CARD))],
                                      1)
        readers = {r.id: r for r in config.readers}
        doubled = 0
        for _ in range(200):
            barrier = threading.Barrier(2)
            results: list[Decision] = []

            def tap(reader_id: str, gate: threading.Barrier = barrier,
                    out: list[Decision] = results) -> None:
                gate.wait()
                out.append(agent.handle_read(readers[reader_id], CardRead(CARD)))

            threads = [threading.Thread(target=tap, args=(r,)) for r in ("in-a", "in-b")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            doubled += sum(d.granted for d in results) != 1
            assert agent.handle_read(readers["out"], CardRead(CARD)).granted
        assert doubled == 0
    finally:
        agent.stop()
