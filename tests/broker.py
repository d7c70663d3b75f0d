"""A real Mosquitto broker for tests, run as a child process on a free 127.0.0.1 port.

Not a test module: tests use it through the ``broker`` and ``brokers`` fixtures of
tests/conftest.py, or build a ``Broker`` themselves and hand it to ``BrokerPool.add`` so it
is stopped at teardown. A broker is either configured from keyword options (plain or TLS
listener, ACL file, persistence, queue and size limits) or rendered from a production
template (config/mosquitto/permitgate.conf) in which only the listener, file paths, the
log destination and the user are rewritten, so the shipped settings are what is tested.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypedDict, Unpack

import pytest

from tests.waiting import wait_for

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_SBIN_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The broker would not start, or would not stop."""


def mosquitto_binary() -> str:
    """The mosquitto executable; fails the test (never skips) when it is not installed."""
    found = shutil.which("mosquitto")
    if found is None:
        # Debian installs it in /usr/sbin, which is not on a non-root user's PATH.
        found = next((c for c in _SBIN_CANDIDATES if os.access(c, os.X_OK)), None)
    if found is None:
        pytest.fail("the mosquitto broker is not installed (looked on PATH and in "
                    f"{', '.join(_SBIN_CANDIDATES)}); the broker tests need a real one: "
                    "apt-get install mosquitto mosquitto-clients, or run "
                    "scripts/bootstrap.sh dev as root", pytrace=False)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PEM files of a TLS listener: the CA that signs client certificates, and the
    broker's own certificate and key; optionally the CA's revocation list (``crlfile``:
    without one, a template's ``crlfile`` line is left out)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path | None = None


class BrokerOptions(TypedDict, total=False):
    """The keyword options of ``Broker`` (for ``BrokerPool.start``)."""

    tls: TlsFiles | None
    acl_file: Path | None
    allow_anonymous: bool | None
    persistence: bool
    autosave_interval: int
    max_queued_messages: int
    message_size_limit: int | None
    tcp_nodelay: bool
    template: Path | None


# Template settings rewritten for the test broker; any other setting that names a file or
# a second listener cannot be made to fit one test folder, so the template is refused.
_REFUSED_IN_TEMPLATE = frozenset({
    "port", "bind_address", "pid_file", "include_dir", "password_file", "psk_file",
    "capath", "plugin", "auth_plugin", "plugin_load", "global_plugin",
    "persistence_file",
})


class Broker:
    """One mosquitto process. The port is chosen once, so ``restart`` keeps it."""

    def __init__(self, folder: Path, *, tls: TlsFiles | None = None,
                 acl_file: Path | None = None, allow_anonymous: bool | None = None,
                 persistence: bool = False, autosave_interval: int = 1,
                 max_queued_messages: int = 100_000, message_size_limit: int | None = None,
                 tcp_nodelay: bool = False, template: Path | None = None) -> None:
        """``allow_anonymous`` defaults to true for a plain listener and false for TLS.
        ``autosave_interval`` (seconds) only matters for ``kill``: a clean ``stop`` saves
        the database anyway. ``tcp_nodelay`` sets mosquitto's ``set_tcp_nodelay`` (Nagle
        off on client sockets: otherwise a small message the broker sends right after
        another may wait for the client's delayed ACK, about 40 ms). With ``template``, the
        template supplies every setting and ``tls``/``acl_file`` only provide the paths its
        lines are rewritten to."""
        self._binary = mosquitto_binary()
        self.folder = folder
        self.tls = tls
        self.acl_file = acl_file
        self.allow_anonymous = tls is None if allow_anonymous is None else allow_anonymous
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.max_queued_messages = max_queued_messages
        self.message_size_limit = message_size_limit
        self.tcp_nodelay = tcp_nodelay
        self.template = template
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "mosquitto.conf"
        self.persistence_dir = folder / "db"
        self._log_path = folder / "mosquitto.log"
        self._port = free_port()
        self._ever_started = False
        self._process: subprocess.Popen[bytes] | None = None

    # -- properties ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the listener is bound to."""
        return HOST

    @property
    def port(self) -> int:
        """The listener's port, the same across restarts."""
        return self._port

    @property
    def log_path(self) -> Path:
        """The broker's log (stdout and stderr of every run, appended)."""
        return self._log_path

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """The log so far."""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- configuration -------------------------------------------------------------------

    def _common_lines(self) -> list[str]:
        return [
            # Tests run as root here; mosquitto would otherwise switch to the "mosquitto"
            # user and then fail to read keys and write the database in the test folder.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "log_dest stderr",
            "log_type all",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]

    def _persistence_lines(self) -> list[str]:
        self.persistence_dir.mkdir(exist_ok=True)
        return [
            "persistence true",
            # The trailing slash matters: mosquitto concatenates it with the file name.
            f"persistence_location {self.persistence_dir}/",
            f"autosave_interval {self.autosave_interval}",
        ]

    def _tls_lines(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"cafile {self.tls.cafile}",
            f"certfile {self.tls.certfile}",
            f"keyfile {self.tls.keyfile}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
        ] + ([f"crlfile {self.tls.crlfile}"] if self.tls.crlfile is not None else [])

    def _render_options(self) -> str:
        lines = self._common_lines()
        lines.append(f"allow_anonymous {'true' if self.allow_anonymous else 'false'}")
        lines.append(f"max_queued_messages {self.max_queued_messages}")
        if self.message_size_limit is not None:
            lines.append(f"message_size_limit {self.message_size_limit}")
        if self.tcp_nodelay:
            lines.append("set_tcp_nodelay true")
        if self.persistence:
            lines += self._persistence_lines()
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        lines.append(f"listener {self._port} {HOST}")
        lines += self._tls_lines()
        return "\n".join(lines) + "\n"

    def _rewrite(self, key: str, raw: str, where: str) -> str | None:
        """One template line as the test broker needs it (None drops it)."""
        if key in _REFUSED_IN_TEMPLATE:
            raise BrokerError(f"{where}: the test broker cannot rewrite {key}")
        if key == "listener":
            return f"listener {self._port} {HOST}"
        if key in ("cafile", "certfile", "keyfile", "crlfile"):
            if self.tls is None:
                raise BrokerError(f"{where}: the template needs TLS files")
            path = getattr(self.tls, key)
            return None if path is None else f"{key} {path}"
        if key == "acl_file":
            if self.acl_file is None:
                raise BrokerError(f"{where}: the template needs acl_file")
            return f"acl_file {self.acl_file}"
        if key == "persistence_location":
            self.persistence_dir.mkdir(exist_ok=True)
            return f"persistence_location {self.persistence_dir}/"
        if key in ("log_dest", "user"):
            return None  # replaced by the common lines
        return raw

    def _render_template(self, template: Path) -> str:
        lines = self._common_lines()
        listeners = 0
        for number, raw in enumerate(template.read_text().splitlines(), start=1):
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                lines.append(raw)
                continue
            key = stripped.split()[0]
            where = f"{template}:{number}: {stripped!r}"
            if key == "listener":
                listeners += 1
                if listeners > 1:
                    raise BrokerError(f"{where}: the test broker has one listener")
            line = self._rewrite(key, raw, where)
            if line is not None:
                lines.append(line)
        if listeners == 0:
            raise BrokerError(f"{template}: no listener line")
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        text = (self._render_options() if self.template is None
                else self._render_template(self.template))
        self.config_path.write_text(text)

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Run the broker and return once its port accepts connections.

        Raises ``BrokerError`` with the log when it exits instead. On the very first start
        a port taken by someone else meanwhile is replaced by another free one; after that
        the port never changes.
        """
        if self.running:
            raise BrokerError("already running")
        for _attempt in range(5):
            self._write_config()
            offset = self._log_path.stat().st_size if self._log_path.exists() else 0
            with self._log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    [self._binary, "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            try:
                self._wait_ready()
            except BrokerError:
                this_run = self.log()[offset:]
                if not self._ever_started and "Address already in use" in this_run:
                    self._port = free_port()
                    continue
                raise
            self._ever_started = True
            return
        raise BrokerError("no free port found in 5 attempts")

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None

        def accepting() -> bool:
            returncode = process.poll()
            if returncode is not None:
                self._process = None
                raise BrokerError(f"mosquitto exited with status {returncode} on start; "
                                  f"config {self.config_path}, log:\n{self.log()}")
            try:
                with socket.create_connection((HOST, self._port), timeout=0.5):
                    return True
            except OSError:
                return False

        try:
            wait_for(accepting, f"mosquitto to accept connections on port {self._port}",
                     START_TIMEOUT_S)
        except AssertionError as exc:
            self._terminate(signal.SIGKILL)
            raise BrokerError(f"{exc}; log:\n{self.log()}") from exc

    def _terminate(self, sig: signal.Signals) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            # A paused broker (``pause``) handles SIGTERM only once it runs again.
            process.send_signal(signal.SIGCONT)
        try:
            return process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise BrokerError(f"mosquitto ignored {sig.name} for {STOP_TIMEOUT_S} s and "
                              f"was killed; log:\n{self.log()}") from None

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM): with persistence on, the database is saved."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """Die at once (SIGKILL), as on a power cut: changes since the last autosave are
        lost."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Stop cleanly and start again on the same port."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): its sockets stay open and nothing answers, as
        when a broker host hangs or a NAT drops a connection without a reset."""
        if self._process is None or self._process.poll() is not None:
            raise BrokerError("not running")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused broker run again (SIGCONT); harmless when it is not paused."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class BrokerPool:
    """Brokers for one test, each in its own sub-folder; ``close`` stops all of them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._brokers: list[Broker] = []

    def new(self, **options: Unpack[BrokerOptions]) -> Broker:
        """A broker not yet started (so the test can start, kill and restart it)."""
        broker = Broker(self.folder / f"broker{len(self._brokers)}", **options)
        return self.add(broker)

    def start(self, **options: Unpack[BrokerOptions]) -> Broker:
        """A running broker."""
        broker = self.new(**options)
        broker.start()
        return broker

    def add(self, broker: Broker) -> Broker:
        """Adopt a broker built elsewhere so that it is stopped at teardown."""
        self._brokers.append(broker)
        return broker

    def close(self) -> None:
        """Stop every broker; a broker that will not stop is killed, and the first such
        error is raised after all the others were stopped."""
        errors: list[BrokerError] = []
        for broker in self._brokers:
            try:
                broker.stop()
            except BrokerError as exc:
                errors.append(exc)
        self._brokers.clear()
        if errors:
            raise errors[0]
