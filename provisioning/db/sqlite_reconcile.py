"""``central.db`` for the registry comparison, cases and retention: their SQL in SQLite.

``SqliteReconcile`` is mixed into ``SqliteOfficeDatabase`` (provisioning/db/sqlite.py):
the methods of ``OfficeDatabase``'s section "the registry comparison, cases and
retention". A comparison (``reconcile_session``) works in temporary tables of the calling
thread's connection: SQLite keeps them in a temporary file of its own, unlinked as soon
as it is opened, and drops them with the session, so the registry's permit numbers never
reach ``central.db``. Reading the office's tables inside a deferred transaction that
writes only those temporary tables takes no lock on ``central.db`` beyond a WAL read
snapshot: ``serve`` keeps storing events while a comparison runs.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from common.sqlite import rollback
from provisioning.db import (
    FINDING_KINDS,
    BuildingFindings,
    CaseRecord,
    DailyEntries,
    FindingRecord,
    FoldResult,
    ReconcileParams,
    RegistryCounts,
    RegistryRow,
    StoredEvent,
)
from provisioning.db.rows import case_record, find_values, registry_row, stored_event
from provisioning.errors import CentralError

SESSION_CACHE_KIB = 131_072
"""Page cache of the session's connection while it runs (128 MiB, given back after):
the joins over a million cards reread index pages often; the whole run stays far under
the 500 MB budget (docs/registry.md, bench/reconcile.py)."""

_TEMP_TABLES = ("rc_registry", "rc_sites", "rc_cards", "rc_findings", "rc_report")

_CREATE = (
    """CREATE TEMP TABLE rc_registry (
        id INTEGER PRIMARY KEY,
        line INTEGER NOT NULL,
        permit TEXT NOT NULL,
        permit_hash BLOB NOT NULL,
        building TEXT NOT NULL,
        unit TEXT,
        status TEXT NOT NULL,
        registered_day INTEGER,
        valid_until_day INTEGER)""",
    "CREATE TEMP TABLE rc_sites (site TEXT PRIMARY KEY) WITHOUT ROWID",
    """CREATE TEMP TABLE rc_cards (       -- the cards able to enter, as of the snapshot
        id INTEGER PRIMARY KEY,
        gateway TEXT NOT NULL,
        building TEXT NOT NULL,
        cred BLOB NOT NULL,
        prefix TEXT NOT NULL,             -- the 10 hex digits events carry
        permit_hash BLOB,
        source TEXT NOT NULL,             -- 'list' or 'provisional'
        enrollment TEXT,
        since_ms INTEGER NOT NULL)""",
    "CREATE INDEX temp.rc_cards_card ON rc_cards(gateway, cred)",
    "CREATE INDEX temp.rc_cards_permit ON rc_cards(permit_hash, building)",
    """CREATE TEMP TABLE rc_findings (
        id INTEGER PRIMARY KEY,
        rank INTEGER NOT NULL,
        kind TEXT NOT NULL,
        building TEXT NOT NULL,
        gateway TEXT,
        cred BLOB,
        permit_hash BLOB,
        permit TEXT,
        unit TEXT,
        line INTEGER,
        enrollment TEXT,
        detail TEXT NOT NULL)""",
    "CREATE INDEX temp.rc_findings_gateway ON rc_findings(kind, gateway)",
    """CREATE TEMP TABLE rc_report (          -- the findings in report order
        position INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        building TEXT NOT NULL,
        gateway TEXT,
        cred BLOB,
        permit_hash BLOB,
        permit TEXT,
        unit TEXT,
        line INTEGER,
        enrollment TEXT,
        detail TEXT NOT NULL)""",
)

_INSERT_ROW = (
    "INSERT INTO temp.rc_registry (line, permit, permit_hash, building, unit, status, "
    "registered_day, valid_until_day) VALUES (?,?,?,?,?,?,?,?)")

# A later registration of the same permit at the same building replaces an earlier one.
_SET_ASIDE = """
    DELETE FROM temp.rc_registry WHERE id IN (
        SELECT id FROM (
            SELECT id, row_number() OVER (
                PARTITION BY permit_hash, building
                ORDER BY coalesce(registered_day, -1) DESC, line DESC) AS n
            FROM temp.rc_registry)
        WHERE n > 1)"""

_ACTIVE = "r.status = 'active' AND (r.valid_until_day IS NULL OR r.valid_until_day >= :today)"

_NOT_REVOKED = """
    NOT EXISTS (SELECT 1 FROM main.revocations v WHERE v.gateway = {t}.gateway
                AND v.kind = 'credential' AND v.hash = {t}.cred)
    AND NOT EXISTS (SELECT 1 FROM main.revocations v WHERE v.gateway IN ({t}.gateway, '*')
                    AND v.kind = 'permit' AND v.hash = {t}.{permit})"""

_INSERT_CARD = ("INSERT INTO temp.rc_cards (gateway, building, cred, prefix, permit_hash, "
                "source, enrollment, since_ms) ")

# The cards able to enter now: listed entries in their validity, not revoked...
_LISTED = _INSERT_CARD + """
    SELECT e.gateway, g.site, e.cred, lower(hex(substr(e.cred, 1, 5))), e.permit, 'list',
           NULL, coalesce(e.confirmed_at * 1000, e.updated_ms)
    FROM main.entries e JOIN main.gateways g ON g.id = e.gateway
    WHERE (e.valid_from IS NULL OR e.valid_from <= :now_s)
      AND (e.valid_until IS NULL OR e.valid_until > :now_s)
      AND """ + _NOT_REVOKED.format(t="e", permit="permit")  # noqa: S608 - constant fragments

# ... and enrollments made at gateways, not yet decided, within their provisional grant.
_PROVISIONAL = _INSERT_CARD + """
    SELECT en.gateway, g.site, en.cred, lower(hex(substr(en.cred, 1, 5))), en.permit_hash,
           'provisional', en.id, en.received_ms
    FROM main.enrollments en JOIN main.gateways g ON g.id = en.gateway
    WHERE en.status IN ('received', 'held') AND en.cred IS NOT NULL
      AND en.provisional_until > :now_s AND en.lease_end > :now_s
      AND NOT EXISTS (SELECT 1 FROM temp.rc_cards c WHERE c.gateway = en.gateway
                      AND c.cred = en.cred)
      AND """ + _NOT_REVOKED.format(t="en", permit="permit_hash")  # noqa: S608 - constant fragments

# Who the findings are about, as far as the office knows (the findings only, not the
# million cards): the enrollment a listed card came from; the enrollment's permit number,
# else the registry's; the registry's unit at that building, else the enrollment's.
_NAME_FINDINGS = (
    """UPDATE temp.rc_findings SET enrollment = (
           SELECT en.id FROM main.enrollments en WHERE en.gateway = rc_findings.gateway
           AND en.cred = rc_findings.cred AND en.status = 'confirmed'
           ORDER BY en.seq DESC LIMIT 1)
       WHERE enrollment IS NULL AND cred IS NOT NULL""",
    """UPDATE temp.rc_findings SET
           permit = coalesce(permit,
               (SELECT en.permit FROM main.enrollments en
                WHERE en.gateway = rc_findings.gateway AND en.id = rc_findings.enrollment),
               (SELECT r.permit FROM temp.rc_registry r
                WHERE r.permit_hash = rc_findings.permit_hash LIMIT 1)),
           unit = coalesce(unit,
               (SELECT r.unit FROM temp.rc_registry r
                WHERE r.permit_hash = rc_findings.permit_hash
                AND r.building = rc_findings.building),
               (SELECT en.unit FROM main.enrollments en
                WHERE en.gateway = rc_findings.gateway AND en.id = rc_findings.enrollment))
       WHERE permit_hash IS NOT NULL OR enrollment IS NOT NULL""",
)

_INSERT_FINDING = ("INSERT INTO temp.rc_findings (rank, kind, building, gateway, cred, "
                   "permit_hash, permit, unit, line, enrollment, detail) ")

_RANK = {kind: rank for rank, kind in enumerate(FINDING_KINDS)}

_FINDINGS: tuple[str, ...] = (
    # unregistered_resident: able to enter, no registry row at that building at all.
    _INSERT_FINDING + f"""
    SELECT {_RANK["unregistered_resident"]}, 'unregistered_resident', c.building, c.gateway,
           c.cred, c.permit_hash, NULL, NULL, NULL, c.enrollment,
           json_object('source', c.source, 'registered_at', json(
               (SELECT json_group_array(DISTINCT r.building) FROM temp.rc_registry r
                WHERE r.permit_hash = c.permit_hash AND {_ACTIVE})))
    FROM temp.rc_cards c
    WHERE NOT EXISTS (SELECT 1 FROM temp.rc_registry r WHERE r.permit_hash = c.permit_hash
                      AND r.building = c.building)""",  # noqa: S608 - constant fragments
    # registry_inactive_but_open: the registration there lapsed, was cancelled, moved out
    # or expired, and the card still opens.
    _INSERT_FINDING + f"""
    SELECT {_RANK["registry_inactive_but_open"]}, 'registry_inactive_but_open', c.building,
           c.gateway, c.cred, c.permit_hash, r.permit, r.unit, r.line, c.enrollment,
           json_object('status', CASE WHEN r.status = 'active' THEN 'expired'
                                      ELSE r.status END,
                       'valid_until_day', r.valid_until_day)
    FROM temp.rc_cards c JOIN temp.rc_registry r
         ON r.permit_hash = c.permit_hash AND r.building = c.building
    WHERE NOT ({_ACTIVE})""",  # noqa: S608 - constant fragments
    # registered_no_card: registered (active) at a building the office serves, and no
    # card of that permit opens there.
    _INSERT_FINDING + f"""
    SELECT {_RANK["registered_no_card"]}, 'registered_no_card', r.building, NULL, NULL,
           r.permit_hash, r.permit, r.unit, r.line, NULL, '{{}}'
    FROM temp.rc_registry r JOIN temp.rc_sites s ON s.site = r.building
    WHERE {_ACTIVE}
      AND NOT EXISTS (SELECT 1 FROM temp.rc_cards c WHERE c.permit_hash = r.permit_hash
                      AND c.building = r.building)""",  # noqa: S608 - constant fragments
    # gateway_silent (before no_entry_since, which passes over a silent gateway's cards):
    # heard of last by an online status (when received), a clean stop (its own time) or
    # the newest event stored; never heard of: since it was added.
    _INSERT_FINDING + f"""
    SELECT {_RANK["gateway_silent"]}, 'gateway_silent', site, id, NULL, NULL, NULL, NULL,
           NULL, NULL, json_object('last_seen_ms', nullif(seen, 0), 'state', state)
    FROM (SELECT g.id, g.site, g.created_ms, json_extract(g.status, '$.state') AS state,
                 max(CASE WHEN json_extract(g.status, '$.state') = 'online'
                          THEN coalesce(g.status_ms, 0)
                          ELSE coalesce(json_extract(g.status, '$.ts_ms'), 0) END,
                     coalesce((SELECT e.received_ms FROM main.events e
                               WHERE e.gateway = g.id ORDER BY e.seq DESC LIMIT 1), 0))
                     AS seen
          FROM main.gateways g)
    WHERE max(seen, created_ms) < :silent_before_ms""",  # noqa: S608 - constant fragments
    # no_entry_since: a listed card, listed before the quiet period, no granted entry in
    # it (one seek per card in events_entries).
    _INSERT_FINDING + f"""
    SELECT {_RANK["no_entry_since"]}, 'no_entry_since', c.building, c.gateway, c.cred,
           c.permit_hash, NULL, NULL, NULL, c.enrollment,
           json_object('listed_since_ms', c.since_ms)
    FROM temp.rc_cards c
    WHERE c.source = 'list' AND c.since_ms < :quiet_since_ms
      AND NOT EXISTS (SELECT 1 FROM main.events e WHERE e.gateway = c.gateway
                      AND e.cred = c.prefix AND e.kind = 'access_granted'
                      AND e.direction = 'entry' AND e.ts_ms >= :quiet_since_ms)
      AND NOT EXISTS (SELECT 1 FROM temp.rc_findings f WHERE f.kind = 'gateway_silent'
                      AND f.gateway = c.gateway)""",  # noqa: S608 - constant fragments
    # permit_in_two_buildings: one finding per permit and building (its first card there);
    # the permits are found by one pass over the cards' permit index.
    _INSERT_FINDING + f"""
    WITH multi AS (
        SELECT permit_hash FROM temp.rc_cards WHERE permit_hash IS NOT NULL
        GROUP BY permit_hash HAVING count(DISTINCT building) > 1),
    firsts AS (
        SELECT min(c.id) AS id FROM temp.rc_cards c JOIN multi m
        ON m.permit_hash = c.permit_hash GROUP BY c.permit_hash, c.building)
    SELECT {_RANK["permit_in_two_buildings"]}, 'permit_in_two_buildings', c.building,
           c.gateway, c.cred, c.permit_hash, NULL, NULL, NULL, c.enrollment,
           json_object('other_buildings', json(
               (SELECT json_group_array(DISTINCT o.building) FROM temp.rc_cards o
                WHERE o.permit_hash = c.permit_hash AND o.building != c.building)))
    FROM firsts JOIN temp.rc_cards c ON c.id = firsts.id""",  # noqa: S608 - constant fragments
    # lease_ended_still_active: the office's own record says the lease ended (or the
    # tenant left), and the card still opens by the office's list.
    _INSERT_FINDING + f"""
    SELECT {_RANK["lease_ended_still_active"]}, 'lease_ended_still_active', c.building,
           c.gateway, c.cred, c.permit_hash, en.permit, NULL, NULL, en.id,
           json_object('lease_end', en.lease_end, 'enrollment_status', en.status)
    FROM main.enrollments en JOIN temp.rc_cards c
         ON c.gateway = en.gateway AND c.cred = en.cred
    WHERE en.lease_end <= :now_s AND en.status != 'rejected'""",  # noqa: S608 - constant fragments
    # list_stale: a list version, or revocations, sent before the grace and not reported.
    _INSERT_FINDING + f"""
    SELECT {_RANK["list_stale"]}, 'list_stale', g.site, g.id, NULL, NULL, NULL, NULL, NULL,
           NULL, json_object('list', json_array(g.applied_list_version, g.list_version),
                             'rev', json_array(g.rev_rep, g.rev_seq),
                             'all', json_array(g.all_rep, a.all_seq))
    FROM (SELECT id, site, list_version, applied_list_version, list_published_ms, rev_seq,
                 json_extract(status, '$.versions.rev') AS rev_rep,
                 json_extract(status, '$.versions.all') AS all_rep,
                 (SELECT max(v.revoked_ms) FROM main.revocations v
                  WHERE v.gateway = gateways.id) AS rev_ms
          FROM main.gateways) AS g,
         (SELECT (SELECT seq FROM main.streams WHERE name = 'all') AS all_seq,
                 (SELECT max(revoked_ms) FROM main.revocations WHERE gateway = '*')
                     AS all_ms) AS a
    WHERE (g.list_version > coalesce(g.applied_list_version, 0)
           AND g.list_published_ms < :stale_before_ms)
       OR (g.rev_rep IS NOT NULL AND g.rev_seq > g.rev_rep
           AND g.rev_ms < :stale_before_ms)
       OR (g.all_rep IS NOT NULL AND a.all_seq > g.all_rep
           AND a.all_ms < :stale_before_ms)""",  # noqa: S608 - constant fragments
)

_ORDER = """
    INSERT INTO temp.rc_report (kind, building, gateway, cred, permit_hash, permit, unit, line,
                                enrollment, detail)
    SELECT kind, building, gateway, cred, permit_hash, permit, unit, line, enrollment, detail
    FROM temp.rc_findings ORDER BY building, rank, id"""

_DAY = "(ts_ms / 1000 + :offset_s) / 86400"
_ENTRY = "kind = 'access_granted' AND direction = 'entry'"

_TENANT_KINDS = "('tenant_enrolled', 'tenant_moved_out', 'tenant_lease_ended')"
"""As spelled in the partial index events_tenant (migration 2), so that SQLite uses it."""

_PENDING_TENANT = f"""
    SELECT min(seq) FROM events WHERE gateway = ? AND kind IN {_TENANT_KINDS}
    AND seq > ?"""  # noqa: S608 - constant fragments
"""The first tenant event not yet acted on: nothing from it on may go."""

_FOLD = f"""
    INSERT INTO daily_counts (gateway, day, entries, exits, denied, other)
    SELECT gateway, {_DAY},
           sum(CASE WHEN {_ENTRY} THEN 1 ELSE 0 END),
           sum(CASE WHEN kind = 'access_granted' AND direction = 'exit' THEN 1 ELSE 0 END),
           sum(CASE WHEN kind = 'access_denied' THEN 1 ELSE 0 END),
           sum(CASE WHEN kind = 'access_denied' OR (kind = 'access_granted'
                    AND direction IN ('entry', 'exit')) THEN 0 ELSE 1 END)
    FROM events WHERE gateway = :gateway AND seq > :after AND seq <= :end
    GROUP BY {_DAY}
    ON CONFLICT (gateway, day) DO UPDATE SET
        entries = entries + excluded.entries, exits = exits + excluded.exits,
        denied = denied + excluded.denied, other = other + excluded.other"""  # noqa: S608 - constant fragments


def _drop_temp(conn: sqlite3.Connection) -> None:
    for table in _TEMP_TABLES:
        conn.execute(f"DROP TABLE IF EXISTS temp.{table}")


def _finding(row: sqlite3.Row | tuple[Any, ...]) -> FindingRecord:
    return FindingRecord(*row)


class SqliteReconcileSession:
    """A comparison's temporary tables on one connection (``ReconcileSession``)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A deferred transaction: it writes temporary tables only, so it takes no write
        lock on ``central.db``; its reads share one snapshot."""
        conn = self._conn
        try:
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(conn)
            raise CentralError(f"{self._path}: {exc}") from exc
        except BaseException:
            rollback(conn)
            raise

    def stage_registry(self, rows: Sequence[RegistryRow]) -> None:
        """Add a batch of registry rows."""
        with self._tx() as conn:
            conn.executemany(_INSERT_ROW, [registry_row(r) for r in rows])

    def registry_counts(self) -> RegistryCounts:
        """Set aside replaced rows; index the rest; count what was staged."""
        with self._tx() as conn:
            staged = conn.execute("SELECT count(*) FROM temp.rc_registry").fetchone()[0]
            duplicates = conn.execute(_SET_ASIDE).rowcount
            conn.execute("CREATE INDEX IF NOT EXISTS temp.rc_registry_permit "
                         "ON rc_registry(permit_hash, building)")
            outside = conn.execute(
                "SELECT count(*) FROM temp.rc_registry WHERE building NOT IN "
                "(SELECT site FROM main.gateways)").fetchone()[0]
        return RegistryCounts(int(staged), int(duplicates), int(outside))

    def find(self, params: ReconcileParams) -> int:
        """Every finding, as of one snapshot of the office's tables."""
        values = find_values(params)
        with self._tx() as conn:
            for table in ("rc_sites", "rc_cards", "rc_findings", "rc_report"):
                conn.execute(f"DELETE FROM temp.{table}")  # noqa: S608 - fixed names
            conn.execute("CREATE INDEX IF NOT EXISTS temp.rc_registry_permit "
                         "ON rc_registry(permit_hash, building)")
            conn.execute("INSERT INTO temp.rc_sites SELECT DISTINCT site FROM main.gateways")
            conn.execute(_LISTED, values)
            conn.execute(_PROVISIONAL, values)
            for statement in _FINDINGS:
                conn.execute(statement, values)
            for statement in _NAME_FINDINGS:
                conn.execute(statement)
            conn.execute(_ORDER)
            return int(conn.execute("SELECT count(*) FROM temp.rc_report").fetchone()[0])

    def findings(self, after: int, limit: int) -> list[FindingRecord]:
        """The next page of findings in report order."""
        try:
            return [_finding(row) for row in self._conn.execute(
                "SELECT position, kind, building, gateway, cred, permit, permit_hash, unit, "
                "line, enrollment, detail FROM temp.rc_report WHERE position > ? "
                "ORDER BY position LIMIT ?", (after, limit))]
        except sqlite3.Error as exc:
            raise CentralError(f"{self._path}: {exc}") from exc

    def building_findings(self) -> list[BuildingFindings]:
        """Findings counted by building and kind."""
        try:
            rows = self._conn.execute(
                "SELECT building, kind, count(*) FROM temp.rc_findings "
                "GROUP BY building, rank, kind ORDER BY building, rank").fetchall()
        except sqlite3.Error as exc:
            raise CentralError(f"{self._path}: {exc}") from exc
        return [BuildingFindings(b, k, int(n)) for b, k, n in rows]


