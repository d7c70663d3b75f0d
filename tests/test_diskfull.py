"""A full disk on a small real file system (tmpfs): the agent keeps deciding (denying what
it cannot record, egress always), says "disk full" as soon as it can write, starts again
on a full disk, and recovers by itself when there is room."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.decision import Reason
from agent.runtime import Agent
from agent.store import CredentialEntry
from drivers.base import CardRead
from drivers.simulated import SimBus, SimulatedRelay
from protocol.hashing import CredentialHasher
from tests.agentconf import KEY, DoorSpec, ReaderSpec, write_agent
from tests.conftest import wait_for

CARD = "em4100:67003B51C6"
DISK_MB = 6


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs mounted for the test (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs",
                             str(mount)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; the filler's path."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


class Gateway:
    """An in-process agent whose data folder is on the small file system."""

    def __init__(self, data: Path, *, reserve_mb: int = 1) -> None:
        self.config_path = write_agent(
            data, store={"reserve_mb": reserve_mb},
            doors=(DoorSpec(unlock_s=0.05, rex={"driver": "simulated"}),),
            readers=(ReaderSpec(debounce_s=0),))
        self.data = data
        self.relay = SimulatedRelay("front.relay", {})
        self.bus = SimBus()
        self.agent = Agent(load_config(self.config_path), config_path=self.config_path,
                           bus=self.bus, devices={"front.relay": self.relay})
        self.reader = self.agent.config.readers[0]

    def tap(self) -> Reason:
        """One tap of CARD; the decision's reason."""
        return self.agent.handle_read(self.reader, CardRead(CARD)).reason

    def kinds(self) -> list[str]:
        """Kinds of the stored events."""
        assert self.agent.store is not None
        return [e.kind for e in self.agent.store.iter_events()]


def seeded(data: Path, **kwargs: int) -> Gateway:
    """A started gateway with CARD on its list."""
    gw = Gateway(data, **kwargs)
    gw.agent.start()
    assert gw.agent.store is not None
    gw.agent.store.replace_allowlist([CredentialEntry(CredentialHasher(KEY).credential(CARD))],
                                     1)
    return gw


def test_disk_filling_while_running(disk: Path) -> None:
    """When the disk fills, the reserve is given back and ``disk_full`` is recorded (with
    status showing it); taps go on until even that room is used, then are denied as
    store_error while the exit button still opens the door; with room again the reserve
    comes back and ``disk_space_restored`` is recorded."""
    gw = seeded(disk / "data")
    try:
        wait_for((disk / "data" / "reserve.bin").exists, "the reserve file")
        filler = fill(disk)
        reasons: list[Reason] = []
        for _ in range(5000):  # bounded: the reserve holds a few hundred taps
            reasons.append(gw.tap())
            if reasons[-5:] == [Reason.STORE_ERROR] * 5:
                break
        assert Reason.GRANTED in reasons
        assert "disk_full" in gw.kinds()
        assert reasons[-1] is Reason.STORE_ERROR
        first_denial = reasons.index(Reason.STORE_ERROR)
        assert all(r is Reason.STORE_ERROR for r in reasons[first_denial:])
        assert gw.agent.store is not None
        states = {(r["kind"], r["id"]): json.loads(r["state"])
                  for r in gw.agent.store.device_states()}
        assert states[("system", "disk")]["state"] == "full"
        before = gw.relay.history.count(True)
        gw.bus.set_level("front.rex", True)
        wait_for(lambda: gw.relay.history.count(True) > before, "egress to unlock the door")
        gw.bus.set_level("front.rex", False)
        filler.unlink()
        wait_for(lambda: "disk_space_restored" in gw.kinds(), "the disk to recover")
        assert (disk / "data" / "reserve.bin").stat().st_size == 1 << 20
        assert gw.tap() is Reason.GRANTED
    finally:
        gw.agent.stop()


def test_start_on_a_full_disk_uses_the_reserve(disk: Path) -> None:
    """An agent stopped while the disk filled starts again: the reserve gives the store
    room to open, and ``disk_full`` is recorded at start."""
    gw = seeded(disk / "data")
    wait_for((disk / "data" / "reserve.bin").exists, "the reserve file")
    gw.agent.stop()
    fill(disk)
    again = Gateway(disk / "data")
    again.agent.start()
    try:
        assert again.agent.store is not None
        assert "disk_full" in again.kinds()
        assert again.tap() is Reason.GRANTED
    finally:
        again.agent.stop()


def test_start_with_no_room_at_all_decides_and_recovers(disk: Path) -> None:
    """With no reserve and no room at all, the agent still starts: every card is denied
    (store_error), and once space is freed it opens the store by itself and records its
    start and the full disk."""
    gw = seeded(disk / "data", reserve_mb=0)
    gw.agent.stop()
    filler = fill(disk)
    with contextlib.suppress(OSError):
        for name in ("pg.db-shm", "pg.db-wal", "pg-lists.db-shm", "pg-lists.db-wal"):
            (disk / "data" / name).unlink(missing_ok=True)
    again = Gateway(disk / "data", reserve_mb=0)
    again.agent.start()
    try:
        if again.agent.store is not None:
            pytest.fail("the store opened on a full disk: the test did not fill it")
        assert again.tap() is Reason.STORE_ERROR
        os.truncate(filler, 0)
        wait_for(lambda: again.agent.store is not None, "the store to open")
        kinds = again.kinds()
        assert kinds.count("agent_started") == 2 and "disk_full" in kinds
        assert again.tap() is Reason.GRANTED
    finally:
        again.agent.stop()
