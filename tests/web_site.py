"""A real building for the landlord page's tests and benchmark: the agent
(``python -m agent.cli run``) with enrollment on and a serial EM4100 reader on a
pseudo-terminal, and the page (``python -m agent.web.cli run``) over HTTPS with a
self-signed device certificate, both as child processes on one configuration.

Not a test module: tests/test_web_browser.py and bench/web.py build on it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from agent.store import Store, StoredEvent
from drivers.serial_reader import em4100_frame
from protocol.hashing import CredentialHasher, log_prefix
from protocol.sealing import public_key_text
from tests.agentconf import DoorSpec, ReaderSpec, write_agent
from tests.conftest import PtyPeer
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
HASHER = CredentialHasher(KEY)
UNITS = ("101", "102", "201", "202", "301")
PERMIT = "11010519491231002X"
"""The standard's own sample citizen number (valid check character)."""
PERMIT_BAD_CHECK = "110105194912310021"


def free_port() -> int:
    """A TCP port free on the loopback address now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def card(value: str) -> str:
    """The card id the agent hashes for an EM4100 value."""
    return f"em4100:{value}"


def prefix(value: str) -> str:
    """The hash prefix the page shows for an EM4100 value."""
    return log_prefix(HASHER.credential(card(value)))


def write_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, with its key (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-gw")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "web.crt", folder / "web.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class Building:
    """One agent and one page on a folder; ``start`` both, ``close`` both."""

    def __init__(self, folder: Path, pty: PtyPeer, *, capture_timeout_s: float = 5.0,
                 units: tuple[str, ...] = UNITS, tls: bool = True,
                 extra_web: str = "") -> None:
        self.folder = folder
        self.pty = pty
        self.port = free_port()
        self.tls = tls
        self.office = X25519PrivateKey.generate()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "office-seal.pub").write_text(public_key_text(self.office.public_key()))
        self.relay_file = folder / "relay.json"
        web = ['listen = "127.0.0.1"', f"port = {self.port}",
               'allowed_hosts = ["127.0.0.1"]', f'state_dir = "{folder / "web"}"']
        if tls:
            cert, key = write_certificate(folder)
            web += [f'tls_cert = "{cert}"', f'tls_key = "{key}"']
        else:
            web += ['tls_cert = "none"', 'tls_key = "none"']
        self.config = write_agent(
            folder,
            doors=(DoorSpec(relay={"driver": "simulated",
                                   "options": {"state_file": str(self.relay_file)}}),),
            readers=(ReaderSpec(driver="serial", options={"port": pty.path}),),
            site_id="test-site", gateway_id="test-gw",
            extra="\n[enrollment]\nenabled = true\n"
                  f"units = {json.dumps(list(units))}\n"
                  'seal_key = "./office-seal.pub"\n'
                  f"capture_timeout_s = {capture_timeout_s}\n"
                  "\n[web]\n" + "\n".join(web) + "\n" + extra_web)
        text = self.config.read_text().replace(
            '[site]\nsite_id = "test-site"\ngateway_id = "test-gw"',
            '[site]\nsite_id = "test-site"\ngateway_id = "test-gw"\ntimezone = "Asia/Shanghai"')
        self.config.write_text(text)
        self.db = folder / "pg.db"
        self.web_db = folder / "web" / "web.db"
        self.agent: subprocess.Popen[bytes] | None = None
        self.web: subprocess.Popen[bytes] | None = None
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    # -- processes ----------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(argv, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PERMITGATE_CONFIG": ""})
        finally:
            log.close()

    def log(self, name: str) -> str:
        """A child's output so far (for failure messages)."""
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def start(self) -> None:
        """Start the agent, wait for its reader, then the page, and wait for it to answer."""
        self.agent = self._spawn("agent", [sys.executable, "-m", "agent.cli", "run",
                                           "--config", str(self.config), "--log-format",
                                           "json"])
        wait_for(lambda: (self.count("reader_online") > 0 and
                 (self.folder / "web.sock").exists()) or self._dead(self.agent, "agent"),
                 lambda: "the agent's reader and web.sock\n" + self.log("agent"))
        self.start_web()

    def start_web(self) -> None:
        """Start the page and wait until it answers."""
        self.web = self._spawn("web", [sys.executable, "-m", "agent.web.cli", "-c",
                                       str(self.config), "run"])
        wait_for(lambda: self.answers() or self._dead(self.web, "web"),
                 lambda: "the page to answer\n" + self.log("web"))

    @staticmethod
    def _dead(proc: subprocess.Popen[bytes] | None, name: str) -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}")
        return False

    def answers(self) -> bool:
        """Whether the page serves its sign-in page."""
        try:
            status, _body, _h = self.get("/login")
        except OSError:
            return False
        return status == 200

    def stop(self, proc: subprocess.Popen[bytes] | None) -> None:
        """SIGTERM a child and wait for it (SIGKILL if it hangs)."""
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        """Stop both children."""
        self.stop(self.web)
        self.stop(self.agent)

    # -- plain HTTP ---------------------------------------------------------------------------

    def get(self, path: str, headers: dict[str, str] | None = None,
            data: bytes | None = None) -> tuple[int, bytes, dict[str, str]]:
        """One request to the page (no redirects followed); status, body, headers."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        request = urllib.request.Request(  # noqa: S310 - our own https URL
            self.base + path, data=data, headers=headers or {},
            method="POST" if data is not None else "GET")
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                             _NoRedirect())
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    # -- the agent's side -----------------------------------------------------------------------

    def tap(self, value: str) -> None:
        """The card ``value`` is held to the reader."""
        self.pty.write(em4100_frame(value))

    def events(self) -> list[StoredEvent]:
        """Every event the agent stored."""
        if not self.db.exists():
            return []
        store = Store(self.db)
        try:
            return list(store.iter_events())
        finally:
            store.close()

    def count(self, kind: str, **fields: Any) -> int:
        """Stored events of ``kind`` whose fields (or data fields) match."""
        return sum(1 for e in self.events() if e.kind == kind and all(
            getattr(e, k, None) == v or e.data.get(k) == v for k, v in fields.items()))

    def tenants(self) -> list[dict[str, Any]]:
        """The agent's tenant list, as the page gets it."""
        reply = self.ask({"op": "tenants"})
        assert reply.get("ok"), reply
        tenants: list[dict[str, Any]] = reply["tenants"]
        return tenants

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request on the agent's web.sock, as the page sends it."""
        from agent.web.agentlink import AgentLink  # noqa: PLC0415 - only where asked

        return AgentLink(self.folder / "web.sock").call_sync(message)

    def enroll(self, value: str, unit: str, lease_end: str) -> str:
        """Enroll the card ``value`` through the agent's socket (a tenant made without the
        page, for tests about something else); returns the enrollment id."""
        capture = self.ask({"op": "capture_start", "reader": "front-in", "account": "test"})
        self.tap(value)
        wait_for(lambda: self.ask({"op": "capture_status", "capture": capture["capture"]}
                                  )["state"] == "captured", "the capture of the tap")
        reply = self.ask({"op": "enroll", "capture": capture["capture"], "unit": unit,
                          "permit": PERMIT, "lease_end": lease_end, "account": "test"})
        assert reply.get("ok"), reply
        return str(reply["enrollment"]["id"])

    # -- the page's accounts --------------------------------------------------------------------

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """``permitgate-web -c CONFIG ARGS``."""
        return subprocess.run([sys.executable, "-m", "agent.web.cli", "-c", str(self.config),
                               *args], input=stdin, capture_output=True, text=True,
                              cwd=self.folder, timeout=60, check=False,
                              env={**os.environ, "PERMITGATE_CONFIG": ""})

    def add_user(self, name: str, password: str, role: str = "landlord") -> None:
        """An account made with the command line."""
        done = self.cli("users", "add", name, "--role", role, "--password-stdin",
                        stdin=password + "\n")
        assert done.returncode == 0, done.stderr

    def setup_code(self, role: str = "landlord") -> str:
        """A one-time code from ``users init``."""
        done = self.cli("users", "init", "--role", role)
        assert done.returncode == 0, done.stderr
        return done.stdout.split("account: ", 1)[1].split()[0]

    def age_sessions(self, name: str, seconds: float) -> None:
        """Make ``name``'s sessions look ``seconds`` older (as if that much time passed)."""
        ms = int(seconds * 1000)
        with contextlib.closing(sqlite3.connect(self.web_db)) as conn, conn:
            conn.execute("UPDATE sessions SET seen_ms = seen_ms - ?, created_ms = created_ms - ?"
                         " WHERE user_id = (SELECT id FROM users WHERE name = ?)",
                         (ms, ms, name))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
