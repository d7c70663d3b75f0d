"""The gateway certificate's expiry check run by a user who may not read the certificate:
``permitgate status`` run as ``permitgate`` on an installed gateway, whose certificate is
in the root-only ``/etc/permitgate/credentials`` (the agent gets it through systemd's
``LoadCredential=``). That is a note saying how to check it as root, not an alarm; a
certificate truly missing stays an alarm.

Permissions are real: a file or folder is made unreadable with chmod, and the check runs
as a user it stops. Root reads any file whatever its mode, so when the tests run as root
the check runs in a forked child that switched to ``nobody``; otherwise in this process,
whose own chmod 000 stops it. Each such run first proves that the read is refused.
"""

from __future__ import annotations

import datetime as dt
import encodings.utf_8_sig  # noqa: F401 - loaded before a child may lose access to it
import io
import json
import os
import pickle
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import cli
from agent.certexpiry import certificate_expiry
from agent.config import load_config
from agent.doctor import Status, check_sync
from agent.store import Store
from tests.agentconf import agent_toml

NOBODY = 65534
"""The uid and gid a root test run switches to (``nobody`` on Debian and Ubuntu)."""
ROOT = os.geteuid() == 0

T = TypeVar("T")


def as_another_user(fn: Callable[[], T]) -> T:
    """``fn()`` run by a user whom chmod stops: as root, in a forked child that switched
    to ``nobody`` (its result comes back pickled); otherwise here."""
    if not ROOT:
        return fn()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                payload = pickle.dumps((True, fn()))
            except BaseException:  # noqa: BLE001 - everything goes back to the test
                payload = pickle.dumps((False, traceback.format_exc()))
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(payload)  # noqa: S301 - from the child this test forked
    if not ok:
        pytest.fail(f"in the process run as another user:\n{value}")
    result: T = value
    return result


def refused(path: Path) -> bool:
    """Whether reading ``path`` is refused for lack of permission."""
    try:
        path.read_bytes()
    except PermissionError:
        return True
    except FileNotFoundError:
        return False
    return False


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may enter (pytest's own temporary folder is private to the
    user running the tests), removed afterwards with what the test locked in it."""
    folder = Path(tempfile.mkdtemp(prefix="permitgate-certs-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        if not ROOT:  # root removes anything; another user first opens what it locked
            _unlock(folder)
        shutil.rmtree(folder)


def _unlock(folder: Path) -> None:
    folder.chmod(0o700)
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            _unlock(child)


def write_certificate(path: Path, *, days: int = 400) -> str:
    """A self-signed certificate valid for ``days`` more days at ``path`` (mode 0600);
    its expiry date as ``status`` prints it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-0001")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days)).sign(key, hashes.SHA256()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o600)
    return f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


def test_a_certificate_this_user_may_not_read_is_unchecked_not_an_alarm(
        open_folder: Path) -> None:
    """A certificate file the user may not read is "unchecked", with the sudo command
    that checks it; the same file, once readable, is a valid certificate ("ok"), and a
    missing one stays "unreadable" (an alarm)."""
    path = open_folder / "credentials" / "gateway.crt"
    write_certificate(path)
    path.parent.chmod(0o755)
    path.chmod(0o000)

    def check() -> tuple[bool, dict[str, object], str]:
        found = certificate_expiry(path)
        return refused(path), found.as_dict(), found.message

    denied, found, message = as_another_user(check)
    assert denied
    assert found["state"] == "unchecked"
    assert found["days_left"] is None
    assert message.startswith(f"{path}: cannot be checked by this user (")
    assert str(found["check_with"]).startswith(f"sudo env CREDENTIALS_DIRECTORY={path.parent} ")
    assert str(found["check_with"]).endswith("permitgate doctor")

    path.chmod(0o644)
    denied, found, _ = as_another_user(check)
    assert not denied
    assert found["state"] == "ok"

    path.unlink()
    denied, found, message = as_another_user(check)
    assert found["state"] == "unreadable"
    assert "No such file or directory" in message


