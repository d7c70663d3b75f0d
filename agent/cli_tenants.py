"""The terminal's tenant commands: ``enroll``, ``unenroll``, ``tenants``,
``validate-permit`` and ``users`` (the landlord page's accounts).

``enroll`` guides an installer through the same steps as the landlord page (pick a
reader, tap the card, unit, permit number, lease end), or takes every step as a flag for
scripts; like the page it asks the running agent over its control socket, which alone
captures the tap, seals the permit number and records the enrollment. ``tenants`` reads
the store directly and works with the agent stopped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any, TextIO

from agent.control import request
from agent.resolve import resolve_paths
from agent.tenants import TenantState
from protocol.hashing import log_prefix
from protocol.permits import DESCRIPTIONS, PermitError, validate_permit

POLL_S = 0.2
"""How often ``enroll`` asks whether the card was tapped."""


class TenantUsageError(Exception):
    """Unusable input at the terminal (exit 2); the message says which."""


def add_tenant_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the tenant commands on ``permitgate``'s subparsers."""
    enroll = sub.add_parser("enroll", parents=[common], help="enroll a tenant: tap the card "
                            "at a reader, then unit, permit number and lease end")
    enroll.add_argument("--reader", help="the reader to tap the card at")
    enroll.add_argument("--unit", help="the tenant's unit (from [enrollment] units)")
    enroll.add_argument("--permit", help="the permit number (checked before anything is "
                        "sent)")
    enroll.add_argument("--lease-end", help="the last day of the lease, YYYY-MM-DD")
    enroll.add_argument("--account", default="cli", help="who enrolls (recorded)")
    enroll.set_defaults(func=cmd_enroll)
    unenroll = sub.add_parser("unenroll", parents=[common], help="move a tenant (or every "
                              "tenant of a unit) out: access ends at once")
    which = unenroll.add_mutually_exclusive_group(required=True)
    which.add_argument("--enrollment", help="the enrollment id (see 'permitgate tenants')")
    which.add_argument("--unit", help="every tenant of this unit")
    unenroll.add_argument("--account", default="cli", help="who moves them out (recorded)")
    unenroll.set_defaults(func=cmd_unenroll)
    tenants = sub.add_parser("tenants", parents=[common], help="list enrolled tenants")
    tenants.add_argument("--unit", help="only this unit")
    tenants.add_argument("--state", choices=[s.value for s in TenantState])
    tenants.add_argument("--json", action="store_true", help="machine-readable output")
    tenants.set_defaults(func=cmd_tenants)
    validate = sub.add_parser("validate-permit", help="check a permit number: print the "
                              "kind of document, or the rule it breaks (exit 2)")
    validate.add_argument("number")
    validate.set_defaults(func=cmd_validate_permit)
    users = sub.add_parser("users", parents=[common], help="the landlord page's accounts "
                           "(permitgate-web users ...)")
    users.add_argument("rest", nargs=argparse.REMAINDER,
                       help="init | add | list | passwd | delete | role ... ")
    users.set_defaults(func=cmd_users)


def cmd_validate_permit(args: argparse.Namespace, out: TextIO) -> int:
    """Print what a permit number is, or which rule it breaks (exit 2)."""
    try:
        permit = validate_permit(args.number)
    except PermitError as exc:
        out.write(f"invalid: {exc} [{exc.rule}]\n")
        return 2
    out.write(f"valid: {permit.number} is a {DESCRIPTIONS[permit.kind]} ({permit.kind})\n")
    return 0


def _socket(args: argparse.Namespace) -> tuple[Any, Path]:
    from agent import cli  # noqa: PLC0415 - cli imports this module

    config, path = cli._load(args)  # noqa: SLF001 - the CLI's one configuration loader
    if not config.enrollment.enabled:
        raise TenantUsageError("enrollment is not enabled in this configuration "
                               "([enrollment] enabled = true)")
    return config, resolve_paths(config, path).control_socket


