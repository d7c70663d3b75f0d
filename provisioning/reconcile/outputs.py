"""The comparison's outputs: the terminal summary, CSV and JSON (docs/registry.md).

Every file is written as a stream, page by page of findings, and created with mode 0600:
it names people (permit numbers, units). The JSON follows
docs/schemas/reconcile.schema.json (``provisioning.reconcile.schema``); the CSV has one
row per finding, in UTF-8 with a BOM so that Excel opens the Chinese text as it is.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TextIO

from provisioning.db import FINDING_KINDS
from provisioning.reconcile.findings import BuildingSummary, Comparison, Finding
from provisioning.reconcile.schema import FORMAT

CSV_COLUMNS = ("id", "building", "gateway", "kind", "permit", "unit", "card",
               "registry_line", "enrollment", "detail", "action")
SHOWN_MALFORMED = 20
"""Malformed rows the terminal lists (all are in the JSON, up to 10,000)."""
SHOWN_BUILDINGS = 20
DEFAULT_SHOWN = 20
"""Findings the terminal lists (every one is in the CSV and JSON)."""


@contextmanager
def private_file(path: Path, *, encoding: str = "utf-8", newline: str | None = None
                 ) -> Iterator[IO[str]]:
    """A new (or emptied) text file of mode 0600, whatever the umask and whatever mode
    an earlier file of that name had."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "w", encoding=encoding, newline=newline) as out:  # noqa: PTH123 - an fd
        yield out


def as_of_text(ms: int) -> str:
    """An instant in the office's zone, to the second, with its offset."""
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone().isoformat(timespec="seconds")


def finding_dict(f: Finding) -> dict[str, Any]:
    """A finding as the JSON report holds it."""
    return {"id": f.id, "kind": f.kind, "building": f.building, "gateway": f.gateway,
            "permit": f.permit, "unit": f.unit, "card": f.card,
            "registry_line": f.registry_line, "enrollment": f.enrollment,
            "detail": f.detail, "action": f.action}


def building_dict(b: BuildingSummary) -> dict[str, Any]:
    """A building as the JSON report holds it."""
    return {"building": b.building, "gateways": list(b.gateways),
            "findings": dict(b.findings), "entries": b.entries}


def head(comparison: Comparison, window_days: int) -> dict[str, Any]:
    """Everything in the JSON report before its buildings and findings."""
    r = comparison.registry
    t = comparison.thresholds
    return {
        "format": FORMAT,
        "as_of": as_of_text(comparison.as_of_ms),
        "as_of_ms": comparison.as_of_ms,
        "window_days": window_days,
        "thresholds": {"no_entry_days": t.no_entry_days, "silent_hours": t.silent_hours,
                       "stale_minutes": t.stale_minutes},
        "registry": {"file": r.file, "format": r.format, "encoding": r.encoding,
                     "delimiter": r.delimiter, "header_line": r.header_line,
                     "rows": r.rows, "used": r.used, "blank": r.blank,
                     "malformed": r.malformed, "duplicates": r.duplicates,
                     "outside": r.outside,
                     "malformed_rows": [{"line": m.line, "reason": m.reason}
                                        for m in r.malformed_rows]},
        "totals": {"findings": comparison.total, "by_kind": dict(comparison.by_kind)},
    }


def write_json(comparison: Comparison, path: Path, buildings: list[BuildingSummary],
               window_days: int) -> None:
    """The JSON report, findings streamed one by one."""
    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)

    with private_file(path) as out:
        first = dump(head(comparison, window_days))
        out.write(first[:-1] + ', "buildings": [')
        out.write(", ".join(dump(building_dict(b)) for b in buildings))
        out.write('], "findings": [\n')
        for n, finding in enumerate(comparison.findings()):
            out.write((",\n" if n else "") + dump(finding_dict(finding)))
        out.write("\n]}\n")