class _Host(Protocol):
    """What the mixin needs of ``SqliteOfficeDatabase``."""

    path: Path

    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        ...

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE), errors as ``CentralError``."""
        ...

    def _read(self) -> contextlib.AbstractContextManager[sqlite_utils.Database]:
        """Reads on this thread's connection, errors as ``CentralError``."""
        ...


class SqliteReconcile:
    """The comparison, cases and retention on ``central.db`` (mixed into
    ``SqliteOfficeDatabase``)."""

    @contextlib.contextmanager
    def reconcile_session(self: _Host) -> Iterator[SqliteReconcileSession]:
        """A comparison on this thread's connection; its temporary tables are dropped
        when the block is left."""
        conn = self.conn()
        try:
            cache = conn.execute("PRAGMA cache_size").fetchone()[0]
            conn.execute(f"PRAGMA cache_size = -{SESSION_CACHE_KIB}")
            _drop_temp(conn)
            for statement in _CREATE:
                conn.execute(statement)
        except sqlite3.Error as exc:
            raise CentralError(f"{self.path}: {exc}") from exc
        try:
            yield SqliteReconcileSession(conn, self.path)
        finally:
            rollback(conn)
            with contextlib.suppress(sqlite3.Error):
                _drop_temp(conn)
                conn.execute(f"PRAGMA cache_size = {int(cache)}")

    # -- entries per day ---------------------------------------------------------------

    def daily_entries(self: _Host, from_day: int, offset_s: int,
                      gateways: Sequence[str] | None = None) -> list[DailyEntries]:
        """Granted entries per day (and per gateway when ``gateways`` names them)."""
        values: dict[str, Any] = {"from_day": from_day, "offset_s": offset_s,
                                  "from_ms": (from_day * 86_400 - offset_s) * 1000}
        if gateways is None:
            sql = f"""
                SELECT '*', day, sum(n) FROM (
                    SELECT day, entries AS n FROM daily_counts WHERE day >= :from_day
                    UNION ALL
                    SELECT {_DAY} AS day, count(*) FROM events
                    WHERE {_ENTRY} AND ts_ms >= :from_ms GROUP BY 1)
                GROUP BY day HAVING sum(n) > 0 ORDER BY day"""  # noqa: S608 - constant fragments
        else:
            values["gateways"] = json.dumps(list(gateways))
            chosen = "gateway IN (SELECT value FROM json_each(:gateways))"
            sql = f"""
                SELECT gateway, day, sum(n) FROM (
                    SELECT gateway, day, entries AS n FROM daily_counts
                    WHERE day >= :from_day AND {chosen}
                    UNION ALL
                    SELECT gateway, {_DAY} AS day, count(*) FROM events
                    WHERE {_ENTRY} AND ts_ms >= :from_ms AND {chosen} GROUP BY 1, 2)
                GROUP BY gateway, day HAVING sum(n) > 0 ORDER BY gateway, day"""  # noqa: S608 - constant fragments
        with self._read() as db:
            return [DailyEntries(g, int(d), int(n))
                    for g, d, n in db.execute(sql, values).fetchall()]

    def entries_by_gateway(self: _Host, from_day: int, offset_s: int) -> dict[str, int]:
        """Granted entries per gateway from ``from_day`` on."""
        values = {"from_day": from_day, "from_ms": (from_day * 86_400 - offset_s) * 1000}
        with self._read() as db:
            return {g: int(n) for g, n in db.execute(f"""
                SELECT gateway, sum(n) FROM (
                    SELECT gateway, entries AS n FROM daily_counts WHERE day >= :from_day
                    UNION ALL
                    SELECT gateway, count(*) FROM events WHERE {_ENTRY}
                    AND ts_ms >= :from_ms GROUP BY gateway)
                GROUP BY gateway ORDER BY gateway""", values).fetchall()}  # noqa: S608 - constant fragments

    # -- cases -------------------------------------------------------------------------

    def record_case(self: _Host, record: CaseRecord) -> int:
        """Add a record to the case audit; its id."""
        with self._tx() as conn:
            return int(conn.execute(
                "INSERT INTO case_audit (at_ms, officer, reason, scope, permit_hash, shown) "
                "VALUES (?,?,?,?,?,?) RETURNING id",
                (record.at_ms, record.officer, record.reason, record.scope,
                 record.permit_hash, record.shown)).fetchone()[0])

    def case_records(self: _Host, limit: int) -> list[CaseRecord]:
        """The newest case audit records, newest first."""
        with self._read() as db:
            return [case_record(r) for r in db.query(
                "SELECT * FROM case_audit ORDER BY id DESC LIMIT ?", [limit])]

    def permit_cards(self: _Host, permit_hash: bytes) -> list[tuple[str, bytes]]:
        """Every (gateway, card) the office knows for a permit."""
        with self._read() as db:
            return [(g, c) for g, c in db.execute(
                "SELECT gateway, cred FROM entries WHERE permit = ? UNION "
                "SELECT gateway, cred FROM enrollments WHERE permit_hash = ? AND "
                "cred IS NOT NULL ORDER BY 1, 2", [permit_hash, permit_hash]).fetchall()]

    def card_events(self: _Host, gateway: str, cred_prefix: str, since_ms: int,
                    limit: int) -> list[StoredEvent]:
        """One card's access events at one gateway, the newest ``limit``, oldest first."""
        with self._read() as db:
            rows = list(db.query(
                "SELECT * FROM events WHERE gateway = ? AND cred = ? AND kind IN "
                "('access_granted', 'access_denied') AND ts_ms >= ? ORDER BY seq DESC "
                "LIMIT ?", [gateway, cred_prefix, since_ms, limit]))
        rows.reverse()
        return [stored_event(r) for r in rows]

    # -- retention ---------------------------------------------------------------------

    def fold_events(self: _Host, gateway: str, before_ms: int, offset_s: int,
                    limit: int) -> FoldResult:
        """One retention step at one gateway (see ``OfficeDatabase.fold_events``)."""
        with self._tx() as conn:
            row = conn.execute("SELECT acked_upto, tenant_upto FROM gateways WHERE id = ?",
                               (gateway,)).fetchone()
            if row is None:
                raise CentralError(f"gateway {gateway!r}: not in the database")
            upto, tenant_upto = int(row[0]), int(row[1])
            pending = conn.execute(_PENDING_TENANT, (gateway, tenant_upto)).fetchone()[0]
            if pending is not None:
                upto = min(upto, int(pending) - 1)
            lowest, window_end, count = conn.execute(
                "SELECT min(seq), max(seq), count(*) FROM (SELECT seq FROM events "
                "WHERE gateway = ? AND seq <= ? ORDER BY seq LIMIT ?)",
                (gateway, upto, limit)).fetchone()
            if not count:
                return FoldResult(0, 0, more=False)
            recent = conn.execute(
                "SELECT min(seq) FROM events WHERE gateway = ? AND seq BETWEEN ? AND ? "
                "AND ts_ms >= ?", (gateway, lowest, window_end, before_ms)).fetchone()[0]
            end = int(window_end) if recent is None else int(recent) - 1
            if end < lowest:
                return FoldResult(0, 0, more=False)
            found = conn.execute("SELECT upto FROM folded WHERE gateway = ?",
                                 (gateway,)).fetchone()
            after = max(int(found[0]) if found else 0, int(lowest) - 1)
            folded = conn.execute(
                "SELECT count(*) FROM events WHERE gateway = ? AND seq > ? AND seq <= ?",
                (gateway, after, end)).fetchone()[0]
            conn.execute(_FOLD, {"gateway": gateway, "after": after, "end": end,
                                 "offset_s": offset_s})
            deleted = conn.execute("DELETE FROM events WHERE gateway = ? AND seq <= ?",
                                   (gateway, end)).rowcount
            conn.execute("INSERT INTO folded VALUES (?, ?) ON CONFLICT (gateway) DO UPDATE "
                         "SET upto = max(upto, excluded.upto)", (gateway, end))
        return FoldResult(int(folded), int(deleted),
                          more=recent is None and int(count) == limit)

    def erase_ended_permits(self: _Host, before_ms: int) -> int:
        """Drop the permit number and hash of enrollments rejected or ended long ago."""
        with self._tx() as conn:
            return int(conn.execute(
                "UPDATE enrollments SET permit = NULL, permit_hash = NULL "
                "WHERE status IN ('rejected', 'ended') "
                "AND coalesce(ended_ms, decided_ms, received_ms) < ? "
                "AND (permit IS NOT NULL OR permit_hash IS NOT NULL)",
                (before_ms,)).rowcount)
