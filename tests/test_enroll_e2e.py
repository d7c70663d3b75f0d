"""Enrollment end to end with every part real: the agent process (its card arriving
through the serial driver on a pseudo-terminal), a Mosquitto broker, and
``permitgate-central serve``: enroll → provisional access → the office unseals, checks and
confirms → the gateway shows it confirmed; a revoked permit is rejected and access ends;
a move-out takes the card off the office's list."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.control import request
from agent.store import Store
from drivers.serial_reader import em4100_frame
from tests.agentconf import ReaderSpec, write_agent
from tests.broker import Broker
from tests.conftest import PtyPeer, wait_for

CARD_HEX = "67003B51C6"
OTHER_HEX = "0102030405"
PERMIT = "11010519491231002X"
REVOKED_PERMIT = "440524188001010014"
GW = "gw-e2e"

pytestmark = pytest.mark.timeout(300)
"""Three processes and a broker per test: on a loaded 2-core machine a start can take a
minute."""


def central(folder: Path, broker: Broker, *args: str) -> subprocess.CompletedProcess[str]:
    """``permitgate-central --dir FOLDER ARGS`` against the test broker."""
    return subprocess.run([sys.executable, "-m", "provisioning.central_cli", "--dir",
                           str(folder), "--host", broker.host, "--port", str(broker.port),
                           *args], capture_output=True, text=True, timeout=60, check=False)


@dataclass
class Site:
    """The office folder, the gateway folder and their processes."""

    office: Path
    gateway: Path
    broker: Broker
    pty: PtyPeer
    procs: list[subprocess.Popen[bytes]]

    def tap(self, hex_id: str) -> None:
        """Present a card at the serial reader (an EM4100 frame on the pty)."""
        self.pty.write(em4100_frame(hex_id))

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request to the agent's control socket."""
        return request(self.gateway / "sim.sock", message)

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The gateway's events of ``kind`` (``permitgate events filter --json``)."""
        done = subprocess.run([sys.executable, "-m", "agent.cli", "events", "filter",
                               "--kind", kind, "--json", "-c",
                               str(self.gateway / "permitgate.toml")],
                              capture_output=True, text=True, timeout=60, check=False)
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def versions(self) -> dict[str, int]:
        """The gateway's stream versions, read beside the running agent."""
        store = Store(self.gateway / "pg.db")
        try:
            return store.versions()
        finally:
            store.close()

    def tenants(self) -> list[dict[str, Any]]:
        """The gateway's tenants (``permitgate tenants --json``)."""
        done = subprocess.run([sys.executable, "-m", "agent.cli", "tenants", "--json", "-c",
                               str(self.gateway / "permitgate.toml")],
                              capture_output=True, text=True, timeout=60, check=True)
        result: list[dict[str, Any]] = json.loads(done.stdout)
        return result

    def enroll(self, hex_id: str, permit: str) -> str:
        """Capture ``hex_id`` at the reader and enroll it; the enrollment id."""
        started = self.ask({"op": "capture_start", "reader": "front-in", "account": "e2e"})
        assert started["ok"], started
        self.tap(hex_id)
        wait_for(lambda: self.ask({"op": "capture_status", "capture": started["capture"]})[
            "state"] == "captured", "the tap to be captured")
        reply = self.ask({"op": "enroll", "capture": started["capture"], "unit": "101",
                          "permit": permit, "account": "e2e",
                          "lease_end": (date.today() + timedelta(days=200)).isoformat()})
        assert reply["ok"], reply
        return str(reply["enrollment"]["id"])

    def decided(self, hex_id: str, reason: str) -> bool:
        """Whether the gateway recorded a decision with ``reason`` (a tap of ``hex_id``)."""
        del hex_id
        return any(e["reason"] == reason for e in self.events("access_granted")
                   + self.events("access_denied"))


