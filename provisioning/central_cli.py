"""The ``permitgate-central`` command: the central office's tool.

Exit status: 0 success, 1 a runtime failure (database, broker unreachable or not
acknowledging), 2 unusable input (arguments, key files, unknown gateway or card).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from common import logs
from common.timefmt import age
from protocol.hashing import SecretError, log_prefix
from provisioning.central import (
    CHUNK_ENTRIES,
    COMMAND_ACTIONS,
    DEFAULT_CHUNK_RATE,
    DEFAULT_HEARTBEAT_EVERY_S,
    DEFAULT_KID,
    ENROLLMENT_POLICIES,
    MAX_CHUNK_ENTRIES,
    Central,
    CentralError,
    CentralUsageError,
    keygen,
)
from provisioning.db.backend import DATABASE_SETTING, set_database
from provisioning.db.backend import describe as describe_database
from provisioning.reconcile.cases import redact
from provisioning.reconcile.cli import add_commands as add_office_commands
from provisioning.register import add_register_command
from provisioning.remove import add_remove_command
from provisioning.rotation import add_rotate_command
from provisioning.site_rotation import add_site_key_command

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DIR_ENV = "PERMITGATE_CENTRAL_DIR"


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (it may be replaced later, as
    pytest's capture does), for the one-shot commands' warnings."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class UsageError(Exception):
    """A command-line argument is unusable; the message says which."""


# -- arguments -----------------------------------------------------------------------


def parse_when(text: str, option: str, *, end_of_day: bool = False) -> int:
    """An ISO date or date-time as Unix seconds.

    A bare date means the start of that day in the office's local time, or with
    ``end_of_day`` the start of the next day: ``--until 2026-12-31`` keeps the card valid
    through 31 December (``valid_until`` is exclusive).
    """
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: use an ISO date such as 2026-12-31 or a time "
                         "such as 2026-12-31T18:00") from None
    if end_of_day and not any(c in text for c in "T :"):  # a bare date
        when += timedelta(days=1)
    if when.tzinfo is None:
        when = when.astimezone()
    return int(when.timestamp())


def _doors(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [d.strip() for d in text.split(",") if d.strip()]


def _folder(args: argparse.Namespace, *, must_exist: bool = True) -> Path:
    raw = getattr(args, "dir", None) or os.environ.get(DIR_ENV)
    if not raw:
        raise UsageError(f"--dir: no central folder given (or set ${DIR_ENV})")
    folder = Path(raw)
    if must_exist and not folder.is_dir():
        raise UsageError(f"--dir {folder}: no such folder (create it with "
                         f"'permitgate-central --dir {folder} keygen')")
    return folder


def _central(args: argparse.Namespace) -> Central:
    tls_ca = Path(args.tls_ca) if args.tls_ca else None
    port = args.port if args.port is not None else (8883 if tls_ca else 1883)
    return Central(_folder(args), args.host, port, tls_ca=tls_ca,
                   tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                   tls_key=Path(args.tls_key) if args.tls_key else None,
                   client_id=args.client_id, signing_kid=args.signing_kid,
                   share_group=getattr(args, "share", None),
                   chunk_rate=getattr(args, "chunk_rate", DEFAULT_CHUNK_RATE))


# -- commands ------------------------------------------------------------------------


def _keygen_folder(args: argparse.Namespace) -> Path:
    """The folder ``keygen`` writes to: its ``DIR`` argument, else ``--dir`` (before or
    after the command) or ``$PERMITGATE_CENTRAL_DIR``, like every other command."""
    if args.folder is None:
        return _folder(args, must_exist=False)
    dir_option = getattr(args, "dir", None)
    if dir_option and Path(dir_option) != Path(args.folder):
        raise UsageError(f"keygen: two folders given ({args.folder} and --dir "
                         f"{dir_option}); give one")
    return Path(args.folder)


def cmd_keygen(args: argparse.Namespace, out: TextIO) -> int:
    """Create a signing key (and, once, the permit key)."""
    result = keygen(_keygen_folder(args), args.kid)
    if result.signing_key_created:
        out.write(f"wrote signing key {result.kid} to {result.private_key} (mode 0600)\n"
                  f"listed it in {result.trusted_keys}: install that file on every gateway\n")
    if result.permit_key_created:
        out.write(f"wrote the permit key to {result.permit_key} (mode 0600): back it up; "
                  "replacing it changes every permit hash\n")
    if result.seal_key_created:
        out.write(f"wrote the seal key to {result.seal_key} (mode 0600) and its public key "
                  f"to {result.seal_public}: copy {result.seal_public.name} to every gateway "
                  "that enrolls tenants, beside its trusted-keys.txt ([enrollment] "
                  "seal_key); back up the seal key: without it no sealed permit number "
                  "opens\n")
    return EXIT_OK


def cmd_database(args: argparse.Namespace, out: TextIO) -> int:
    """Show the folder's database, or point the folder at a PostgreSQL database."""
    folder = _folder(args)
    if args.url is None:
        out.write(f"{describe_database(folder)}\n")
        return EXIT_OK
    where = set_database(folder, args.url)
    out.write(f"this office now keeps its data in {where} (schema ready; named in "
              f"{folder / DATABASE_SETTING}, mode 0600)\n")
    return EXIT_OK