@pytest.fixture
def installed(open_folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, str]:
    """An installed gateway's layout: ``etc/permitgate.toml`` with sync over TLS naming
    the certificate by its bare name, the certificate in ``etc/credentials`` (root-only
    0700 as install.sh makes it, 0000 when the tests do not run as root), the store in a
    data folder of the agent's user; no ``$CREDENTIALS_DIRECTORY`` (status run by hand).
    Returns the configuration, the credentials folder and the certificate's expiry."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    etc, data = open_folder / "etc", open_folder / "data"
    etc.mkdir()
    etc.chmod(0o755)
    data.mkdir(mode=0o700)
    config = etc / "permitgate.toml"
    config.write_text(agent_toml(data, site_key="site.key", sync={"enabled": True},
                                 gateway_id="gw-0001"))
    config.chmod(0o644)
    Store(data / "pg.db").close()
    if ROOT:
        for path in [data, *data.iterdir()]:
            os.chown(path, NOBODY, NOBODY)
    credentials = etc / "credentials"
    expiry = write_certificate(credentials / "gateway.crt")
    credentials.chmod(0o700 if ROOT else 0o000)
    return config, credentials, expiry


def status(config: Path, *more: str) -> tuple[int, str]:
    """``permitgate status -c CONFIG MORE``: its exit status and what it printed."""
    out = io.StringIO()
    return cli.main(["status", "-c", str(config), *more], out=out), out.getvalue()


def tls_line(text: str) -> str:
    """The ``tls cert`` line of ``status``."""
    return next(line for line in text.splitlines() if line.startswith("tls cert   "))


def test_status_run_by_the_agents_user_notes_the_root_only_certificate_instead_of_an_alarm(
        installed: tuple[Path, Path, str]) -> None:
    """status run by a user who may not enter the credentials folder beside the
    configuration says the certificate there cannot be checked by this user and gives
    the sudo doctor command, as a NOTE, never an ALARM (--json: state "unchecked")."""
    config, credentials, _ = installed
    cert = credentials / "gateway.crt"

    def run() -> tuple[bool, tuple[int, str], tuple[int, str]]:
        return refused(cert), status(config), status(config, "--json")

    denied, (code, text), (json_code, as_json) = as_another_user(run)
    assert denied
    assert (code, json_code) == (0, 0), text
    line = tls_line(text)
    assert line.startswith(f"tls cert   NOTE {cert}: cannot be checked by this user (")
    assert f"; check it with: sudo env CREDENTIALS_DIRECTORY={credentials} " in line
    assert line.endswith(f"permitgate doctor -c {config}")
    assert "ALARM" not in line
    found = json.loads(as_json)["certificate"]
    assert (found["file"], found["state"]) == (str(cert), "unchecked")


def test_status_with_the_rights_to_read_it_judges_that_certificate_and_alarms_when_missing(
        installed: tuple[Path, Path, str]) -> None:
    """status run by a user who may read the credentials folder beside the configuration
    reports the certificate's expiry from there; once the certificate is truly gone, from
    there and from the data folder, the line is an ALARM again."""
    config, credentials, expiry = installed
    credentials.chmod(0o700)
    cert = credentials / "gateway.crt"

    code, text = status(config)
    assert code == 0, text
    assert tls_line(text).startswith(f"tls cert   {cert} valid until {expiry}")

    cert.unlink()
    code, text = status(config)
    data = load_config(config).store.path.parent
    assert tls_line(text) == (f"tls cert   ALARM {data / 'gateway.crt'}: cannot read the "
                              "certificate: No such file or directory; renew it: 'permitgate "
                              "provision --renew', then take the request to the office")


def test_doctor_warns_about_tls_files_this_user_may_not_read(
        open_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The doctor, given a credentials folder whose certificate and key this user may not
    read, warns for each with the sudo command that checks them instead of failing; the
    certificate, once readable, gets its expiry checked."""
    credentials = open_folder / "credentials"
    write_certificate(credentials / "gateway.crt")
    credentials.chmod(0o755)
    for name in ("ca.crt", "gateway.key"):
        (credentials / name).write_text("not checked here\n")
    (credentials / "ca.crt").chmod(0o644)
    for name in ("gateway.crt", "gateway.key"):
        (credentials / name).chmod(0o000)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    config_path = open_folder / "permitgate.toml"
    config_path.write_text(agent_toml(open_folder / "data", site_key="site.key",
                                      sync={"enabled": True}))
    config_path.chmod(0o644)
    config = load_config(config_path)

    def run() -> tuple[bool, dict[str, tuple[Status, str, str]]]:
        checks = {c.subject: (c.status, c.detail, c.fix) for c in check_sync(config,
                                                                               config_path)}
        return refused(credentials / "gateway.crt"), checks

    denied, checks = as_another_user(run)
    assert denied
    for key, name in (("cert_file", "gateway.crt"), ("key_file", "gateway.key")):
        state, detail, fix = checks[f"sync {key}"]
        assert state == "warn"
        assert detail.startswith(f"{credentials / name}: cannot be checked by this user (")
        assert fix.startswith(f"check it with: sudo env CREDENTIALS_DIRECTORY={credentials} ")
        assert fix.endswith(f"permitgate doctor -c {config_path}")
    assert checks["sync ca_file"][0] == "ok"
    assert "sync certificate" not in checks

    (credentials / "gateway.crt").chmod(0o644)
    denied, checks = as_another_user(run)
    assert not denied
    assert checks["sync cert_file"][0] == "ok"
    assert checks["sync certificate"][0] == "ok"
