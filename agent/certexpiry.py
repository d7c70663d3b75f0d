"""How long the gateway's TLS client certificate has left, for ``permitgate status`` and
``doctor``: a warning from ``WARN_DAYS`` before it expires (time to run ``permitgate
provision --renew``), a failure once it has expired (the broker refuses the handshake, so
the gateway gets no list, revocation or command until it is renewed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

from agent.config import Config
from agent.resolve import resolve_paths

WARN_DAYS = 30
RENEW_HINT = "renew it: 'permitgate provision --renew', then take the request to the office"

State = Literal["ok", "expiring", "expired", "unreadable"]


@dataclass(frozen=True, slots=True)
class CertificateExpiry:
    """The certificate's file, expiry and state, with the sentence that says so."""

    path: Path
    not_after: dt.datetime | None
    days_left: int | None
    state: State
    message: str

    def as_dict(self) -> dict[str, object]:
        """For ``status --json``."""
        return {"file": str(self.path), "state": self.state, "days_left": self.days_left,
                "not_after": None if self.not_after is None
                else self.not_after.isoformat(timespec="seconds")}


def certificate_expiry(path: Path, now: dt.datetime | None = None) -> CertificateExpiry:
    """Read ``path`` and judge its expiry at ``now`` (default: this machine's clock)."""
    when = now or dt.datetime.now(dt.UTC)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
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


def gateway_certificate(config: Config, config_path: Path | None,
                        now: dt.datetime | None = None) -> CertificateExpiry | None:
    """The expiry of the configured client certificate; None without sync over TLS."""
    tls = resolve_paths(config, config_path).tls
    return None if tls is None else certificate_expiry(tls.cert, now)
