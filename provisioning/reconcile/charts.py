"""The comparison as one self-contained HTML page (``reconcile --html``).

Charts are drawn by matplotlib (the ``office`` extra) as SVG and placed inline: the page
loads nothing, runs no script, and opens on a machine without a network. What it shows:
granted entries per day over all buildings and for the buildings with the most findings,
findings per building by kind, a table of every building, and the first findings (all of
them are in the CSV and JSON). Movements appear only as counts per building and day.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from datetime import date, timedelta
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING

from provisioning.db import FINDING_KINDS, DailyEntries
from provisioning.errors import CentralError, CentralUsageError
from provisioning.reconcile.findings import BuildingSummary, Comparison
from provisioning.reconcile.outputs import as_of_text, describe, private_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CHART_BUILDINGS = 8
"""Buildings drawn one line each: those with the most findings (then entries)."""
BAR_BUILDINGS = 30
"""Buildings in the findings chart."""
PAGE_FINDINGS = 2_000
"""Findings listed on the page."""
COLOURS = ("#d62728", "#ff7f0e", "#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#17becf")
"""One per finding kind, in ``FINDING_KINDS`` order."""
EPOCH = date(1970, 1, 1)
_STYLE = """
body{font-family:system-ui,"Noto Sans CJK SC","WenQuanYi Micro Hei",sans-serif;margin:1.5em;
color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.2em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.n{text-align:right}
figure{margin:0}svg{max-width:100%;height:auto}.note{color:#555;font-size:.9em}
.wide{overflow-x:auto}
"""


def _figure(height: float) -> Figure:
    from matplotlib.figure import Figure  # noqa: PLC0415 - the office extra, loaded late

    return Figure(figsize=(10, height), dpi=96, layout="constrained")


def svg(fig: Figure, name: str) -> str:
    """A figure as SVG to place inline in HTML: no XML prolog, doctype, metadata or
    namespace declarations (the HTML parser puts inline SVG in its namespace), so the
    page names no address at all; its element ids (and the references to them) start
    with ``name`` so that two charts on one page never share one."""
    import matplotlib  # noqa: PLC0415 - the office extra

    buffer = StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name,
                                "date.epoch": EPOCH.isoformat() + "T00:00:00"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<metadata>.*?</metadata>", "", text,
                  flags=re.DOTALL)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text).replace("xlink:href", "href")
    text = re.sub(r'(\sid="|url\(#|\shref="#)', lambda m: f"{m.group(1)}{name}-", text)
    if "http" in text:
        raise CentralError("the chart's SVG names an address; this version of matplotlib "
                           "writes something unexpected")
    return text.strip()


def _days(window_days: int, today: int) -> list[date]:
    first = date(1970, 1, 1) + timedelta(days=today - window_days + 1)
    return [first + timedelta(days=i) for i in range(window_days)]


def _series(rows: Sequence[DailyEntries], names: Sequence[str], days: list[date]
            ) -> dict[str, list[int]]:
    start = (days[0] - date(1970, 1, 1)).days
    series = {name: [0] * len(days) for name in names}
    for row in rows:
        if row.gateway in series and 0 <= row.day - start < len(days):
            series[row.gateway][row.day - start] = row.entries
    return series


def entries_chart(name: str, title: str, days: list[date], series: dict[str, list[int]]
                  ) -> str:
    """Granted entries per day, one line per series (``name``: the chart's id prefix)."""
    fig = _figure(3.4)
    ax = fig.subplots()
    x = [float((d - EPOCH).days) for d in days]  # matplotlib's dates: days since EPOCH
    for label, counts in series.items():
        ax.plot(x, counts, label=label, linewidth=1.4)
    ax.xaxis_date()  # matplotlib's own date locator and formatter
    ax.set_xlim(x[0], x[-1])
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_ylabel("granted entries")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return svg(fig, name)


def findings_chart(buildings: Sequence[BuildingSummary]) -> str:
    """Findings per building, stacked by kind (the buildings with the most)."""
    shown = list(reversed(buildings))  # the most at the top
    fig = _figure(max(2.0, 0.28 * len(shown) + 1.2))
    ax = fig.subplots()
    names = [b.building for b in shown]
    left = [0] * len(shown)
    for kind, colour in zip(FINDING_KINDS, COLOURS, strict=True):
        counts = [b.findings.get(kind, 0) for b in shown]
        if any(counts):
            ax.barh(names, counts, left=left, color=colour, label=kind)
            left = [a + b for a, b in zip(left, counts, strict=True)]
    ax.set_title("Findings per building", loc="left", fontsize=11)
    ax.set_xlabel("findings")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return svg(fig, "findings")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]],
           numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td{" class=n" if i in numeric else ""}>{html.escape(str(c))}</td>'
            for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="wide"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def write_html(comparison: Comparison, path: Path, buildings: list[BuildingSummary],
               window_days: int) -> None:
    """The page (see the module docstring), mode 0600."""
    try:
        import matplotlib  # noqa: PLC0415, F401 - the office extra: say so before work
    except ImportError:
        raise CentralUsageError("--html needs matplotlib: pip install "
                                "'permitgate[office]'") from None
    days = _days(window_days, comparison.today)
    with_findings = sorted((b for b in buildings if b.findings),
                           key=lambda b: (-sum(b.findings.values()), b.building))
    drawn = sorted((b for b in buildings if b.gateways),
                   key=lambda b: (-sum(b.findings.values()), -b.entries, b.building)
                   )[:CHART_BUILDINGS]
    charts = [entries_chart("entries-all", "Granted entries per day, all buildings", days,
                            _series(comparison.daily(window_days), ["*"], days))]
    if drawn:
        charts.append(entries_chart(
            "entries-most",
            f"Granted entries per day, the {len(drawn)} buildings with the most findings",
            days, _series(comparison.daily(window_days, drawn),
                          [b.building for b in drawn], days)))
    if with_findings:
        charts.append(findings_chart(with_findings[:BAR_BUILDINGS]))
    r = comparison.registry
    kinds = _table(["kind", "findings"], [[k, comparison.by_kind[k]] for k in FINDING_KINDS],
                   numeric=[1])
    building_rows = _table(
        ["building", "gateways", f"entries ({window_days} d)", *FINDING_KINDS],
        [[b.building, ", ".join(b.gateways), b.entries,
          *(b.findings.get(k, 0) for k in FINDING_KINDS)] for b in buildings],
        numeric=range(2, 3 + len(FINDING_KINDS)))
    listed = []
    for n, f in enumerate(comparison.findings()):
        if n >= PAGE_FINDINGS:
            break
        listed.append([f.id, f.building, f.gateway or "", f.kind, f.permit or "",
                       f.unit or "", f.card or "", describe(f), f.action or ""])
    more = (f'<p class="note">The first {PAGE_FINDINGS} of {comparison.total} findings; '
            "every one is in the CSV and JSON outputs.</p>"
            if comparison.total > PAGE_FINDINGS else "")
    malformed = "".join(f"<li>line {m.line}: {html.escape(m.reason)}</li>"
                        for m in r.malformed_rows[:200])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Comparison with the police registry, {html.escape(as_of_text(comparison.as_of_ms))}</title>
<style>{_STYLE}</style></head><body>
<h1>Comparison with the police registry</h1>
<p>As of {html.escape(as_of_text(comparison.as_of_ms))}. Registry export
<b>{html.escape(r.file)}</b>: {r.rows} rows, {r.used} used, {r.malformed} malformed,
{r.duplicates} replaced by later rows, {r.outside} at buildings without a gateway.</p>
<p class="note">This page names people (permit numbers, units): keep it as the office keeps
the registry. Movements appear only as counts per building and day.</p>
<h2>Findings: {comparison.total}</h2>{kinds}
{"".join(f"<figure>{c}</figure>" for c in charts)}
<h2>Buildings</h2>{building_rows}
<h2>Findings</h2>{more}{_table(["id", "building", "gateway", "kind", "permit", "unit", "card",
                                "detail", "action"], listed)}
{f"<h2>Malformed rows</h2><ul>{malformed}</ul>" if malformed else ""}
</body></html>
"""
    with private_file(path) as out:
        out.write(page)