@pytest.fixture
def site(tmp_path: Path, broker: Broker, pty_peer: PtyPeer) -> Iterator[Site]:
    """An office serving and a gateway running, enrollment and sync on, the gateway's
    reader online and the link up both ways (their logs in the test folder)."""
    office, gateway = tmp_path / "office", tmp_path / "gateway"
    assert central(office, broker, "keygen").returncode == 0
    gateway.mkdir()
    for name in ("trusted-keys.txt", "office-seal.pub"):
        (gateway / name).write_bytes((office / name).read_bytes())
    write_agent(gateway, gateway_id=GW, readers=(ReaderSpec(
        "front-in", driver="serial", debounce_s=0, options={"port": pty_peer.path}),),
        sync={"enabled": True, "tls": False, "host": broker.host, "port": broker.port,
              "protocol": "5", "trusted_keys": "./trusted-keys.txt",
              "resync_interval_s": 2.0},
        extra='[enrollment]\nenabled = true\nunits = ["101", "102"]\n'
              'seal_key = "./office-seal.pub"\n')
    added = central(office, broker, "add-gateway", GW, "--site", "test-site", "--site-key",
                    str(gateway / "site.key"))
    assert added.returncode == 0, added.stderr
    procs: list[subprocess.Popen[bytes]] = []
    made = Site(office, gateway, broker, pty_peer, procs)
    try:
        with (tmp_path / "office.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "provisioning.central_cli", "--dir", str(office),
                 "--host", broker.host, "--port", str(broker.port), "serve",
                 "--heartbeat-every", "5"], stdout=log, stderr=subprocess.STDOUT))
        with (tmp_path / "agent.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "-c",
                 str(gateway / "permitgate.toml"), "--log-format", "json"],
                stdout=log, stderr=subprocess.STDOUT))
        wait_for(lambda: (gateway / "sim.sock").exists() and made.events("reader_online"),
                 "the gateway to start with its reader online", timeout=120)
        # The link works both ways once a heartbeat of the office's has been applied
        # (a first list is not a sign: an office with no entries for the gateway may
        # answer nothing if the gateway asked before the office subscribed).
        wait_for(lambda: made.versions().get("hb", 0) >= 1,
                 "the gateway to apply the office's heartbeat", timeout=120)
        yield made
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_enrollment_is_confirmed_by_the_office(site: Site) -> None:
    """An enrollment at the gateway grants at once, reaches the office, which unseals the
    permit, confirms and lists the card; the gateway then shows it confirmed and no
    permit number is left on the gateway's disk."""
    enrollment = site.enroll(CARD_HEX, PERMIT)
    site.tap(CARD_HEX)
    wait_for(lambda: site.decided(CARD_HEX, "granted"), "the provisional grant")
    wait_for(lambda: any(t["id"] == enrollment and t["state"] == "confirmed"
                         for t in site.tenants()), "the office's confirmation", timeout=120)
    listing = central(site.office, site.broker, "enrollments", "--json")
    assert listing.returncode == 0, listing.stderr
    (row,) = [r for r in map(json.loads, listing.stdout.splitlines())
              if r["enrollment"] == enrollment]
    assert row["status"] == "confirmed"
    for path in site.gateway.glob("pg*.db*"):
        assert PERMIT.encode() not in path.read_bytes()


def test_revoked_permit_is_rejected_and_access_ends(site: Site) -> None:
    """An enrollment whose permit the office has revoked is rejected, and the gateway ends
    the provisional access at once."""
    revoked = central(site.office, site.broker, "revoke", "--permit", REVOKED_PERMIT, "--all")
    assert revoked.returncode == 0, revoked.stderr
    enrollment = site.enroll(OTHER_HEX, REVOKED_PERMIT)
    wait_for(lambda: any(t["id"] == enrollment and t["state"] == "rejected"
                         for t in site.tenants()), "the office's rejection", timeout=120)
    rejected = next(t for t in site.tenants() if t["id"] == enrollment)
    assert rejected["reason"] == "permit_revoked"
    before = len(site.events("access_denied"))
    site.tap(OTHER_HEX)
    wait_for(lambda: len(site.events("access_denied")) > before, "the tap to be denied")


def test_move_out_takes_the_card_off_the_office_list(site: Site) -> None:
    """A move-out at the gateway ends access there at once and, reported through the
    outbox, the office marks the enrollment ended."""
    enrollment = site.enroll(CARD_HEX, PERMIT)
    wait_for(lambda: any(t["id"] == enrollment and t["state"] == "confirmed"
                         for t in site.tenants()), "the confirmation", timeout=120)
    assert site.ask({"op": "move_out", "enrollment": enrollment, "account": "e2e"})["ended"]

    def office_ended() -> bool:
        listing = central(site.office, site.broker, "enrollments", "--json")
        return any(r["enrollment"] == enrollment and r["status"] == "ended"
                   for r in map(json.loads, listing.stdout.splitlines()))

    wait_for(office_ended, "the office to end the enrollment", timeout=120)
