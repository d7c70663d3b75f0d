"""A provisioned gateway, its office and its broker, brought up the way an installer and
the office do it (every step a real command run as a child process), for the rotation
tests: tests/test_renew.py and tests/test_remove_gateway.py (tests/test_provision_e2e.py
takes its paths and ``with_simulated_devices``).

Not a test module. ``Site`` provisions, registers and accepts a gateway against a
Mosquitto running the shipped configuration (config/mosquitto/permitgate.conf, with the
office's ``crl.pem`` as its ``crlfile``) and an ACL of the shipped office block plus the
emitted entry; ``Site.agent()`` runs the agent process and ``Site.office()`` the office's
``serve`` loop, each stopped when its ``with`` block ends, whatever happened in it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.store import Store
from provisioning.central import Central
from tests.broker import Broker, BrokerPool, TlsFiles
from tests.provisionkit import GW, SITE, make_office
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "config" / "mosquitto" / "permitgate.conf"
SHIPPED_ACL = REPO / "config" / "mosquitto" / "acl"
SIMULATED = """
[[doors]]
id = "front"
relay = { driver = "simulated" }

[[readers]]
id = "front-in"
door = "front"
direction = "entry"
driver = "simulated"
debounce_s = 0
"""
"""The installer's edit after provisioning: the example's serial doors and readers become
one simulated door and reader, which ``permitgate sim tap`` drives."""


def command(*argv: str, env: dict[str, str] | None = None,
            status: int = 0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ARGV`` to its end, failing unless it exits with ``status``."""
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO, env=env)
    assert done.returncode == status, f"{argv}: {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def with_simulated_devices(config: Path) -> None:
    """Drop the configuration's ``[[doors]]`` and ``[[readers]]`` tables (up to the next
    table) and add the simulated ones."""
    blocks = re.split(r"(?m)^(?=\[)", config.read_text())
    kept = [b for b in blocks if not b.startswith(("[[doors]]", "[[readers]]"))]
    config.write_text("".join(kept) + SIMULATED)


def found(pattern: str, text: str) -> str:
    """The first group of ``pattern`` in ``text`` (a line of a command's output)."""
    match = re.search(pattern, text, re.M)
    assert match is not None, text
    return match.group(1)


class Site:
    """An office folder with its PKI, a broker (not started) and a provisioned gateway
    whose office response is installed."""

    def __init__(self, tmp_path: Path, brokers: BrokerPool) -> None:
        self.tmp = tmp_path
        self.office_dir = make_office(tmp_path / "office")
        self.pki = self.office_dir / "pki"
        self.crl = tmp_path / "broker-crl.pem"
        """The broker's copy of the office's CRL, as an operator installs it."""
        shutil.copy(self.pki / "crl.pem", self.crl)
        self.acl = tmp_path / "acl"
        self.broker_acl = tmp_path / "broker.acl"
        self.broker: Broker = brokers.new(
            tls=TlsFiles(self.pki / "ca.crt", self.pki / "server.crt",
                         self.pki / "server.key", self.crl),
            acl_file=self.broker_acl, template=TEMPLATE)
        self.gw = tmp_path / "gw"
        self.config = self.gw / "permitgate.toml"
        self.db = self.gw / "data" / "permitgate.db"
        self.env = {**os.environ, "CREDENTIALS_DIRECTORY": str(self.gw / "credentials")}
        self._provision()

    def _provision(self) -> None:
        out = command("agent.cli", "provision", "--dir", str(self.gw), "--gateway-id", GW,
                      "--site-id", SITE, "--broker-host", "localhost", "--broker-port",
                      str(self.broker.port), "--store", "data/permitgate.db", "--no-qr").stdout
        shutil.copy(SHIPPED_ACL, self.acl)
        out = command("provisioning.central_cli", "--dir", str(self.office_dir),
                      "register-gateway", str(self.gw / "gateway-request.json"),
                      "--fingerprint", found(r"^fingerprint  (\S+)$", out), "--site", SITE,
                      "--acl-file", str(self.acl)).stdout
        self.write_broker_acl()
        command("agent.cli", "provision", "--dir", str(self.gw), "--accept",
                str(self.gw / f"{GW}.response.json"), "--office-fingerprint",
                found(r"^office fingerprint  (\S+)", out))
        with_simulated_devices(self.config)

    def write_broker_acl(self) -> None:
        """The office's ACL file as the broker uses it: without the ``pattern`` lines that
        would let any certificate of the CA in, so each gateway needs its entry."""
        self.broker_acl.write_text("".join(
            line for line in self.acl.read_text().splitlines(keepends=True)
            if not line.startswith("pattern ")))

    def credential(self, name: str) -> bytes:
        """A file of the gateway's credentials folder."""
        return (self.gw / "credentials" / name).read_bytes()

    def tap(self, card: str) -> str:
        """``permitgate sim tap`` at the front reader: the decision line."""
        return command("agent.cli", "sim", "tap", "-c", str(self.config), "front-in", card,
                       env=self.env).stdout.strip()

    def list_version(self) -> int:
        """The list version the gateway applied (0 before its store exists)."""
        if not self.db.exists():
            return 0
        store = Store(self.db)
        try:
            return store.versions().get("list", 0)
        finally:
            store.close()

    def handshake(self, folder: Path | None = None) -> None:
        """A TLS handshake with the broker as the gateway, with the ``gateway.crt`` and
        ``gateway.key`` in ``folder`` (default: those installed); raises ``ssl.SSLError``
        when the broker refuses it. TLS 1.2 is asked for, where the server judges the
        client's certificate within the handshake itself (in TLS 1.3 its refusal would come
        after the handshake completed)."""
        creds = folder or self.gw / "credentials"
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(creds / "gateway.crt"), str(creds / "gateway.key"))
        with socket.create_connection((self.broker.host, self.broker.port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="localhost"):
            pass

    @contextmanager
    def office(self) -> Iterator[Central]:
        """The office's ``serve`` loop, over TLS with its own certificate."""
        central = Central(self.office_dir, self.broker.host, self.broker.port,
                          tls_ca=self.pki / "ca.crt", tls_cert=self.pki / "central.crt",
                          tls_key=self.pki / "central.key")
        stop = threading.Event()
        serving = threading.Thread(target=central.run, args=(stop,), daemon=True)
        try:
            serving.start()
            yield central
        finally:
            stop.set()
            serving.join(15)
            central.close()

    @contextmanager
    def agent(self, log_name: str = "agent.log") -> Iterator[subprocess.Popen[bytes]]:
        """The agent process, stopped (SIGTERM, then SIGKILL) when the block ends."""
        log_path = self.tmp / log_name
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config),
                 "--log-format", "json"], cwd=REPO, env=self.env, stdout=log,
                stderr=subprocess.STDOUT)
            try:
                yield process
            finally:
                stop_process(process)

    def agent_log(self, log_name: str = "agent.log") -> str:
        """What the agent wrote so far."""
        return (self.tmp / log_name).read_text(errors="replace")


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """Stop ``process`` (SIGTERM, then SIGKILL after 15 s); its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def wait_for_list(site: Site, version: int, what: str, log_name: str = "agent.log") -> None:
    """Wait until the gateway applied list ``version`` or a later one."""
    wait_for(lambda: site.list_version() >= version,
             lambda: f"{what}; agent log:\n{site.agent_log(log_name)[-4000:]}\nbroker log:\n"
                     f"{site.broker.log()[-3000:]}", 120)
