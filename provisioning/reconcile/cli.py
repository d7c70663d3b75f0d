"""``permitgate-central reconcile``, ``retention`` and ``case`` (registered by
provisioning/central_cli.py, which passes in how it opens a ``Central``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

from common.argtypes import positive
from protocol.messages import Revoked
from protocol.signing import b64
from provisioning.central import Central
from provisioning.errors import CentralUsageError
from provisioning.reconcile.cases import DEFAULT_LIMIT, dumps
from provisioning.reconcile.charts import write_html
from provisioning.reconcile.findings import (
    DEFAULT_NO_ENTRY_DAYS,
    DEFAULT_SILENT_HOURS,
    DEFAULT_STALE_MINUTES,
    Comparison,
    Thresholds,
)
from provisioning.reconcile.outputs import (
    DEFAULT_SHOWN,
    as_of_text,
    print_summary,
    write_csv,
    write_json,
)
from provisioning.reconcile.registry import RegistryFile, load_mapping
from provisioning.retention import check_days

OpenCentral = Callable[[argparse.Namespace], Central]
EXIT_OK = 0
MAX_REVOKE_ITEMS = 40_000
"""Items per revocation message (docs/protocol.md, "Sizes and limits")."""
DEFAULT_WINDOW_DAYS = 60


def _instant(text: str, option: str) -> float:
    """An ISO date or date-time (the office's zone when it names none) as Unix s."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CentralUsageError(f"{option} {text!r}: use an ISO date such as 2026-12-31 or "
                                "a time such as 2026-12-31T18:00") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


# -- reconcile -------------------------------------------------------------------------


def cmd_reconcile(args: argparse.Namespace, out: TextIO) -> int:
    """Compare the office's records with a registry export; write the outputs asked for;
    with ``--revoke``, revoke what is inactive in the registry but still opens."""
    mapping = load_mapping(Path(args.mapping)) if args.mapping else None
    as_of = _instant(args.as_of, "--as-of") if args.as_of else None
    thresholds = Thresholds(args.no_entry_days, args.silent_hours, args.stale_minutes)
    with args.open_central(args) as central:
        today = date.fromtimestamp(as_of) if as_of is not None else None
        registry = RegistryFile(Path(args.registry), encoding=args.encoding,
                                mapping=mapping, today=today)
        with central.reconciler.compare(registry, thresholds, as_of=as_of) as comparison:
            buildings = comparison.buildings(args.window_days)
            written = []
            for option, write in (("json", write_json), ("html", write_html)):
                if getattr(args, option):
                    write(comparison, Path(getattr(args, option)), buildings,
                          args.window_days)
                    written.append(Path(getattr(args, option)))
            if args.csv:
                write_csv(comparison, Path(args.csv))
                written.append(Path(args.csv))
            print_summary(comparison, out, buildings, shown=args.show, written=written)
            targets = None if args.revoke is None else _revocations(comparison, args.revoke)
        if targets:
            _revoke(central, targets, out)
        elif targets is not None:
            out.write("nothing to revoke: no registration is inactive while its card "
                      "opens\n")
    return EXIT_OK


def _revocations(comparison: Comparison, chosen: list[str]) -> dict[str, list[bytes]]:
    """Permit hashes to revoke per gateway: the ``registry_inactive_but_open`` findings
    (those named, if any are); an id that names none of them refuses everything."""
    found: dict[str, tuple[str, bytes]] = {}
    for f in comparison.findings():
        if f.kind == "registry_inactive_but_open" and f.gateway and f.permit_hash:
            found[f.id] = (f.gateway, f.permit_hash)
    unknown = [i for i in chosen if i not in found]
    if unknown:
        raise CentralUsageError(f"--revoke {' '.join(unknown)}: not a "
                                "registry_inactive_but_open finding of this comparison; "
                                "nothing was revoked")
    targets: dict[str, list[bytes]] = {}
    for finding_id, (gateway, digest) in sorted(found.items(), key=lambda i: i[1]):
        if not chosen or finding_id in chosen:
            targets.setdefault(gateway, [])
            if digest not in targets[gateway]:
                targets[gateway].append(digest)
    return targets


