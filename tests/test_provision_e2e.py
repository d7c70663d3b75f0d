"""A gateway brought up the way an installer and the office do it, every part real:
``permitgate provision`` makes its keys and request, ``permitgate-central
register-gateway`` signs and records it and emits its ACL entry, ``permitgate provision
--accept`` installs the answer; then the agent process connects over TLS to a Mosquitto
running the shipped configuration (certificates from the office's site CA; an ACL of the
shipped office block and the emitted entry, without the patterns that would let any
certificate of the CA in), receives the office's lists and grants a tap."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.store import Store
from provisioning.central import Central
from tests.broker import BrokerPool, TlsFiles
from tests.conftest import wait_for
from tests.gatewaysite import REPO, SHIPPED_ACL, TEMPLATE, with_simulated_devices
from tests.provisionkit import GW, SITE, make_office
from tests.test_sync_tls import events_of

CARD = "em4100:67003B51C6"

pytestmark = pytest.mark.timeout(300)
"""Four command runs, a broker, an office and an agent: on a loaded 2-core machine a start
can take a minute."""


def command(*argv: str, env: dict[str, str] | None = None) -> str:
    """Run ``python -m ARGV`` to its end; its standard output, failing on a non-zero exit."""
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO, env=env)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def delivered(db: Path) -> bool:
    """Whether the office acknowledged every event of the gateway."""
    store = Store(db)
    try:
        return store.first_unacked() is None
    finally:
        store.close()


def test_a_provisioned_gateway_connects_over_tls_gets_its_lists_and_grants_a_tap(
        tmp_path: Path, brokers: BrokerPool) -> None:
    """Provision → register (fingerprint as shown) → accept (office fingerprint checked) →
    the agent connects with its new certificate through the emitted ACL entry, applies the
    office's list, denies an unknown card, then grants it once the office enrolled it and
    published a new list (hashed under the site key the office sealed to the gateway),
    and the office receives and acknowledges the events."""
    office = make_office(tmp_path / "office")
    pki = office / "pki"
    broker_acl = tmp_path / "broker.acl"
    broker = brokers.new(tls=TlsFiles(pki / "ca.crt", pki / "server.crt", pki / "server.key"),
                         acl_file=broker_acl, template=TEMPLATE)
    gw = tmp_path / "gw"

    out = command("agent.cli", "provision", "--dir", str(gw), "--gateway-id", GW,
                  "--site-id", SITE, "--broker-host", "localhost", "--broker-port",
                  str(broker.port), "--store", "data/permitgate.db")
    fingerprint = re.search(r"^fingerprint  (\S+)$", out, re.M)
    assert fingerprint is not None, out

    acl = tmp_path / "acl"
    shutil.copy(SHIPPED_ACL, acl)
    out = command("provisioning.central_cli", "--dir", str(office), "register-gateway",
                  str(gw / "gateway-request.json"), "--fingerprint", fingerprint.group(1),
                  "--site", SITE, "--acl-file", str(acl))
    office_fingerprint = re.search(r"^office fingerprint  (\S+)", out, re.M)
    assert office_fingerprint is not None, out
    broker_acl.write_text("".join(line for line in acl.read_text().splitlines(keepends=True)
                                  if not line.startswith("pattern ")))
    assert f"user {GW}\n" in broker_acl.read_text()

    command("agent.cli", "provision", "--dir", str(gw), "--accept",
            str(gw / f"{GW}.response.json"), "--office-fingerprint",
            office_fingerprint.group(1))
    config = gw / "permitgate.toml"
    with_simulated_devices(config)
    command("agent.cli", "check-config", "-c", str(config))

    broker.start()
    central = Central(office, broker.host, broker.port, tls_ca=pki / "ca.crt",
                      tls_cert=pki / "central.crt", tls_key=pki / "central.key")
    stop = threading.Event()
    serving = threading.Thread(target=central.run, args=(stop,), daemon=True)
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(gw / "credentials")}
    log = (tmp_path / "agent.log").open("wb")
    agent: subprocess.Popen[bytes] | None = None
    db = gw / "data" / "permitgate.db"

    def tap() -> str:
        return command("agent.cli", "sim", "tap", "-c", str(config), "front-in", CARD,
                       env=env).strip()

    try:
        serving.start()
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config",
                                  str(config), "--log-format", "json"], cwd=REPO, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: "snapshot_applied" in events_of(db),
                 lambda: f"the first list; agent log:\n{(tmp_path / 'agent.log').read_text()}",
                 120)
        assert tap() == "DENIED unknown_card"
        central.enroll(GW, CARD, "P301")
        version = central.publish_snapshot(GW)
        assert version >= 2

        def list_version() -> int:
            store = Store(db)
            try:
                return store.versions().get("list", 0)
            finally:
                store.close()

        wait_for(lambda: list_version() >= version, "the published list to be applied")
        assert tap() == "OPEN   granted"
        wait_for(lambda: delivered(db), "every event acknowledged by the office")
        assert "access_granted" in [e["kind"] for e in central.events(GW)]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        log.close()
        stop.set()
        serving.join(15)
        central.close()
