"""The comparison with the registry: the registry staged, the findings computed by the
database, handed out page by page (docs/registry.md).

Matching is by the permit hash under the office's permit key, computed here for each
registry row (``provisioning.keys.permit_hash``), and by the card hashes the office
keeps; nothing goes to a gateway. A person appears in a finding by what the office needs
to act on it: the permit number (when the office holds it), the building, the unit, the
card's hash prefix and what was found; movements only as counts per building and day.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from protocol.hashing import CredentialHasher, log_prefix
from provisioning.db import (
    FINDING_KINDS,
    DailyEntries,
    FindingRecord,
    OfficeDatabase,
    ReconcileParams,
    ReconcileSession,
    RegistryCounts,
    RegistryRow,
)
from provisioning.errors import CentralUsageError
from provisioning.keys import OfficeKeys
from provisioning.reconcile.registry import Malformed, RegistryFile
from provisioning.retention import RETENTION_KEY, local_offset_s

STAGE_BATCH = 10_000
"""Registry rows per staging transaction."""
PAGE = 5_000
"""Findings read per page."""
DEFAULT_NO_ENTRY_DAYS = 30
DEFAULT_SILENT_HOURS = 24.0
DEFAULT_STALE_MINUTES = 60.0
ACTIONS = {
    "registry_inactive_but_open": "permitgate-central revoke --permit {permit} --gateway "
                                  "{gateway}",
    "lease_ended_still_active": "permitgate-central revoke --permit {permit} --gateway "
                                "{gateway}",
    "list_stale": "permitgate-central publish {gateway}",
}
"""The one command that acts on a finding of this kind (an officer runs it after review;
``reconcile --revoke`` runs the revocations itself)."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How long is too long (``reconcile`` options)."""

    no_entry_days: int = DEFAULT_NO_ENTRY_DAYS
    silent_hours: float = DEFAULT_SILENT_HOURS
    stale_minutes: float = DEFAULT_STALE_MINUTES


@dataclass(frozen=True, slots=True)
class Finding:
    """One finding as the outputs show it."""

    id: str
    """Stable across runs over the same data (``reconcile --revoke ID``)."""
    kind: str
    building: str
    gateway: str | None
    permit: str | None
    unit: str | None
    card: str | None
    """The card's credential hash prefix (10 hex digits), as in events and ``show``."""
    registry_line: int | None
    enrollment: str | None
    detail: dict[str, Any]
    action: str | None
    permit_hash: bytes | None = field(default=None, repr=False)
    """For ``--revoke`` (never shown)."""


@dataclass(frozen=True, slots=True)
class BuildingSummary:
    """One building in the report."""

    building: str
    gateways: tuple[str, ...]
    findings: dict[str, int]
    entries: int
    """Granted entries in the chart window (all its gateways)."""


@dataclass(frozen=True, slots=True)
class RegistrySummary:
    """What reading the export found."""

    file: str
    format: str
    encoding: str | None
    delimiter: str | None
    header_line: int | None
    rows: int
    used: int
    blank: int
    malformed: int
    malformed_rows: tuple[Malformed, ...]
    duplicates: int
    outside: int


def finding_id(record: FindingRecord) -> str:
    """12 hex digits naming a finding by what it is about (kind, building, gateway,
    card, permit), so the same finding has the same id in the next run."""
    digest = hashlib.sha256("\0".join((
        record.kind, record.building, record.gateway or "",
        (record.cred or b"").hex(), (record.permit_hash or b"").hex())).encode())
    return digest.hexdigest()[:12]


def iso_day(day: int) -> str:
    """A day number as an ISO date."""
    return (date(1970, 1, 1) + timedelta(days=day)).isoformat()


def _detail(record: FindingRecord) -> dict[str, Any]:
    detail: dict[str, Any] = json.loads(record.detail)
    for key in ("registered_at", "other_buildings"):
        if key in detail:
            detail[key] = sorted(detail[key])
    if "valid_until_day" in detail:
        day = detail.pop("valid_until_day")
        detail["valid_until"] = None if day is None else iso_day(day)
    return detail


def present(record: FindingRecord) -> Finding:
    """A database record as the outputs show it."""
    template = ACTIONS.get(record.kind)
    action = None
    if template is not None and record.gateway is not None and (
            record.permit is not None or "{permit}" not in template):
        action = template.format(permit=record.permit, gateway=record.gateway)
    return Finding(finding_id(record), record.kind, record.building, record.gateway,
                   record.permit, record.unit,
                   None if record.cred is None else log_prefix(record.cred), record.line,
                   record.enrollment, _detail(record), action, record.permit_hash)


