"""End to end over TLS: the shipped broker configuration and ACL, certificates from the
provisioning PKI tool, the agent as a real process, and the real central-office tool."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store import Store
from provisioning import pki
from provisioning.central import Central, keygen
from tests.agentconf import DoorSpec, ReaderSpec, write_agent
from tests.broker import BrokerPool, TlsFiles
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "config" / "mosquitto" / "permitgate.conf"
ACL = REPO / "config" / "mosquitto" / "acl"
SITE_KEY = bytes(range(32))
CARD = "em4100:67003B51C6"


@pytest.fixture
def site(tmp_path: Path, brokers: BrokerPool
         ) -> Iterator[tuple[Central, Path, subprocess.Popen[bytes]]]:
    """A TLS broker with the shipped config, a central office serving, and a gateway agent
    process connected with its own certificate."""
    certs = tmp_path / "pki"
    assert pki.main(["init", str(certs), "--broker-host", "localhost",
                     "--broker-host", "127.0.0.1"]) == 0
    assert pki.main(["client", str(certs), "gw-0001"]) == 0
    broker = brokers.start(tls=TlsFiles(certs / "ca.crt", certs / "server.crt",
                                        certs / "server.key"), acl_file=ACL, template=TEMPLATE)
    office = tmp_path / "office"
    keygen(office)
    central = Central(office, broker.host, broker.port, tls_ca=certs / "ca.crt",
                      tls_cert=certs / "central.crt", tls_key=certs / "central.key")
    central.add_gateway("gw-0001", "bldg-0001", SITE_KEY)
    central.enroll("gw-0001", CARD, "P301")
    stop = threading.Event()
    serving = threading.Thread(target=central.run, args=(stop,), daemon=True)
    serving.start()

    gw = tmp_path / "gw"
    gw.mkdir()
    config = write_agent(
        gw, key=SITE_KEY, site_id="bldg-0001", gateway_id="gw-0001", store={"path": "pg.db"},
        site_key="./site.key",
        sync={"enabled": True, "host": "localhost", "port": broker.port, "tls": True,
              "ca_file": certs / "ca.crt", "cert_file": certs / "gw-0001.crt",
              "key_file": certs / "gw-0001.key", "trusted_keys": office / "trusted-keys.txt",
              "status_interval_s": 1},
        doors=(DoorSpec(unlock_s=None),), readers=(ReaderSpec(debounce_s=None),))
    log = (gw / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config",
                             str(config), "--log-format", "json"],
                            cwd=gw, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield central, gw, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        log.close()
        stop.set()
        serving.join(15)
        central.close()


def events_of(db: Path) -> list[str]:
    """Kinds of the events in an agent's store."""
    if not db.exists():
        return []
    store = Store(db)
    try:
        return [e.kind for e in store.iter_events()]
    finally:
        store.close()


def test_list_events_and_acks_flow_over_tls_with_the_shipped_acl(
        site: tuple[Central, Path, subprocess.Popen[bytes]]) -> None:
    """Over TLS with per-gateway certificates and the shipped ACL, the gateway asks for
    its list, applies the office's signed snapshot, decides a tap from it, and every event
    reaches the office's store and is acknowledged back."""
    central, gw, proc = site
    db = gw / "pg.db"
    wait_for(lambda: "snapshot_applied" in events_of(db), "the snapshot to be applied")
    tap = subprocess.run([sys.executable, "-m", "agent.cli", "sim", "tap", "-c",
                          str(gw / "permitgate.toml"), "front-in", CARD],
                         capture_output=True, text=True, timeout=30, check=False)
    assert tap.returncode == 0, tap.stderr
    wait_for(lambda: "access_granted" in events_of(db), "the grant")

    def delivered() -> bool:
        store = Store(db)
        try:
            return store.first_unacked() is None
        finally:
            store.close()

    wait_for(delivered, "every event acknowledged by the office")
    store = Store(db)
    try:
        local = [(e.seq, e.event_id, e.hash) for e in store.iter_events()]
    finally:
        store.close()
    received = [(e["seq"], e["event_id"], e["hash"]) for e in central.events("gw-0001")]
    assert received[:len(local)] == local
    assert "access_granted" in [e["kind"] for e in central.events("gw-0001")]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
