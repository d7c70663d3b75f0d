"""``permitgate events``: tail, filter and verify the event log.

``events tail`` shows the newest events (``-f`` follows new ones), ``events filter`` the
ones matching ``--kind``, ``--door``, ``--reason`` and ``--since``, in columns with times in
the site's time zone or as JSON lines; ``events verify`` checks the hash chain. A
``--kind`` or ``--door`` nothing known matches is a usage error naming the known ones.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import time
from collections.abc import Sequence
from datetime import datetime, tzinfo
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from agent.cli_common import EXIT_FAILURE, EXIT_OK, UsageError, existing_store, load
from agent.config import Config
from agent.store import Store, StoredEvent
from common.argtypes import positive

KNOWN_EVENT_KINDS = (
    "access_granted", "access_denied",
    "door_locked", "door_unlocked", "door_opened", "door_closed", "door_forced",
    "door_held_open", "rex_pressed",
    "relay_fault", "contact_fault", "rex_fault",
    "relay_restored", "contact_restored", "rex_restored",
    "reader_online", "reader_offline", "reader_tamper", "reader_power",
    "agent_started", "agent_stopped", "clock_checked", "clock_changed", "prune_held",
    "disk_full", "disk_space_restored", "events_dropped",
    "mode_changed",
    "snapshot_applied", "delta_applied", "revocations_applied", "keys_announced",
    "sync_refused", "sync_stale", "sync_fresh", "event_store_high_water",
    "card_captured", "tenant_enrolled", "tenant_confirmed", "tenant_rejected",
    "tenant_moved_out", "tenant_lease_ended",
    "web_sign_in", "web_sign_in_failed", "web_signed_out", "web_account_created",
    "web_account_changed", "web_account_deleted",
)
"""Every event kind the agent writes (docs/events.md, "Event kinds"; a test keeps the two
in step). ``events --kind`` accepts these and any kind already stored."""


def add_events_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``events`` on ``permitgate``'s subparsers."""
    events = sub.add_parser("events", parents=[common], help="read and verify the event log")
    ev_sub = events.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, helptext in (("tail", "the newest events"), ("filter", "events matching "
                                                                      "filters")):
        p = ev_sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("-n", type=positive, default=20 if name == "tail" else None,
                       help="at most N events")
        p.add_argument("--kind", help="e.g. access_denied, door_forced")
        p.add_argument("--door")
        p.add_argument("--reason", help="e.g. revoked, expired, unknown_card")
        p.add_argument("--since", help="15m, 2h, 7d, or an ISO time")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        if name == "tail":
            p.add_argument("-f", "--follow", action="store_true")
        p.set_defaults(func=cmd_events, follow=False)
    ev_sub.add_parser("verify", parents=[common], help="check the hash chain for gaps and "
                      "edits").set_defaults(func=cmd_events)


def local_time(ms: int, zone: tzinfo, timespec: str = "milliseconds") -> str:
    """Unix milliseconds as the site's local time with its offset,
    ``2026-11-26 19:32:35.155+01:00``; ``--since`` reads the same form back."""
    return datetime.fromtimestamp(ms / 1000, zone).isoformat(sep=" ", timespec=timespec)


_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_since(text: str, zone: tzinfo | None = None) -> int:
    """``"15m"``, ``"2h"``, ``"7d"`` ago, or an ISO 8601 time, as Unix milliseconds.

    An ISO time without an offset is read in ``zone`` (the site's, as ``events`` prints
    times), or in the local time zone of this machine when ``zone`` is None.
    """
    match = _DURATION.match(text)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return int((time.time() - int(match.group(1)) * unit) * 1000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r}: use a duration such as 15m, 2h, 7d or an ISO "
                         "time such as 2026-11-26T08:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zone) if zone is not None else when.astimezone()
    return int(when.timestamp() * 1000)


_COLUMNS = ("SEQ", "TIME", "KIND", "DOOR/READER", "DIR", "REASON", "CRED", "DATA")
_WIDTHS = (6, 29, 16, 14, 5, 14, 10, 0)
"""The text columns of ``events``, and the narrowest width of each (``-f`` keeps these:
rows printed later cannot widen rows already printed)."""


def _event_cells(ev: StoredEvent, zone: tzinfo) -> list[str]:
    where = "/".join(x for x in (ev.door, ev.reader) if x)
    # A field that holds nothing is left out, never shown as "None".
    extra = " ".join(f"{k}={_value(v)}" for k, v in ev.data.items() if v is not None)
    return [str(ev.seq), local_time(ev.ts_ms, zone), ev.kind, where, ev.direction or "",
            ev.reason or "", ev.cred or "", extra]


def _value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return json.dumps(text) if any(c.isspace() for c in text) or not text else text