def _ask(sock: Path, message: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = request(sock, message)
    except (FileNotFoundError, ConnectionRefusedError):
        raise TenantUsageError(f"no agent answers at {sock}: is it running ('permitgate "
                               "status')?") from None
    except PermissionError:
        raise TenantUsageError(f"{sock}: permission denied (run as the agent's user, or "
                               "with sudo)") from None
    return reply


def _prompt(label: str, ask: Callable[[str], str] = input) -> str:
    try:
        return ask(label).strip()
    except EOFError:
        raise TenantUsageError(f"{label.strip(': ')}: no answer (give it as a flag)") from None


def cmd_enroll(args: argparse.Namespace, out: TextIO) -> int:
    """Enroll a tenant through the running agent, guided or by flags."""
    config, sock = _socket(args)
    interactive = sys.stdin.isatty()
    readers = [r.id for r in config.readers]
    reader = args.reader or (_prompt(f"Reader ({', '.join(readers)}): ") if interactive
                             else None)
    if reader not in readers:
        raise TenantUsageError(f"--reader: one of {', '.join(readers)}")
    # Check what can be checked before anyone taps a card.
    if args.unit is not None and args.unit not in config.enrollment.units:
        raise TenantUsageError(f"--unit {args.unit!r}: not in this building's units "
                               f"({', '.join(config.enrollment.units)})")
    if args.permit is not None:
        _check_permit(args.permit)
    if args.lease_end is not None:
        _lease_end(args.lease_end)
    started = _ask(sock, {"op": "capture_start", "reader": reader, "account": args.account})
    if not started.get("ok"):
        raise TenantUsageError(f"the agent refused: {started.get('message')}")
    out.write(f"Tap the tenant's card at {reader} now (within "
              f"{started['timeout_s']:g} s)...\n")
    out.flush()
    status = _wait_for_tap(sock, started["capture"], float(started["timeout_s"]))
    out.write(f"card {status['prefix']} captured ({status['card']})\n")
    if status["card"] in ("enrolled", "revoked"):
        out.write("this card cannot be enrolled: "
                  + ("it belongs to an enrolled tenant; move them out first\n"
                     if status["card"] == "enrolled" else "the office revoked it\n"))
        return 2
    unit = args.unit or _prompt(f"Unit ({', '.join(config.enrollment.units[:20])}"
                                f"{', ...' if len(config.enrollment.units) > 20 else ''}): ")
    permit = args.permit or _prompt("Permit number: ")
    _check_permit(permit)
    lease_text = args.lease_end or _prompt("Lease end (YYYY-MM-DD): ")
    _lease_end(lease_text)
    reply = _ask(sock, {"op": "enroll", "capture": started["capture"], "unit": unit,
                        "permit": permit, "lease_end": lease_text, "account": args.account})
    if not reply.get("ok"):
        out.write(f"refused ({reply.get('field')}): {reply.get('message')}\n")
        return 2
    enrollment = reply["enrollment"]
    until = datetime.fromtimestamp(enrollment["provisional_until"], config.zone)
    out.write(f"enrolled {enrollment['id']}: unit {unit}, card {status['prefix']}, pending "
              f"the office; provisional access until {until:%Y-%m-%d %H:%M}\n")
    return 0


def _wait_for_tap(sock: Path, capture: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s + 2
    while time.monotonic() < deadline:
        status = _ask(sock, {"op": "capture_status", "capture": capture})
        if status.get("state") == "captured":
            return status
        if status.get("state") == "expired":
            break
        time.sleep(POLL_S)
    raise TenantUsageError("no card was tapped in time: run 'permitgate enroll' again")


def _check_permit(text: str) -> None:
    try:
        validate_permit(text)
    except PermitError as exc:
        raise TenantUsageError(f"--permit: {exc}") from None


def _lease_end(text: str) -> date:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise TenantUsageError(f"--lease-end {text!r}: not a date (YYYY-MM-DD)") from None
    if day <= date.today():
        raise TenantUsageError(f"--lease-end {text}: must be after today")
    return day


def cmd_unenroll(args: argparse.Namespace, out: TextIO) -> int:
    """Move a tenant, or a unit's tenants, out through the running agent."""
    _config, sock = _socket(args)
    message: dict[str, Any] = {"op": "move_out", "account": args.account}
    message.update({"enrollment": args.enrollment} if args.enrollment else {"unit": args.unit})
    reply = _ask(sock, message)
    if not reply.get("ok"):
        raise TenantUsageError(f"the agent refused: {reply.get('message')}")
    if not reply["ended"]:
        out.write("nobody to move out (no pending or confirmed tenant matches)\n")
        return 2
    for ended in reply["ended"]:
        out.write(f"moved out {ended}: access ended\n")
    return 0


def cmd_tenants(args: argparse.Namespace, out: TextIO) -> int:
    """List enrollments from the store (works with the agent stopped)."""
    from agent import cli  # noqa: PLC0415 - cli imports this module

    config, store = cli._open_store(args)  # noqa: SLF001 - the CLI's one store opener
    try:
        rows = store.tenants.all(unit=args.unit,
                                 state=TenantState(args.state) if args.state else None)
        last = store.last_passages([e.cred for e in rows])
    finally:
        store.close()
    zone = config.zone

    def day(ts: int | None) -> str | None:
        return None if ts is None else datetime.fromtimestamp(ts, zone).date().isoformat()

    items = [{"id": e.id, "unit": e.unit, "card": log_prefix(e.cred), "state": e.state.value,
              "lease_end": day(e.lease_end - 1), "provisional_until": day(e.provisional_until),
              "last_seen": day(last.get(e.cred)), "account": e.account, "reason": e.reason}
             for e in rows]
    if args.json:
        out.write(json.dumps(items, indent=2) + "\n")
        return 0
    if not items:
        out.write("no tenants enrolled here\n")
        return 0
    out.write(f"{'unit':<8} {'card':<10}  {'state':<10} {'lease end':<10}  "
              f"{'last seen':<10}  enrollment\n")
    for i in items:
        out.write(f"{i['unit']:<8} {i['card']:<10}  {i['state']:<10} {i['lease_end']:<10}  "
                  f"{i['last_seen'] or '-':<10}  {i['id']}\n")
    return 0


def cmd_users(args: argparse.Namespace, out: TextIO) -> int:
    """Hand over to ``permitgate-web users``."""
    try:
        web_cli = importlib.import_module("agent.web.cli")  # an optional extra
    except ImportError:
        raise TenantUsageError("the landlord page is not installed (pip install "
                               "'permitgate[web]')") from None
    argv = ["users", *args.rest]
    if getattr(args, "config", None):
        argv = ["-c", args.config, *argv]
    del out
    return int(web_cli.main(argv))
