"""Removing a lost or retired gateway (``permitgate-central remove-gateway GW --reason
TEXT``).

In one command the office:

- records the gateway as removed (``Central.mark_removed``): from then on every message
  on its topics is refused as an unknown gateway's is, counted with them and logged
  (``provisioning.receive``), so a stolen gateway can no longer report events, enrollments
  or status in its name;
- adds every certificate it issued to the gateway (the current one and those renewals
  replaced, from ``DIR/gateways/<gateway>.json``) to the site CA's revocation list
  ``crl.pem`` (``provisioning.pki.revoke``): the broker, once restarted with it as its
  ``crlfile``, refuses their TLS handshake;
- deletes the gateway's broker ACL entry (``DIR/broker-acl/<gateway>.acl``) and, with
  ``--acl-file``, its ``user`` block in the broker's ACL file.

The gateway's record is kept, marked removed, and its events stay stored. A removed id is
never registered or renewed again.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from provisioning import pki
from provisioning.central import Central
from provisioning.errors import CentralUsageError
from provisioning.renew import read_record, record_path, write_record

ACL_DIR = "broker-acl"
"""Where ``register-gateway`` keeps each gateway's ACL entry."""


@dataclass(frozen=True, slots=True)
class Removal:
    """What ``remove_gateway`` did."""

    gateway_id: str
    serials: tuple[str, ...]
    """The certificates revoked (hexadecimal serials)."""
    crl: Path | None
    acl_removed: tuple[Path, ...]


def _usage(message: str) -> CentralUsageError:
    return CentralUsageError(f"remove-gateway: {message}")


def without_user_block(text: str, gateway: str) -> str | None:
    """``text`` (a Mosquitto ACL file) without the gateway's ``user`` block: the line
    ``user <gateway>``, the ``topic`` lines after it, the comment ``register-gateway``
    wrote above it and the blank line before; None when there is no such block."""
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.split() == ["user", gateway]), None)
    if at is None:
        return None
    start, end = at, at + 1
    while end < len(lines) and lines[end].lstrip().startswith("topic "):
        end += 1
    if start > 0 and lines[start - 1].startswith(f"# {gateway} "):
        start -= 1
    if start > 0 and not lines[start - 1].strip():
        start -= 1
    return "".join(lines[:start] + lines[end:])


def _serials(record: dict[str, Any]) -> list[str]:
    serials = [str(old.get("serial")) for old in record.get("previous_certificates") or []
               if isinstance(old, dict)]
    serials.append(str(record.get("certificate_serial")))
    return [s for s in dict.fromkeys(serials) if s and s not in ("None", "?")]


def remove_gateway(central: Central, gateway: str, reason: str, *,
                   pki_dir: Path | None = None, acl_file: Path | None = None) -> Removal:
    """Remove ``gateway`` (see the module docstring). ``CentralUsageError`` before anything
    is written for an unknown gateway, one removed already, an empty reason, or a PKI
    folder without the CA."""
    folder = central.folder
    if not reason.strip():
        raise _usage("--reason: say why (lost, stolen, replaced...); it is recorded")
    if gateway not in central.gateways():
        raise _usage(f"gateway {gateway!r} is unknown here")
    earlier = central.removed(gateway)
    if earlier is not None:
        raise _usage(f"gateway {gateway!r} was removed already ({earlier.get('at')}: "
                     f"{earlier.get('reason')})")
    has_record = record_path(folder, gateway).exists()
    record = read_record(folder, gateway, "remove-gateway") if has_record else {}
    serials = _serials(record)
    pki_folder = pki_dir or folder / "pki"
    try:
        numbers = [int(s, 16) for s in serials]
    except ValueError:
        raise _usage(f"{record_path(folder, gateway)}: a certificate serial is not "
                     "hexadecimal") from None
    if numbers:
        try:
            pki.load_pem(pki_folder, "ca")
        except pki.PkiError as exc:
            raise _usage(f"--pki {pki_folder}: {exc}") from None
    acl_text = None
    if acl_file is not None:
        try:
            acl_text = acl_file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _usage(f"--acl-file {acl_file}: cannot read it: {exc}") from None

    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    entry = {"at": when, "reason": reason.strip(), "certificates": ", ".join(serials)}
    # The CRL first: should a later step fail, the command can be given again.
    crl = pki.revoke(pki_folder, numbers) if numbers else None
    if has_record:
        write_record(folder, gateway, {**record, "removed": entry})
    central.mark_removed(gateway, entry)
    removed: list[Path] = []
    own = folder / ACL_DIR / f"{gateway}.acl"
    if own.exists():
        own.unlink()
        removed.append(own)
    if acl_file is not None and acl_text is not None:
        kept = without_user_block(acl_text, gateway)
        if kept is not None:
            acl_file.write_text(kept, "utf-8")
            removed.append(acl_file)
    return Removal(gateway, tuple(serials), crl, tuple(removed))


# -- the command ---------------------------------------------------------------------------


def add_remove_command(sub: Any, common: argparse.ArgumentParser,
                       central: Callable[[argparse.Namespace], Central]) -> None:
    """Register ``remove-gateway`` on ``permitgate-central``'s subparsers."""
    p = sub.add_parser("remove-gateway", parents=[common], help="remove a lost or retired "
                       "gateway: refuse its messages, revoke its certificates, drop its ACL")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (recorded)")
    p.add_argument("--pki", type=Path, metavar="FOLDER", help="the site PKI folder with the "
                   "CA and crl.pem (default DIR/pki)")
    p.add_argument("--acl-file", type=Path, metavar="FILE", help="also delete the "
                   "gateway's 'user' block from this broker ACL file")
    p.set_defaults(func=lambda args, out: cmd_remove_gateway(args, out, central))


def cmd_remove_gateway(args: argparse.Namespace, out: TextIO,
                       central: Callable[[argparse.Namespace], Central]) -> int:
    """Remove a gateway; say what was done and what the broker's operator must do."""
    with central(args) as office:
        done = remove_gateway(office, args.gateway, args.reason, pki_dir=args.pki,
                              acl_file=args.acl_file)
    out.write(f"removed gateway {done.gateway_id}: the office refuses its messages from "
              "now on\n")
    if done.crl is not None:
        out.write(f"  revoked      certificate(s) {', '.join(done.serials)} in {done.crl}\n")
    else:
        out.write("  revoked      no certificate on record (not registered with "
                  "register-gateway): replace the site CA, or revoke its certificate by "
                  "hand\n")
    out.write("  broker ACL   " + (", ".join(f"its entry deleted from {p}" for p in
                                         done.acl_removed) or "no entry found") + "\n")
    if done.crl is not None:
        out.write(f"\nCopy {done.crl} to the broker's crlfile (/etc/mosquitto/permitgate/"
                  "crl.pem) and restart the broker (systemctl restart mosquitto): it reads "
                  "the list only when it starts; until then the gateway can still connect.\n")
    return 0
