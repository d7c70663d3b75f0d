"""The ``permitgate-central`` command: the central office's tool.

Exit status: 0 success, 1 a runtime failure (database, broker unreachable or not
acknowledging), 2 unusable input (arguments, key files, unknown gateway or card).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from common import logs
from protocol.hashing import SecretError, log_prefix
from provisioning.central import (
    CHUNK_ENTRIES,
    COMMAND_ACTIONS,
    DEFAULT_CHUNK_RATE,
    DEFAULT_HEARTBEAT_EVERY_S,
    DEFAULT_KID,
    MAX_CHUNK_ENTRIES,
    Central,
    CentralError,
    CentralUsageError,
    keygen,
)
from provisioning.cli_args import pacing, positive, seconds
from provisioning.cli_enrollments import add_enrollment_commands
from provisioning.cli_reports import add_report_commands, local_time
from provisioning.db.backend import DATABASE_SETTING, set_database
from provisioning.db.backend import describe as describe_database
from provisioning.reconcile.cli import add_commands as add_office_commands
from provisioning.register import add_register_command
from provisioning.remove import add_remove_command
from provisioning.rotation import add_rotate_command
from provisioning.site_rotation import add_site_key_command

__all__ = ["DIR_ENV", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser",
           "local_time", "main", "parse_when"]

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



# -- parser --------------------------------------------------------------------------


def _add_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The folder and broker options, accepted before or after the subcommand."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--dir", default=default(None), help="the central folder "
                        f"(default: ${DIR_ENV})")
    parser.add_argument("--host", default=default("localhost"), help="MQTT broker host")
    parser.add_argument("--port", type=positive, default=default(None),
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
    p.add_argument("--events-from", type=positive, default=1, metavar="SEQ",
                   help="first event seq expected (default 1)")
    p.set_defaults(func=cmd_add_gateway)

    add_register_command(sub, common, _central)
    add_remove_command(sub, common, _central)
    add_rotate_command(sub, common, _central)
    add_site_key_command(sub, common, _central)

    _add_card_commands(sub, common)
    _add_operation_commands(sub, common)
    add_report_commands(sub, common, _central)  # show, events
    add_enrollment_commands(sub, common, _central)  # enrollments, confirm, reject, policy
    add_office_commands(sub, common, _central)  # reconcile, retention, case
    return parser


def _add_card_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """enroll, remove, publish, revoke."""
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

    p = sub.add_parser("publish", parents=[common, pacing()],
                       help="send a gateway its whole list")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("--chunk-entries", type=positive, default=CHUNK_ENTRIES,
                   metavar="N", help=f"entries per chunk (default {CHUNK_ENTRIES:,}, at "
                   f"most {MAX_CHUNK_ENTRIES:,})")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("revoke", parents=[common], help="revoke permits or cards")
    p.add_argument("--permit", action="append", metavar="NO")
    p.add_argument("--card", action="append", metavar="ID")
    p.add_argument("--all", action="store_true", help="every gateway (permits only)")
    p.add_argument("--gateway", metavar="GW")
    p.set_defaults(func=cmd_revoke)


def _add_operation_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """command, heartbeat, serve."""
    p = sub.add_parser("command", parents=[common], help="send an operational command")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("action", choices=COMMAND_ACTIONS)
    p.set_defaults(func=cmd_command)

    p = sub.add_parser("heartbeat", parents=[common], help="send heartbeats")
    p.add_argument("gateway", metavar="GW", nargs="?")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_heartbeat)

    p = sub.add_parser("serve", parents=[common, pacing()], help="receive, acknowledge, "
                       "answer, send heartbeats until SIGTERM/SIGINT")
    p.add_argument("--share", metavar="GROUP", help="share the gateways' traffic with the "
                   "other serves of this PostgreSQL database in MQTT 5 share group GROUP "
                   "(each with its own --client-id)")
    p.add_argument("--heartbeat-every", type=seconds, default=DEFAULT_HEARTBEAT_EVERY_S,
                   metavar="SECONDS", help=f"default {DEFAULT_HEARTBEAT_EVERY_S:g}; 0: never")
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info")
    p.set_defaults(func=cmd_serve)


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
