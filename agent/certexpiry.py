"""How long the gateway's TLS client certificate has left, for ``permitgate status`` and
``doctor``: a warning from ``WARN_DAYS`` before it expires (time to run ``permitgate
provision --renew``), a failure once it has expired (the broker refuses the handshake, so
the gateway gets no list, revocation or command until it is renewed).

A certificate that exists but that the user running the command may not read (the
root-only ``/etc/permitgate/credentials`` of an installed gateway, which the agent gets
through systemd's ``LoadCredential=``, read by ``status`` run as ``permitgate``) says
nothing about the certificate: it is ``unchecked``, a note with the command that checks it
with root's rights, never an alarm. A missing, unparsable or expired certificate is one."""

from __future__ import annotations

import datetime as dt
import os
import pwd
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

from agent.config import Config
from agent.provision import credentials
from agent.resolve import config_dir, resolve_paths

WARN_DAYS = 30
RENEW_HINT = "renew it: 'permitgate provision --renew', then take the request to the office"

State = Literal["ok", "expiring", "expired", "unreadable", "unchecked"]
"""``unreadable``: missing or not a certificate (an alarm); ``unchecked``: there, but this
user may not read it (a note)."""


@dataclass(frozen=True, slots=True)
class CertificateExpiry:
    """The certificate's file, expiry and state, with the sentence that says so."""

    path: Path
    not_after: dt.datetime | None
    days_left: int | None
    state: State
    message: str
    check_with: str | None = None
    """When ``unchecked``: the command that checks it with root's rights."""

    def as_dict(self) -> dict[str, object]:
        """For ``status --json``."""
        return {"file": str(self.path), "state": self.state, "days_left": self.days_left,
                "not_after": None if self.not_after is None
                else self.not_after.isoformat(timespec="seconds"),
                "check_with": self.check_with}


def user_name() -> str:
    """The name of the user this process runs as (its uid when it has none)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_as_root(credentials_dir: Path | None, config_path: Path | None) -> str:
    """The command that checks the certificate with root's rights and the files the agent
    gets under systemd (docs/operations.md): ``sudo env
    CREDENTIALS_DIRECTORY=<folder> permitgate doctor -c <config>``."""
    invoked = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    program = Path(sys.executable).with_name("permitgate")
    if invoked is not None and invoked.name == "permitgate":
        command = str(invoked.absolute())  # as typed: /opt/permitgate/.venv/bin/permitgate
    else:
        command = str(program) if program.exists() else "permitgate"
    env = f"env CREDENTIALS_DIRECTORY={credentials_dir} " if credentials_dir else ""
    config = f" -c {config_path.absolute()}" if config_path is not None else ""
    return f"sudo {env}{command} doctor{config}"


def certificate_expiry(path: Path, now: dt.datetime | None = None, *,
                       check_with: str | None = None) -> CertificateExpiry:
    """Read ``path`` and judge its expiry at ``now`` (default: this machine's clock).
    A file this user may not read is ``unchecked``, with ``check_with`` (default: the
    doctor run as root with the file's folder as the credentials folder)."""
    when = now or dt.datetime.now(dt.UTC)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except PermissionError:
        return CertificateExpiry(path, None, None, "unchecked",
                                 f"{path}: cannot be checked by this user ({user_name()}): "
                                 "permission denied",
                                 check_with or check_as_root(path.parent, None))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return CertificateExpiry(path, None, None, "unreadable",
                                 f"{path}: cannot read the certificate: {reason}")
    not_after = cert.not_valid_after_utc
    left = not_after - when
    days = left.days
    date = f"{not_after:%Y-%m-%d %H:%M} UTC"
    if left <= dt.timedelta(0):
        return CertificateExpiry(path, not_after, days, "expired",
                                 f"{path} EXPIRED on {date}: the broker refuses it")
    if left <= dt.timedelta(days=WARN_DAYS):
        return CertificateExpiry(path, not_after, days, "expiring",
                                 f"{path} expires on {date}, in {days} day(s)")
    return CertificateExpiry(path, not_after, days, "ok",
                             f"{path} valid until {date} ({days} days)")


def _absent(path: Path) -> bool:
    """No such file (a folder this user may not search is not proof of that)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def gateway_certificate(config: Config, config_path: Path | None,
                        now: dt.datetime | None = None) -> CertificateExpiry | None:
    """The expiry of the configured client certificate; None without sync over TLS.

    The file is the one the agent would use (``$CREDENTIALS_DIRECTORY`` first, then the
    data folder). When a bare name is in neither, as for ``status`` run without systemd's
    credentials on an installed gateway, it is the one ``permitgate provision`` installed
    in the credentials folder beside the configuration, which the unit's
    ``LoadCredential=`` hands to the agent."""
    tls = resolve_paths(config, config_path).tls
    if tls is None:
        return None
    path = tls.cert
    name = config.sync.cert_file
    if "/" not in name and _absent(path):
        installed = credentials(config_dir(config_path)) / name
        if not _absent(installed):
            path = installed
    folder = path.parent if "/" not in name else None
    return certificate_expiry(path, now, check_with=check_as_root(folder, config_path))