def _revoke(central: Central, targets: dict[str, list[bytes]], out: TextIO) -> None:
    for gateway, digests in sorted(targets.items()):
        for start in range(0, len(digests), MAX_REVOKE_ITEMS):
            part = digests[start:start + MAX_REVOKE_ITEMS]
            seq = central.revoke(gateway, [Revoked(kind="permit", hash=b64(d)) for d in part])
            out.write(f"revoked {len(part)} permit(s) at {gateway} (rev seq {seq})\n")


# -- retention -------------------------------------------------------------------------


def cmd_retention(args: argparse.Namespace, out: TextIO) -> int:
    """Show the retention setting, change it, or fold and delete old events now."""
    if args.auto and args.days is None:
        raise CentralUsageError("--auto: give --days N as well")
    if args.off and (args.days is not None or args.auto):
        raise CentralUsageError("--off: give it alone")
    with args.open_central(args) as central:
        retention = central.retention
        report: dict[str, Any] = {}
        if args.off:
            retention.set_setting(None)
        if args.days is not None:
            result = retention.run(check_days(args.days))
            if args.auto:
                retention.set_setting(args.days)
            report["run"] = {"days": result.days, "before_ms": result.before_ms,
                             "folded": result.folded, "deleted": result.deleted,
                             "erased": result.erased}
        report["setting_days"] = retention.setting()
        report["last_serve_run_ms"] = retention.last_run_ms()
    if args.json:
        out.write(json.dumps(report, sort_keys=True) + "\n")
        return EXIT_OK
    if "run" in report:
        run = report["run"]
        out.write(f"events before {as_of_text(run['before_ms'])}: {run['folded']} folded "
                  f"into daily counts, {run['deleted']} deleted; permit numbers dropped from "
                  f"{run['erased']} ended enrollment(s)\n")
    setting = report["setting_days"]
    last = report["last_serve_run_ms"]
    out.write("serve applies no retention (set one with --days N --auto)\n" if setting is None
              else f"serve keeps events {setting} days, applied hourly (last "
                   f"{'never' if last is None else as_of_text(last)})\n")
    return EXIT_OK


# -- case ------------------------------------------------------------------------------


def cmd_case(args: argparse.Namespace, out: TextIO) -> int:
    """One person's access events, for a case: refused without a reason, recorded with
    it; ``--log`` lists the records."""
    if args.log:
        with args.open_central(args) as central:
            records = central.cases.log(args.n)
        for r in records:
            out.write(dumps(r) + "\n" if args.json else
                      f"#{r['id']}  {as_of_text(r['at_ms'])}  {r['officer']}  {r['scope']}"
                      f"{'  permit ' + r['permit_ref'] if r['permit_ref'] else ''}  "
                      f"{r['shown']} event(s)  {r['reason']}\n")
        if not records and not args.json:
            out.write("no case queries recorded\n")
        return EXIT_OK
    if not args.permit:
        raise CentralUsageError("case: give --permit NUMBER --reason TEXT (or --log)")
    since = int(_instant(args.since, "--since") * 1000) if args.since else 0
    with args.open_central(args) as central:
        result = central.cases.permit_events(args.permit, reason=args.reason,
                                             officer=args.officer, since_ms=since,
                                             limit=args.n)
    if args.json:
        out.write(dumps({"audit_id": result.audit_id, "permit": result.permit,
                         "cards": result.cards, "events": result.events}) + "\n")
        return EXIT_OK
    out.write(f"recorded as case query #{result.audit_id}\n")
    cards = "; ".join(f"{c['gateway']} ({c['building']}) card {c['card']}"
                      for c in result.cards) or "none"
    out.write(f"permit {result.permit}: {cards}\n")
    for e in result.events:
        when = datetime.fromtimestamp(e["ts_ms"] / 1000, UTC).astimezone().isoformat(
            sep=" ", timespec="seconds")
        place = "/".join(x for x in (e["door"], e["reader"]) if x)
        out.write(f"{when}  {e['gateway']}  {e['card']}  {e['kind']}  {place}  "
                  f"{e['direction'] or ''}  {e['reason'] or ''}\n")
    if not result.events:
        out.write("no access events stored for these cards\n")
    return EXIT_OK