def write_csv(comparison: Comparison, path: Path) -> None:
    """One row per finding (``CSV_COLUMNS``), UTF-8 with a BOM."""
    with private_file(path, encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for f in comparison.findings():
            writer.writerow([f.id, f.building, f.gateway or "", f.kind, f.permit or "",
                             f.unit or "", f.card or "",
                             "" if f.registry_line is None else f.registry_line,
                             f.enrollment or "",
                             json.dumps(f.detail, ensure_ascii=False, sort_keys=True),
                             f.action or ""])


def describe(f: Finding) -> str:
    """A finding's detail in a few words."""
    d = f.detail
    text = ""
    match f.kind:
        case "unregistered_resident":
            text = (f"{d['source']} card; registered at: "
                    f"{', '.join(d['registered_at']) or 'nowhere'}")
        case "registry_inactive_but_open":
            until = f" (valid until {d['valid_until']})" if d.get("valid_until") else ""
            text = f"registry: {d['status']}{until}"
        case "permit_in_two_buildings":
            text = f"also at {', '.join(d['other_buildings'])}"
        case "lease_ended_still_active":
            end = datetime.fromtimestamp(d["lease_end"], UTC).date().isoformat()
            text = f"lease ended {end} ({d['enrollment_status']})"
        case "gateway_silent":
            seen = d["last_seen_ms"]
            text = "never heard from" if seen is None else f"last heard {as_of_text(seen)}"
        case "list_stale":
            text = "; ".join(f"{s} {a if a is not None else '-'}<{b}"
                             for s, (a, b) in ((k, d[k]) for k in ("list", "rev", "all"))
                             if a is None or a < b)
    return text


def print_summary(comparison: Comparison, out: TextIO, buildings: list[BuildingSummary],
                  *, shown: int = DEFAULT_SHOWN, written: list[Path] | None = None) -> None:
    """What an officer reads first: the registry as read, the findings by kind and by
    building, what to revoke, the first findings, and where the rest is."""
    r = comparison.registry
    how = r.format if r.encoding is None else f"{r.format}, {r.encoding}"
    header = f", header on line {r.header_line}" if r.header_line else ""
    out.write(f"registry   {r.file} ({how}{header}): {r.rows} rows, {r.used} used, "
              f"{r.malformed} malformed, {r.duplicates} replaced by later rows, "
              f"{r.outside} at buildings without a gateway\n")
    for m in r.malformed_rows[:SHOWN_MALFORMED]:
        out.write(f"  line {m.line}: {m.reason}\n")
    if r.malformed > SHOWN_MALFORMED:
        out.write(f"  ... {r.malformed - SHOWN_MALFORMED} more malformed rows "
                  "(listed in --json)\n")
    out.write(f"findings   {comparison.total} as of {as_of_text(comparison.as_of_ms)}\n")
    for kind in FINDING_KINDS:
        out.write(f"  {kind:<28} {comparison.by_kind[kind]}\n")
    busiest = sorted((b for b in buildings if b.findings),
                     key=lambda b: (-sum(b.findings.values()), b.building))[:SHOWN_BUILDINGS]
    if busiest:
        out.write(f"buildings  {sum(1 for b in buildings if b.findings)} with findings"
                  f"{' (the 20 with the most)' if len(busiest) == SHOWN_BUILDINGS else ''}\n")
    for b in busiest:
        kinds = ", ".join(f"{k} {n}" for k, n in b.findings.items())
        out.write(f"  {b.building}  {','.join(b.gateways) or '-'}  {kinds}\n")
    for listed, f in enumerate(comparison.findings()):
        if listed == 0:
            out.write("id            building  gateway  kind  permit  unit  card  detail\n")
        if listed >= shown:
            out.write(f"  ... {comparison.total - shown} more (--csv, --json, --html)\n")
            break
        out.write(f"{f.id}  {f.building}  {f.gateway or '-'}  {f.kind}  {f.permit or '-'}  "
                  f"{f.unit or '-'}  {f.card or '-'}  {describe(f)}\n")
        if f.action:
            out.write(f"              {f.action}\n")
    revocable = comparison.by_kind["registry_inactive_but_open"]
    if revocable:
        out.write(f"to revoke  {revocable} registration(s) inactive but still opening: "
                  "review, then run the commands above, or this comparison again with "
                  "--revoke [ID ...]\n")
    for path in written or []:
        out.write(f"wrote      {path} (mode 0600: it names people)\n")