def cmd_add_gateway(args: argparse.Namespace, out: TextIO) -> int:
    """Register a gateway and its building's site key."""
    with _central(args) as central:
        central.add_gateway(args.gateway, args.site, Path(args.site_key),
                            events_from=args.events_from)
    out.write(f"added gateway {args.gateway} (site {args.site})\n")
    return EXIT_OK


def cmd_enroll(args: argparse.Namespace, out: TextIO) -> int:
    """Store a card's entry (hashes only); ``publish`` sends it."""
    valid_from = parse_when(args.valid_from, "--from") if args.valid_from else None
    valid_until = (parse_when(args.valid_until, "--until", end_of_day=True)
                   if args.valid_until else None)
    with _central(args) as central:
        cred = central.enroll(args.gateway, args.card, args.permit, valid_from=valid_from,
                              valid_until=valid_until, doors=_doors(args.doors),
                              schedule=args.schedule)
    out.write(f"enrolled card {log_prefix(cred)} at {args.gateway}; send it with "
              f"'permitgate-central publish {args.gateway}'\n")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace, out: TextIO) -> int:
    """Delete a card's entry; ``publish`` sends the change."""
    with _central(args) as central:
        cred = central.remove(args.gateway, args.card)
    out.write(f"removed card {log_prefix(cred)} from {args.gateway}; send the change with "
              f"'permitgate-central publish {args.gateway}'\n")
    return EXIT_OK


def cmd_publish(args: argparse.Namespace, out: TextIO) -> int:
    """Send a gateway its whole allowlist as a new version."""
    with _central(args) as central:
        version = central.publish_snapshot(args.gateway, args.chunk_entries)
        entries = len(central.entries(args.gateway))
    out.write(f"published list version {version} to {args.gateway} ({entries} entries)\n")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace, out: TextIO) -> int:
    """Revoke permits (at one gateway or everywhere) or cards (at one gateway)."""
    permits, cards = args.permit or [], args.card or []
    if not permits and not cards:
        raise UsageError("revoke: give --permit NO or --card ID")
    if cards and not args.gateway:
        raise UsageError("--card: needs --gateway GW (a card hash depends on the building)")
    if args.all and cards:
        raise UsageError("--all: only permits can be revoked everywhere")
    if args.all == bool(args.gateway):
        raise UsageError("revoke: give exactly one of --all or --gateway GW")
    with _central(args) as central:
        if args.all:
            for number in permits:
                seq = central.revoke_permit(number)
                out.write(f"revoked a permit at every gateway (broadcast seq {seq})\n")
            return EXIT_OK
        for number in permits:
            seq = central.revoke_permit(number, args.gateway)
            out.write(f"revoked a permit at {args.gateway} (rev seq {seq})\n")
        for card in cards:
            seq = central.revoke_card(args.gateway, card)
            out.write(f"revoked a card at {args.gateway} (rev seq {seq})\n")
    return EXIT_OK


def cmd_command(args: argparse.Namespace, out: TextIO) -> int:
    """Send an operational command."""
    with _central(args) as central:
        seq = central.command(args.gateway, args.action)
    out.write(f"sent {args.action} to {args.gateway} (cmd seq {seq})\n")
    return EXIT_OK