# -- the parser ------------------------------------------------------------------------


def add_commands(sub: Any, common: argparse.ArgumentParser, open_central: OpenCentral
                 ) -> None:
    """Register ``reconcile``, ``retention`` and ``case``."""
    p = sub.add_parser("reconcile", parents=[common],
                       help="compare with the police registry (docs/registry.md)")
    p.add_argument("--registry", required=True, metavar="FILE",
                   help="the registry export: .csv (UTF-8, UTF-8 with BOM, GBK/GB 18030) "
                   "or .xlsx")
    p.add_argument("--encoding", metavar="ENC", help="the CSV's encoding (default: detected)")
    p.add_argument("--mapping", metavar="FILE", help="a TOML file naming other columns")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--csv", metavar="OUT", help="write the findings as CSV")
    p.add_argument("--html", metavar="OUT", help="write a self-contained page with charts")
    p.add_argument("--no-entry-days", type=positive, default=DEFAULT_NO_ENTRY_DAYS,
                   metavar="N", help=f"no_entry_since after N days (default "
                   f"{DEFAULT_NO_ENTRY_DAYS})")
    p.add_argument("--silent-hours", type=_number, default=DEFAULT_SILENT_HOURS,
                   metavar="H", help=f"gateway_silent after H hours (default "
                   f"{DEFAULT_SILENT_HOURS:g})")
    p.add_argument("--stale-minutes", type=_number, default=DEFAULT_STALE_MINUTES,
                   metavar="M", help="list_stale when a version sent M minutes ago is not "
                   f"applied (default {DEFAULT_STALE_MINUTES:g})")
    p.add_argument("--as-of", metavar="WHEN", help="compare as of this date or time "
                   "(default now)")
    p.add_argument("--window-days", type=positive, default=DEFAULT_WINDOW_DAYS, metavar="N",
                   help=f"days of entry counts in the outputs (default {DEFAULT_WINDOW_DAYS})")
    p.add_argument("--show", type=positive, default=DEFAULT_SHOWN, metavar="N",
                   help=f"findings listed here (default {DEFAULT_SHOWN})")
    p.add_argument("--revoke", nargs="*", metavar="ID",
                   help="after review: revoke every registry_inactive_but_open permit at "
                   "its gateway (or only the findings named)")
    p.set_defaults(func=cmd_reconcile, open_central=open_central)

    p = sub.add_parser("retention", parents=[common],
                       help="fold old events into daily counts and delete them")
    p.add_argument("--days", type=positive, metavar="N", help="do it now for events older "
                   "than N days")
    p.add_argument("--auto", action="store_true", help="also keep N as the setting serve "
                   "applies every hour")
    p.add_argument("--off", action="store_true", help="serve stops applying a setting")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retention, open_central=open_central)

    p = sub.add_parser("case", parents=[common],
                       help="one person's access events, for a case (recorded)")
    p.add_argument("--permit", metavar="NO")
    p.add_argument("--reason", metavar="TEXT", help="why (required; recorded)")
    p.add_argument("--officer", metavar="NAME", help="who asks (default: your user name)")
    p.add_argument("--since", metavar="WHEN", help="events from this date or time on")
    p.add_argument("-n", type=positive, default=DEFAULT_LIMIT,
                   help=f"the newest N per card, or records with --log (default {DEFAULT_LIMIT})")
    p.add_argument("--log", action="store_true", help="list the recorded case queries")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_case, open_central=open_central)