class Comparison:
    """An open comparison: its summary, its findings (read page by page), and the
    entries per day for the charts. Valid inside ``Reconciler.compare``'s block."""

    def __init__(self, db: OfficeDatabase, session: ReconcileSession,
                 registry: RegistrySummary, *, thresholds: Thresholds, as_of_ms: int,
                 offset_s: int, total: int) -> None:
        self._db = db
        self._session = session
        self.registry = registry
        self.thresholds = thresholds
        self.as_of_ms = as_of_ms
        self.offset_s = offset_s
        self.total = total
        self.today = (as_of_ms // 1000 + offset_s) // 86_400
        counts: dict[str, dict[str, int]] = {}
        for row in session.building_findings():
            counts.setdefault(row.building, {})[row.kind] = row.count
        self.by_kind = {kind: sum(c.get(kind, 0) for c in counts.values())
                        for kind in FINDING_KINDS}
        self._counts = counts

    def findings(self) -> Iterator[Finding]:
        """Every finding in report order (building, kind), a page at a time."""
        after = 0
        while True:
            page = self._session.findings(after, PAGE)
            for record in page:
                yield present(record)
            if len(page) < PAGE:
                return
            after = page[-1].position

    def buildings(self, chart_days: int) -> list[BuildingSummary]:
        """Every building with a gateway or a finding, by building."""
        entries = self._db.entries_by_gateway(self.today - chart_days + 1, self.offset_s)
        gateways: dict[str, list[str]] = {}
        for gateway in self._db.gateways():
            gateways.setdefault(gateway.site, []).append(gateway.id)
        names = sorted(set(gateways) | set(self._counts))
        return [BuildingSummary(b, tuple(gateways.get(b, ())), self._counts.get(b, {}),
                                sum(entries.get(g, 0) for g in gateways.get(b, ())))
                for b in names]

    def daily(self, chart_days: int, buildings: list[BuildingSummary] | None = None
              ) -> list[DailyEntries]:
        """Granted entries per day over the chart window: for every gateway of the given
        buildings (gateway = its building then), or summed over all (``*``)."""
        first = self.today - chart_days + 1
        if buildings is None:
            return self._db.daily_entries(first, self.offset_s)
        site = {g: b.building for b in buildings for g in b.gateways}
        merged: dict[tuple[str, int], int] = {}
        for row in self._db.daily_entries(first, self.offset_s, sorted(site)):
            key = (site[row.gateway], row.day)
            merged[key] = merged.get(key, 0) + row.entries
        return [DailyEntries(b, d, n) for (b, d), n in sorted(merged.items())]


class Reconciler:
    """Runs comparisons with the registry (``permitgate-central reconcile``)."""

    def __init__(self, db: OfficeDatabase, keys: OfficeKeys, *,
                 clock: Callable[[], float],
                 offset_s: Callable[[float], int] = local_offset_s) -> None:
        self._db = db
        self._keys = keys
        self._clock = clock
        self._offset_s = offset_s

    def check(self, thresholds: Thresholds) -> None:
        """Refuse thresholds that cannot give a true answer."""
        if thresholds.no_entry_days < 1 or thresholds.silent_hours <= 0 or \
                thresholds.stale_minutes < 0:
            raise CentralUsageError("--no-entry-days, --silent-hours: must be positive; "
                                    "--stale-minutes: 0 or more")
        kept = self._db.meta(RETENTION_KEY)
        if kept is not None and thresholds.no_entry_days > int(kept):
            raise CentralUsageError(
                f"--no-entry-days {thresholds.no_entry_days}: retention keeps events for "
                f"{kept} days only (older ones are folded into daily counts), so every "
                f"card would look quiet; use {kept} or fewer")

    @contextlib.contextmanager
    def compare(self, registry: RegistryFile, thresholds: Thresholds = Thresholds(), *,
                as_of: float | None = None) -> Iterator[Comparison]:
        """Stage the registry, compute the findings, and yield the open comparison; what
        was staged is gone when the block is left."""
        self.check(thresholds)
        now = self._clock() if as_of is None else as_of
        offset = self._offset_s(now)
        now_ms = int(now * 1000)
        params = ReconcileParams(
            now_ms=now_ms, today=(int(now) + offset) // 86_400,
            quiet_since_ms=now_ms - thresholds.no_entry_days * 86_400_000,
            silent_before_ms=now_ms - int(thresholds.silent_hours * 3_600_000),
            stale_before_ms=now_ms - int(thresholds.stale_minutes * 60_000))
        hasher = CredentialHasher(self._keys.permit_key())  # = keys.permit_hash
        with self._db.reconcile_session() as session:
            counts = self._stage(session, registry, hasher)
            total = session.find(params)
            summary = RegistrySummary(
                registry.path.name, registry.format, registry.encoding, registry.delimiter,
                registry.header_line, registry.counts.rows, registry.counts.used,
                registry.counts.blank, registry.counts.malformed,
                tuple(registry.counts.malformed_rows), counts.duplicates, counts.outside)
            yield Comparison(self._db, session, summary, thresholds=thresholds, as_of_ms=now_ms,
                             offset_s=offset, total=total)

    @staticmethod
    def _stage(session: ReconcileSession, registry: RegistryFile,
               hasher: CredentialHasher) -> RegistryCounts:
        batch: list[RegistryRow] = []
        for row in registry.rows():
            if isinstance(row, Malformed):
                continue  # counted and listed by the reader
            batch.append(RegistryRow(row.line, row.permit, hasher.permit(row.permit),
                                     row.building, row.unit, row.status,
                                     row.registered_day, row.valid_until_day))
            if len(batch) >= STAGE_BATCH:
                session.stage_registry(batch)
                batch = []
        if batch:
            session.stage_registry(batch)
        return session.registry_counts()