def cmd_heartbeat(args: argparse.Namespace, out: TextIO) -> int:
    """Send heartbeats to one gateway or all."""
    if bool(args.gateway) == args.all:
        raise UsageError("heartbeat: give a gateway or --all")
    with _central(args) as central:
        sent = (central.heartbeat_all() if args.all
                else {args.gateway: central.heartbeat(args.gateway)})
    for gateway, seq in sent.items():
        out.write(f"heartbeat to {gateway} (hb seq {seq})\n")
    if not sent:
        out.write("no gateways\n")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    """Receive events and reports, acknowledge, answer resyncs, send heartbeats."""
    logs.configure(args.log_level, args.log_format, out)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with _central(args) as central:
            central.run(stop, heartbeat_every_s=args.heartbeat_every or None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


def local_time(ms: int, timespec: str = "seconds") -> str:
    """Unix milliseconds as this machine's local time with its offset (the zone the
    office's dates, such as ``enroll --until``, are read in)."""
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone().isoformat(
        sep=" ", timespec=timespec)


def cmd_enrollments(args: argparse.Namespace, out: TextIO) -> int:
    """Enrollments made at gateways (``--status held``: those waiting for an officer)."""
    with _central(args) as central:
        found = central.enrollments(args.gateway, args.status, reveal=args.reveal)
    for e in found:
        if args.json:
            out.write(json.dumps(e, sort_keys=True) + "\n")
            continue
        reason = f" ({e['reason']})" if e["reason"] else ""
        lease = ("?" if e["lease_end"] is None else
                 datetime.fromtimestamp(e["lease_end"], UTC).date().isoformat())
        permit = f"  permit {e['permit']}" if e["permit"] else ""
        elsewhere = f"  also listed at {','.join(e['elsewhere'])}" if e["elsewhere"] else ""
        out.write(f"{e['gateway']}  {e['enrollment']}  unit {e['unit']}  card {e['cred']}  "
                  f"{e['status']}{reason}  lease end {lease}{permit}{elsewhere}\n")
    if not found and not args.json:
        out.write("no enrollments\n")
    return EXIT_OK


def cmd_confirm(args: argparse.Namespace, out: TextIO) -> int:
    """Confirm an enrollment: the card into the gateway's list, then the decision."""
    with _central(args) as central:
        sent = central.confirm_enrollment(args.gateway, args.enrollment)
    listed = f"list version {sent['list']}, " if "list" in sent else ""
    out.write(f"confirmed enrollment {args.enrollment} at {args.gateway} ({listed}"
              f"decision enr seq {sent['enr']})\n")
    return EXIT_OK


def cmd_reject(args: argparse.Namespace, out: TextIO) -> int:
    """Reject an enrollment (a confirmed one's card leaves the list), then the decision."""
    with _central(args) as central:
        sent = central.reject_enrollment(args.gateway, args.enrollment, args.reason)
    listed = f"list version {sent['list']}, " if "list" in sent else ""
    out.write(f"rejected enrollment {args.enrollment} at {args.gateway} ({args.reason}; "
              f"{listed}decision enr seq {sent['enr']})\n")
    return EXIT_OK


def cmd_policy(args: argparse.Namespace, out: TextIO) -> int:
    """Show or set the office's policy for enrollments made at gateways."""
    with _central(args) as central:
        before = central.enrollment_policy()
        if args.value is not None:
            central.set_enrollment_policy(args.value)
    if args.value is None or args.value == before:
        out.write(f"enrollments: {before}\n")
    else:
        out.write(f"enrollments: {args.value} (was {before}); held enrollments stay held\n")
    return EXIT_OK


def _ago(ms: int | None) -> str:
    if ms is None:
        return "never"
    return f"{local_time(ms)} ({age(time.time() - ms / 1000)})"


def _removed_on(removed: dict[str, str]) -> str:
    """When ``remove-gateway`` removed a gateway (its record's ``at``), in local time."""
    at = str(removed.get("at") or "?")
    try:
        return local_time(int(datetime.fromisoformat(at).timestamp() * 1000))
    except ValueError:
        return at


def _print_gateway(gw: dict[str, Any], out: TextIO) -> None:
    online = {None: "no status yet", True: "online", False: "OFFLINE"}[gw["online"]]
    state = f"{online} (status {_ago(gw['status_ms'])})"
    if gw["removed"] is not None:  # neither online nor offline: its messages are refused
        state = (f"removed {_removed_on(gw['removed'])} ({gw['removed'].get('reason')}), "
                 f"last status {_ago(gw['status_ms'])}")
    lst = gw["list"]
    applied = "nothing reported" if lst["applied"] is None else f"v{lst['applied']}"
    current = "current" if lst["current"] else "NOT current"
    ev = gw["events"]
    out.write(f"{gw['gateway']}  site {gw['site']}  {state}"
              f"  version {gw['version'] or 'not reported'}\n"
              f"  list      published v{lst['published']} {_ago(lst['published_ms'])}, "
              f"applied {applied} ({current})\n"
              f"  streams   rev {gw['streams']['rev']}, cmd {gw['streams']['cmd']}, "
              f"heartbeat {gw['streams']['hb']}, ack {gw['streams']['ack']}\n"
              f"  entries   {gw['entries']} enrolled, {gw['revocations']} revoked here\n"
              f"  events    {ev['stored']} stored, highest seq {ev['highest_seq']}, "
              f"acked up to {ev['acked_upto']}\n")
    for stream, rep in gw["applied"].items():
        reason = f" ({rep['reason']})" if rep["reason"] else ""
        out.write(f"  {stream:<9} seq {rep['seq']} {rep['status']}{reason}, "
                  f"{_ago(rep['received_ms'])}\n")
    problems = gw["chain_problems"]
    out.write(f"  chain     {'OK' if not problems else f'{len(problems)} PROBLEM(S)'}\n")
    for problem in problems[:20]:
        out.write(f"            seq {problem['seq']}: {problem['problem']}\n")
    if gw["resync"]["requested_ms"] is not None:
        out.write(f"  resync    requested {_ago(gw['resync']['requested_ms'])} "
                  f"({gw['resync']['reason']}), answered {_ago(gw['resync']['answered_ms'])}\n")
    if gw["malformed"]:
        out.write(f"  malformed {gw['malformed']} message(s)\n")


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    """Per gateway: versions published and applied, streams, events, chain, status."""
    with _central(args) as central:
        report = central.report()
    if args.json:
        out.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return EXIT_OK
    out.write(f"broadcast revocations: seq {report['all_seq']}, "
              f"{report['global_revocations']} permit(s)\n")
    if report["unknown_gateway_messages"]:
        out.write(f"messages from unknown gateways: {report['unknown_gateway_messages']}\n")
    for group in report["by_version"]:
        out.write(f"version {group['version'] or 'not reported'}: "
                  f"{', '.join(group['gateways'])}\n")
    if report["removed"]:
        out.write(f"removed (messages refused): {', '.join(report['removed'])}\n")
    if not report["gateways"]:
        out.write("no gateways (add one with 'permitgate-central add-gateway')\n")
    for gw in report["gateways"]:
        _print_gateway(gw, out)
    return EXIT_OK


def cmd_events(args: argparse.Namespace, out: TextIO) -> int:
    """The newest events stored for a gateway; card prefixes and the fields that point at
    a person only with ``--case REASON``, which is recorded (docs/privacy.md)."""
    with _central(args) as central:
        events = central.events(args.gateway, limit=args.n)
        if args.case is not None:
            central.cases.gateway_events(args.gateway, events, reason=args.case,
                                         officer=args.officer)
    if args.case is None:
        events = [redact(ev) for ev in events]
    if args.json:
        for ev in events:
            out.write(json.dumps(ev, sort_keys=True) + "\n")
        return EXIT_OK
    if not events:
        out.write(f"no events received from {args.gateway} yet\n")
        return EXIT_OK
    cred = ["CRED"] if args.case is not None else []
    rows = [["SEQ", "TIME", "KIND", "DOOR/READER", "DIR", "REASON", *cred]]
    rows += [[str(ev["seq"]), local_time(ev["ts_ms"], "milliseconds"), ev["kind"],
              "/".join(x for x in (ev["door"], ev["reader"]) if x), ev["direction"] or "",
              ev["reason"] or "", *([ev["cred"] or ""] if cred else [])] for ev in events]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.rjust(w) if i == 0 else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        out.write("  ".join(cells).rstrip() + "\n")
    if args.case is None:
        out.write("(cards and tenants hidden: add --case REASON to show them; it is "
                  "recorded)\n")
    return EXIT_OK


# -- parser --------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (off) or more")
    return value


RATE_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def _rate(text: str) -> int:
    """Bytes per second: a whole number, optionally with k, M or G (powers of 1,000)."""
    unit = text[-1:].lower() if text[-1:].isalpha() else ""
    try:
        value = int(float(text[:len(text) - len(unit)]) * RATE_UNITS[unit])
    except (KeyError, ValueError, OverflowError):  # nan, inf too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes per second "
                                         "(such as 4000000 or 4M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (snapshots unpaced) or more "
                                         "bytes per second")
    return value


