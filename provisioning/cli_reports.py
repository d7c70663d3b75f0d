"""``permitgate-central show`` and ``events``: the office's reports printed (built by
provisioning/reports.py; registered by provisioning/central_cli.py, which passes in how it
opens a ``Central``). Times are in the office machine's local zone (``local_time``)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from common.timefmt import age
from provisioning.central import Central
from provisioning.cli_args import positive
from provisioning.reconcile.cases import redact

OpenCentral = Callable[[argparse.Namespace], Central]
EXIT_OK = 0


def add_report_commands(sub: Any, common: argparse.ArgumentParser,
                        central: OpenCentral) -> None:
    """Register ``show`` and ``events`` on ``permitgate-central``'s subparsers."""
    p = sub.add_parser("show", parents=[common], help="the state of every gateway")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda args, out: cmd_show(args, out, central))

    p = sub.add_parser("events", parents=[common], help="events stored for a gateway")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("-n", type=positive, default=20, help="the newest N (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--case", metavar="REASON", help="show card prefixes and tenant fields, "
                   "for a case: the reason is recorded (permitgate-central case --log)")
    p.add_argument("--officer", metavar="NAME", help="with --case: who asks (default: your "
                   "user name)")
    p.set_defaults(func=lambda args, out: cmd_events(args, out, central))


def local_time(ms: int, timespec: str = "seconds") -> str:
    """Unix milliseconds as this machine's local time with its offset (the zone the
    office's dates, such as ``enroll --until``, are read in)."""
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone().isoformat(
        sep=" ", timespec=timespec)


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


def cmd_show(args: argparse.Namespace, out: TextIO, central: OpenCentral) -> int:
    """Per gateway: versions published and applied, streams, events, chain, status."""
    with central(args) as office:
        report = office.report()
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


def cmd_events(args: argparse.Namespace, out: TextIO, central: OpenCentral) -> int:
    """The newest events stored for a gateway; card prefixes and the fields that point at
    a person only with ``--case REASON``, which is recorded (docs/privacy.md)."""
    with central(args) as office:
        events = office.events(args.gateway, limit=args.n)
        if args.case is not None:
            office.cases.gateway_events(args.gateway, events, reason=args.case,
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