def _header(zone_name: str) -> list[str]:
    labels = list(_COLUMNS)
    labels[1] = f"TIME ({zone_name})"
    return labels


def _widths(rows: Sequence[Sequence[str]]) -> list[int]:
    """Each column as wide as its widest cell (the last, DATA, is not padded)."""
    widths = list(_WIDTHS)
    for row in rows:
        widths[:-1] = [max(w, len(cell)) for w, cell in zip(widths[:-1], row, strict=False)]
    return widths


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = [cell.rjust(w) if i == 0 else cell.ljust(w)
              for i, (cell, w) in enumerate(zip(cells, widths, strict=True))]
    return "  ".join(padded).rstrip() + "\n"


def _print_events(events: Sequence[StoredEvent], out: TextIO, as_json: bool,
                  zone: tzinfo, widths: Sequence[int] | None = None) -> None:
    for ev in events:
        if as_json:
            out.write(json.dumps(ev.as_dict(), sort_keys=True) + "\n")
        else:
            out.write(_line(_event_cells(ev, zone), widths or _WIDTHS))


def _check_filters(args: argparse.Namespace, config: Config, store: Store) -> None:
    """A ``--kind`` or ``--door`` that nothing known matches is a usage error listing the
    known ones: a typo would otherwise look like "no such events"."""
    kind, door = args.kind, args.door
    if kind is not None and kind not in KNOWN_EVENT_KINDS and not store.events(
            kind=kind, limit=1):
        close = difflib.get_close_matches(kind, KNOWN_EVENT_KINDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"--kind {kind!r}: no such event kind; {hint}known kinds: "
                         f"{', '.join(sorted(KNOWN_EVENT_KINDS))} (docs/events.md)")
    doors = [d.id for d in config.doors]
    if door is not None and door not in doors and not store.events(door=door, limit=1):
        raise UsageError(f"--door {door!r}: no such door in the configuration or the "
                         f"event log (doors: {', '.join(doors)})")


def _verify(store: Store, out: TextIO) -> int:
    report = store.verify_chain()
    if report.ok and report.checked == 0:
        out.write("OK: no events stored\n")
        return EXIT_OK
    if report.ok:
        out.write(f"OK: {report.checked} events, seq {report.first_seq} to "
                  f"{report.last_seq}, hash chain intact\n")
        return EXIT_OK
    out.write(f"BROKEN: {len(report.problems)} problem(s) in {report.checked} events\n")
    for problem in report.problems:
        out.write(f"  {problem}\n")
    return EXIT_FAILURE


def _table_start(events: Sequence[StoredEvent], out: TextIO, zone_name: str, *,
                 follow: bool, filtered: bool) -> list[int]:
    """Write the column headers (or say that there is nothing to show); the widths of
    the columns."""
    header = _header(zone_name)
    if not events and not follow:
        out.write("no matching events\n" if filtered else "no events stored\n")
        return list(_WIDTHS)
    # Following, a later row may be wider than any so far: keep the default widths.
    zone = ZoneInfo(zone_name)
    widths = (list(_WIDTHS) if follow
              else _widths([header, *(_event_cells(e, zone) for e in events)]))
    if len(header[1]) > widths[1]:
        header[1] = "TIME"  # a zone name too long for the column
    out.write(_line(header, widths))
    return widths


def cmd_events(args: argparse.Namespace, out: TextIO) -> int:
    """Tail, filter or verify the event log."""
    config, path = load(args)
    zone = config.zone
    # A bad --since is a usage error whatever state the store is in, so check it first.
    since = parse_since(args.since, zone) if getattr(args, "since", None) else None
    store = existing_store(config, path)
    try:
        if args.action == "verify":
            return _verify(store, out)
        _check_filters(args, config, store)
        events = store.events(kind=args.kind, door=args.door, reason=args.reason,
                              since_ms=since, limit=args.n, newest_first=True)
        events.reverse()
        follow = args.action == "tail" and args.follow
        widths = list(_WIDTHS)
        if not args.json:
            filtered = any(x is not None for x in (args.kind, args.door, args.reason, since))
            widths = _table_start(events, out, config.site.timezone, follow=follow,
                                  filtered=filtered)
        _print_events(events, out, args.json, zone, widths)
        if follow:
            newest = store.events(newest_first=True, limit=1)
            after = newest[0].seq if newest else 0
            while True:
                out.flush()
                time.sleep(0.5)
                fresh = store.events(after_seq=after, kind=args.kind, door=args.door,
                                     reason=args.reason)
                _print_events(fresh, out, args.json, zone, widths)
                if fresh:
                    after = fresh[-1].seq
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        store.close()
    return EXIT_OK