def _pacing() -> argparse.ArgumentParser:
    """A parent parser with ``--chunk-rate``, for the commands that publish snapshots
    (``publish`` uses it when no ``serve`` runs, else ``serve``'s own setting applies)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--chunk-rate", type=_rate, default=DEFAULT_CHUNK_RATE,
                        metavar="BYTES_PER_S", help="send each gateway a snapshot's chunks "
                        f"at most this fast (default {DEFAULT_CHUNK_RATE:,}, what a "
                        "Pi-class gateway applies; k, M allowed; 0: unpaced)")
    return parser


def _add_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The folder and broker options, accepted before or after the subcommand."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--dir", default=default(None), help="the central folder "
                        f"(default: ${DIR_ENV})")
    parser.add_argument("--host", default=default("localhost"), help="MQTT broker host")
    parser.add_argument("--port", type=_positive, default=default(None),
                        help="MQTT broker port (default 1883, or 8883 with --tls-ca)")
    parser.add_argument("--tls-ca", default=default(None), help="CA certificate (PEM)")
    parser.add_argument("--tls-cert", default=default(None), help="client certificate")
    parser.add_argument("--tls-key", default=default(None), help="client private key")
    parser.add_argument("--client-id", default=default("permitgate-central"),
                        help="MQTT client id (and persistent session) of the office")
    parser.add_argument("--signing-kid", default=default(None), metavar="KID",
                        help="sign with this key (default: the first listed in "
                        "trusted-keys.txt whose private key is in DIR/signing)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``permitgate-central``."""
    common = argparse.ArgumentParser(add_help=False)
    _add_options(common, suppress=True)
    parser = argparse.ArgumentParser(prog="permitgate-central", description=(
        "The central office of permitgate: keys, gateways, enrollment, signed lists and "
        "commands out; events and reports in."))
    _add_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="create a signing key and the permit key")
    p.add_argument("folder", metavar="DIR", nargs="?",
                   help="the central folder, created if missing (default: --dir)")
    p.add_argument("--dir", default=argparse.SUPPRESS, help="the central folder "
                   f"(default: ${DIR_ENV})")
    p.add_argument("--kid", default=DEFAULT_KID, help=f"key id (default {DEFAULT_KID})")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("database", parents=[common], help="show or set the office's "
                       "database (central.db, or PostgreSQL for a city)")
    p.add_argument("url", metavar="URL", nargs="?",
                   help="postgresql://user@host:port/dbname: make its schema and use it "
                   f"from now on (written to DIR/{DATABASE_SETTING})")
    p.set_defaults(func=cmd_database)

    p = sub.add_parser("add-gateway", parents=[common], help="register a gateway")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("--site", required=True)
    p.add_argument("--site-key", required=True, metavar="FILE",
                   help="the building's site key file (32 bytes or 64 hex characters)")
    p.add_argument("--events-from", type=_positive, default=1, metavar="SEQ",
                   help="first event seq expected (default 1)")
    p.set_defaults(func=cmd_add_gateway)

    add_register_command(sub, common, _central)
    add_remove_command(sub, common, _central)
    add_rotate_command(sub, common, _central)
    add_site_key_command(sub, common, _central)

    p = sub.add_parser("enroll", parents=[common], help="store a card's entry")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("--card", required=True, metavar="ID", help="e.g. em4100:67003B51C6")
    p.add_argument("--permit", required=True, metavar="NO")
    p.add_argument("--from", dest="valid_from", metavar="DATE")
    p.add_argument("--until", dest="valid_until", metavar="DATE",
                   help="last valid day (a date) or the exclusive end (a time)")
    p.add_argument("--doors", metavar="A,B", help="door ids (default every door)")
    p.add_argument("--schedule", metavar="NAME", help="default always")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("remove", parents=[common], help="delete a card's entry")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("--card", required=True, metavar="ID")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("publish", parents=[common, _pacing()],
                       help="send a gateway its whole list")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("--chunk-entries", type=_positive, default=CHUNK_ENTRIES,
                   metavar="N", help=f"entries per chunk (default {CHUNK_ENTRIES:,}, at "
                   f"most {MAX_CHUNK_ENTRIES:,})")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("revoke", parents=[common], help="revoke permits or cards")
    p.add_argument("--permit", action="append", metavar="NO")
    p.add_argument("--card", action="append", metavar="ID")
    p.add_argument("--all", action="store_true", help="every gateway (permits only)")
    p.add_argument("--gateway", metavar="GW")
    p.set_defaults(func=cmd_revoke)

    _add_operation_commands(sub, common)
    _add_enrollment_commands(sub, common)
    add_office_commands(sub, common, _central)  # reconcile, retention, case
    return parser


def _add_enrollment_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """enrollments, confirm, reject, policy (enrollments made at gateways)."""
    p = sub.add_parser("enrollments", parents=[common],
                       help="enrollments made at gateways")
    p.add_argument("gateway", metavar="GW", nargs="?", help="one gateway (default all)")
    p.add_argument("--status", choices=("received", "held", "confirmed", "rejected", "ended"))
    p.add_argument("--reveal", action="store_true",
                   help="show permit numbers (for the registry comparison)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_enrollments)

    p = sub.add_parser("confirm", parents=[common], help="confirm an enrollment")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("enrollment", metavar="ENROLLMENT_ID")
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser("reject", parents=[common], help="reject an enrollment")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("enrollment", metavar="ENROLLMENT_ID")
    p.add_argument("--reason", default="officer",
                   help="a word the gateway records (default officer)")
    p.set_defaults(func=cmd_reject)

    p = sub.add_parser("policy", parents=[common], help="show or set the office's policy")
    p.add_argument("setting", choices=("enrollments",))
    p.add_argument("value", nargs="?", choices=ENROLLMENT_POLICIES,
                   help="auto: confirm what checks out; hold: wait for an officer")
    p.set_defaults(func=cmd_policy)


def _add_operation_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """command, heartbeat, serve, show, events."""
    p = sub.add_parser("command", parents=[common], help="send an operational command")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("action", choices=COMMAND_ACTIONS)
    p.set_defaults(func=cmd_command)

    p = sub.add_parser("heartbeat", parents=[common], help="send heartbeats")
    p.add_argument("gateway", metavar="GW", nargs="?")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_heartbeat)

    p = sub.add_parser("serve", parents=[common, _pacing()], help="receive, acknowledge, "
                       "answer, send heartbeats until SIGTERM/SIGINT")
    p.add_argument("--share", metavar="GROUP", help="share the gateways' traffic with the "
                   "other serves of this PostgreSQL database in MQTT 5 share group GROUP "
                   "(each with its own --client-id)")
    p.add_argument("--heartbeat-every", type=_seconds, default=DEFAULT_HEARTBEAT_EVERY_S,
                   metavar="SECONDS", help=f"default {DEFAULT_HEARTBEAT_EVERY_S:g}; 0: never")
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("show", parents=[common], help="the state of every gateway")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("events", parents=[common], help="events stored for a gateway")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("-n", type=_positive, default=20, help="the newest N (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--case", metavar="REASON", help="show card prefixes and tenant fields, "
                   "for a case: the reason is recorded (permitgate-central case --log)")
    p.add_argument("--officer", metavar="NAME", help="with --case: who asks (default: your "
                   "user name)")
    p.set_defaults(func=cmd_events)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the ``permitgate-central`` console script."""
    stdout = out or sys.stdout
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # One-shot commands keep stdout for their answer (and --json); warnings to stderr.
        logs.configure("warning", "console", _Stderr())
    try:
        return int(args.func(args, stdout))
    except (UsageError, CentralUsageError, SecretError) as exc:
        sys.stderr.write(f"permitgate-central: {exc}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except (CentralError, OSError) as exc:
        sys.stderr.write(f"permitgate-central: {exc}\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
