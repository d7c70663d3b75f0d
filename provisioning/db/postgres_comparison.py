"""The comparison with the registry on PostgreSQL: the session's temporary tables, the SQL
of every finding, and ``PostgresReconcileSession`` (``ReconcileSession``), opened by
``PostgresReconcile.reconcile_session`` (provisioning/db/postgres_reconcile.py). The SQLite
one is provisioning/db/sqlite_reconcile.py; both give the same findings in the same order
(tests/test_office_pg.py).

At a city's size (1,000,000 registry rows and cards, 10,000,000 events; bench/reconcile.py)
what matters here is:

- **Statistics.** Autovacuum never analyses temporary tables: without ``ANALYZE`` the
  planner guesses, and picked a walk of the registry's primary key per card (hours for a
  million cards). Each staged table is analysed once it is filled.
- **Staging by COPY** (binary), a batch at a time, as the registry is read.
- **Memory of the server session**, not of the program: ``temp_buffers`` (set before the
  first temporary table is touched) keeps the session's tables out of the kernel's files
  between statements, and ``work_mem`` lets the hash joins and aggregates over a million
  rows run in one pass.
- **Set-based statements.** The findings are named (enrollment, permit number, unit) after
  they are found, a few rows, not every card; the permits in two buildings come from one
  aggregate over the cards, not a lookup per card.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

import psycopg

from provisioning.db import (
    FINDING_KINDS,
    BuildingFindings,
    FindingRecord,
    ReconcileParams,
    RegistryCounts,
    RegistryRow,
)
from provisioning.db.rows import find_values, registry_row
from provisioning.errors import CentralError

Conn = psycopg.Connection[tuple[Any, ...]]

SESSION_SETTINGS = (
    "SET temp_buffers = '256MB'",
    "SET work_mem = '64MB'",
)
"""The session's server memory (taken as needed, given back when the session ends)."""

CREATE = (
    """CREATE TEMP TABLE rc_registry (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        line INTEGER NOT NULL,
        permit TEXT NOT NULL,
        permit_hash BYTEA NOT NULL,
        building TEXT COLLATE "C" NOT NULL,
        unit TEXT,
        status TEXT NOT NULL,
        registered_day INTEGER,
        valid_until_day INTEGER)""",
    'CREATE TEMP TABLE rc_sites (site TEXT COLLATE "C" PRIMARY KEY)',
    """CREATE TEMP TABLE rc_cards (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        gateway TEXT COLLATE "C" NOT NULL,
        building TEXT COLLATE "C" NOT NULL,
        cred BYTEA NOT NULL,
        prefix TEXT NOT NULL,
        permit_hash BYTEA,
        source TEXT NOT NULL,
        enrollment TEXT,
        since_ms BIGINT NOT NULL)""",
    """CREATE TEMP TABLE rc_findings (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        rank INTEGER NOT NULL,
        kind TEXT NOT NULL,
        building TEXT COLLATE "C" NOT NULL,
        gateway TEXT,
        cred BYTEA,
        permit_hash BYTEA,
        permit TEXT,
        unit TEXT,
        line INTEGER,
        enrollment TEXT,
        detail TEXT NOT NULL)""",
    "CREATE INDEX rc_findings_gateway ON rc_findings(kind, gateway)",
    """CREATE TEMP TABLE rc_report (
        position BIGINT PRIMARY KEY,
        kind TEXT NOT NULL,
        building TEXT NOT NULL,
        gateway TEXT,
        cred BYTEA,
        permit_hash BYTEA,
        permit TEXT,
        unit TEXT,
        line INTEGER,
        enrollment TEXT,
        detail TEXT NOT NULL)""",
)

_COPY_ROWS = ("COPY rc_registry (line, permit, permit_hash, building, unit, status, "
              "registered_day, valid_until_day) FROM STDIN (FORMAT BINARY)")
_ROW_TYPES = ("int4", "text", "bytea", "text", "text", "text", "int4", "int4")

_SET_ASIDE = """
    DELETE FROM rc_registry WHERE id IN (
        SELECT id FROM (
            SELECT id, row_number() OVER (
                PARTITION BY permit_hash, building
                ORDER BY coalesce(registered_day, -1) DESC, line DESC) AS n
            FROM rc_registry) AS ranked
        WHERE n > 1)"""

_ACTIVE = ("r.status = 'active' AND (r.valid_until_day IS NULL "
           "OR r.valid_until_day >= %(today)s)")

_NOT_REVOKED = """
    NOT EXISTS (SELECT 1 FROM revocations v WHERE v.gateway = {t}.gateway
                AND v.kind = 'credential' AND v.hash = {t}.cred)
    AND NOT EXISTS (SELECT 1 FROM revocations v WHERE v.gateway IN ({t}.gateway, '*')
                    AND v.kind = 'permit' AND v.hash = {t}.{permit})"""

_CARD_INDEXES = (
    "CREATE INDEX IF NOT EXISTS rc_cards_card ON rc_cards(gateway, cred)",
    "CREATE INDEX IF NOT EXISTS rc_cards_permit ON rc_cards(permit_hash, building)",
)
"""Made once the listed cards are in (a million rows: faster than keeping them up)."""

_INSERT_CARD = ("INSERT INTO rc_cards (gateway, building, cred, prefix, permit_hash, "
                "source, enrollment, since_ms) ")
_PREFIX = "encode(substring({t}.cred FROM 1 FOR 5), 'hex')"

# The cards able to enter now: listed entries in their validity, not revoked...
_LISTED = _INSERT_CARD + """
    SELECT e.gateway, g.site, e.cred, """ + _PREFIX.format(t="e") + """, e.permit, 'list',
           NULL, coalesce(e.confirmed_at * 1000, e.updated_ms)
    FROM entries e JOIN gateways g ON g.id = e.gateway
    WHERE (e.valid_from IS NULL OR e.valid_from <= %(now_s)s)
      AND (e.valid_until IS NULL OR e.valid_until > %(now_s)s)
      AND """ + _NOT_REVOKED.format(t="e", permit="permit")  # noqa: S608 - constant fragments

# ... and enrollments made at gateways, not yet decided, within their provisional grant.
_PROVISIONAL = _INSERT_CARD + """
    SELECT en.gateway, g.site, en.cred, """ + _PREFIX.format(t="en") + """, en.permit_hash,
           'provisional', en.id, en.received_ms
    FROM enrollments en JOIN gateways g ON g.id = en.gateway
    WHERE en.status IN ('received', 'held') AND en.cred IS NOT NULL
      AND en.provisional_until > %(now_s)s AND en.lease_end > %(now_s)s
      AND NOT EXISTS (SELECT 1 FROM rc_cards c WHERE c.gateway = en.gateway
                      AND c.cred = en.cred)
      AND """ + _NOT_REVOKED.format(t="en", permit="permit_hash")  # noqa: S608 - constant fragments

# Who the findings are about, as far as the office knows (the findings only, not the
# million cards): the enrollment a listed card came from; the enrollment's permit number,
# else the registry's; the registry's unit at that building, else the enrollment's.
_NAME_FINDINGS = (
    """UPDATE rc_findings SET enrollment = (
           SELECT en.id FROM enrollments en WHERE en.gateway = rc_findings.gateway
           AND en.cred = rc_findings.cred AND en.status = 'confirmed'
           ORDER BY en.seq DESC LIMIT 1)
       WHERE enrollment IS NULL AND cred IS NOT NULL""",
    """UPDATE rc_findings SET
           permit = coalesce(permit,
               (SELECT en.permit FROM enrollments en
                WHERE en.gateway = rc_findings.gateway AND en.id = rc_findings.enrollment),
               (SELECT r.permit FROM rc_registry r
                WHERE r.permit_hash = rc_findings.permit_hash ORDER BY r.id LIMIT 1)),
           unit = coalesce(unit,
               (SELECT r.unit FROM rc_registry r
                WHERE r.permit_hash = rc_findings.permit_hash
                AND r.building = rc_findings.building ORDER BY r.id LIMIT 1),
               (SELECT en.unit FROM enrollments en
                WHERE en.gateway = rc_findings.gateway AND en.id = rc_findings.enrollment))
       WHERE permit_hash IS NOT NULL OR enrollment IS NOT NULL""",
)

_INSERT_FINDING = ("INSERT INTO rc_findings (rank, kind, building, gateway, cred, "
                   "permit_hash, permit, unit, line, enrollment, detail) ")

_RANK = {kind: rank for rank, kind in enumerate(FINDING_KINDS)}

_FINDINGS: tuple[str, ...] = (
    # unregistered_resident
    _INSERT_FINDING + f"""
    SELECT {_RANK["unregistered_resident"]}, 'unregistered_resident', c.building, c.gateway,
           c.cred, c.permit_hash, NULL, NULL, NULL, c.enrollment,
           json_build_object('source', c.source, 'registered_at',
               (SELECT coalesce(json_agg(DISTINCT r.building), '[]'::json) FROM rc_registry r
                WHERE r.permit_hash = c.permit_hash AND {_ACTIVE}))::text
    FROM rc_cards c
    WHERE NOT EXISTS (SELECT 1 FROM rc_registry r WHERE r.permit_hash = c.permit_hash
                      AND r.building = c.building)""",  # noqa: S608 - constant fragments
    # registry_inactive_but_open
    _INSERT_FINDING + f"""
    SELECT {_RANK["registry_inactive_but_open"]}, 'registry_inactive_but_open', c.building,
           c.gateway, c.cred, c.permit_hash, r.permit, r.unit, r.line, c.enrollment,
           json_build_object('status', CASE WHEN r.status = 'active' THEN 'expired'
                                            ELSE r.status END,
                             'valid_until_day', r.valid_until_day)::text
    FROM rc_cards c JOIN rc_registry r
         ON r.permit_hash = c.permit_hash AND r.building = c.building
    WHERE NOT ({_ACTIVE})""",  # noqa: S608 - constant fragments
    # registered_no_card
    _INSERT_FINDING + f"""
    SELECT {_RANK["registered_no_card"]}, 'registered_no_card', r.building, NULL, NULL,
           r.permit_hash, r.permit, r.unit, r.line, NULL, '{{}}'
    FROM rc_registry r JOIN rc_sites s ON s.site = r.building
    WHERE {_ACTIVE}
      AND NOT EXISTS (SELECT 1 FROM rc_cards c WHERE c.permit_hash = r.permit_hash
                      AND c.building = r.building)""",  # noqa: S608 - constant fragments
    # gateway_silent
    _INSERT_FINDING + f"""
    SELECT {_RANK["gateway_silent"]}, 'gateway_silent', site, id, NULL, NULL, NULL, NULL,
           NULL, NULL, json_build_object('last_seen_ms', nullif(seen, 0), 'state', state)::text
    FROM (SELECT g.id, g.site, g.created_ms, g.status::json ->> 'state' AS state,
                 greatest(CASE WHEN g.status::json ->> 'state' = 'online'
                               THEN coalesce(g.status_ms, 0)
                               ELSE coalesce((g.status::json ->> 'ts_ms')::bigint, 0) END,
                          coalesce((SELECT e.received_ms FROM events e
                                    WHERE e.gateway = g.id ORDER BY e.seq DESC LIMIT 1), 0))
                     AS seen
          FROM gateways g) AS heard
    WHERE greatest(seen, created_ms) < %(silent_before_ms)s""",  # noqa: S608 - constant fragments
    # no_entry_since
    _INSERT_FINDING + f"""
    SELECT {_RANK["no_entry_since"]}, 'no_entry_since', c.building, c.gateway, c.cred,
           c.permit_hash, NULL, NULL, NULL, c.enrollment,
           json_build_object('listed_since_ms', c.since_ms)::text
    FROM rc_cards c
    WHERE c.source = 'list' AND c.since_ms < %(quiet_since_ms)s
      AND NOT EXISTS (SELECT 1 FROM events e WHERE e.gateway = c.gateway
                      AND e.cred = c.prefix AND e.kind = 'access_granted'
                      AND e.direction = 'entry' AND e.ts_ms >= %(quiet_since_ms)s)
      AND NOT EXISTS (SELECT 1 FROM rc_findings f WHERE f.kind = 'gateway_silent'
                      AND f.gateway = c.gateway)""",  # noqa: S608 - constant fragments
    # permit_in_two_buildings: one finding per permit and building (its first card there);
    # the permits come from one aggregate over the cards.
    _INSERT_FINDING + f"""
    SELECT {_RANK["permit_in_two_buildings"]}, 'permit_in_two_buildings', c.building,
           c.gateway, c.cred, c.permit_hash, NULL, NULL, NULL, c.enrollment,
           json_build_object('other_buildings',
               (SELECT coalesce(json_agg(DISTINCT o.building), '[]'::json) FROM rc_cards o
                WHERE o.permit_hash = c.permit_hash AND o.building != c.building))::text
    FROM (SELECT min(x.id) AS id FROM rc_cards x
          WHERE x.permit_hash IN (
              SELECT permit_hash FROM rc_cards WHERE permit_hash IS NOT NULL
              GROUP BY permit_hash HAVING min(building) != max(building))
          GROUP BY x.permit_hash, x.building) AS firsts
         JOIN rc_cards c ON c.id = firsts.id
    ORDER BY c.id""",  # noqa: S608 - constant fragments
    # lease_ended_still_active
    _INSERT_FINDING + f"""
    SELECT {_RANK["lease_ended_still_active"]}, 'lease_ended_still_active', c.building,
           c.gateway, c.cred, c.permit_hash, en.permit, NULL, NULL, en.id,
           json_build_object('lease_end', en.lease_end, 'enrollment_status', en.status)::text
    FROM enrollments en JOIN rc_cards c
         ON c.gateway = en.gateway AND c.cred = en.cred
    WHERE en.lease_end <= %(now_s)s AND en.status != 'rejected'""",  # noqa: S608 - constant fragments
    # list_stale
    _INSERT_FINDING + f"""
    SELECT {_RANK["list_stale"]}, 'list_stale', g.site, g.id, NULL, NULL, NULL, NULL, NULL,
           NULL, json_build_object('list', json_build_array(g.applied_list_version,
                                                            g.list_version),
                                   'rev', json_build_array(g.rev_rep, g.rev_seq),
                                   'all', json_build_array(g.all_rep, a.all_seq))::text
    FROM (SELECT id, site, list_version, applied_list_version, list_published_ms, rev_seq,
                 (status::json #>> '{{versions,rev}}')::bigint AS rev_rep,
                 (status::json #>> '{{versions,all}}')::bigint AS all_rep,
                 (SELECT max(v.revoked_ms) FROM revocations v
                  WHERE v.gateway = gateways.id) AS rev_ms
          FROM gateways) AS g,
         (SELECT (SELECT seq FROM streams WHERE name = 'all') AS all_seq,
                 (SELECT max(revoked_ms) FROM revocations WHERE gateway = '*')
                     AS all_ms) AS a
    WHERE (g.list_version > coalesce(g.applied_list_version, 0)
           AND g.list_published_ms < %(stale_before_ms)s)
       OR (g.rev_rep IS NOT NULL AND g.rev_seq > g.rev_rep
           AND g.rev_ms < %(stale_before_ms)s)
       OR (g.all_rep IS NOT NULL AND a.all_seq > g.all_rep
           AND a.all_ms < %(stale_before_ms)s)""",  # noqa: S608 - constant fragments
)

_ORDER = """
    INSERT INTO rc_report (position, kind, building, gateway, cred, permit_hash, permit,
                           unit, line, enrollment, detail)
    SELECT row_number() OVER (ORDER BY building, rank, id), kind, building, gateway, cred,
           permit_hash, permit, unit, line, enrollment, detail
    FROM rc_findings"""


def _finding(row: Sequence[Any]) -> FindingRecord:
    values = list(row)
    for i in (4, 6):  # cred, permit_hash
        if values[i] is not None:
            values[i] = bytes(values[i])
    return FindingRecord(*values)


def _one(conn: Conn, query: str) -> Any:
    row = conn.execute(cast(Any, query)).fetchone()
    assert row is not None
    return row[0]


def prepare(conn: Conn) -> None:
    """Make a new connection a comparison session: its memory, its temporary tables."""
    for statement in (*SESSION_SETTINGS, *CREATE):
        conn.execute(cast(Any, statement))


class PostgresReconcileSession:
    """A comparison's temporary tables on a connection of its own (``ReconcileSession``)."""

    def __init__(self, conn: Conn, where: str) -> None:
        self._conn = conn
        self._where = where

    @contextlib.contextmanager
    def _tx(self, *, snapshot: bool = False) -> Iterator[Conn]:
        try:
            with self._conn.transaction():
                if snapshot:
                    self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                yield self._conn
        except psycopg.Error as exc:
            raise CentralError(f"{self._where}: {str(exc).strip()}") from exc

    def stage_registry(self, rows: Sequence[RegistryRow]) -> None:
        """Add a batch of registry rows (COPY)."""
        with self._tx() as conn, conn.cursor() as cur, cur.copy(_COPY_ROWS) as copy:
            copy.set_types(_ROW_TYPES)
            for r in rows:
                copy.write_row(registry_row(r))

    def registry_counts(self) -> RegistryCounts:
        """Set aside replaced rows; index the rest; count what was staged."""
        with self._tx() as conn:
            staged = _one(conn, "SELECT count(*) FROM rc_registry")
            duplicates = conn.execute(_SET_ASIDE).rowcount
            conn.execute("CREATE INDEX IF NOT EXISTS rc_registry_permit "
                         "ON rc_registry(permit_hash, building)")
            outside = _one(conn, "SELECT count(*) FROM rc_registry WHERE building NOT IN "
                                 "(SELECT site FROM gateways)")
        return RegistryCounts(int(staged), int(duplicates), int(outside))

    def find(self, params: ReconcileParams) -> int:
        """Every finding, as of one snapshot of the office's tables."""
        values = find_values(params)
        with self._tx(snapshot=True) as conn:
            for table in ("rc_sites", "rc_cards", "rc_findings", "rc_report"):
                conn.execute(cast(Any, f"TRUNCATE {table}"))
            conn.execute("CREATE INDEX IF NOT EXISTS rc_registry_permit "
                         "ON rc_registry(permit_hash, building)")
            conn.execute("INSERT INTO rc_sites SELECT DISTINCT site FROM gateways")
            conn.execute(cast(Any, _LISTED), values)
            for statement in _CARD_INDEXES:
                conn.execute(cast(Any, statement))
            conn.execute(cast(Any, _PROVISIONAL), values)
            conn.execute("ANALYZE rc_registry, rc_sites, rc_cards")  # none has statistics
            for statement in _FINDINGS:
                conn.execute(cast(Any, statement), values)
            for statement in _NAME_FINDINGS:
                conn.execute(cast(Any, statement))
            conn.execute(cast(Any, _ORDER))
            return int(_one(conn, "SELECT count(*) FROM rc_report"))

    def findings(self, after: int, limit: int) -> list[FindingRecord]:
        """The next page of findings in report order."""
        try:
            return [_finding(row) for row in self._conn.execute(
                "SELECT position, kind, building, gateway, cred, permit, permit_hash, unit, "
                "line, enrollment, detail FROM rc_report WHERE position > %s "
                "ORDER BY position LIMIT %s", (after, limit))]
        except psycopg.Error as exc:
            raise CentralError(f"{self._where}: {str(exc).strip()}") from exc

    def building_findings(self) -> list[BuildingFindings]:
        """Findings counted by building and kind."""
        try:
            rows = self._conn.execute(
                "SELECT building, kind, count(*) FROM rc_findings "
                "GROUP BY building, rank, kind ORDER BY building, rank").fetchall()
        except psycopg.Error as exc:
            raise CentralError(f"{self._where}: {str(exc).strip()}") from exc
        return [BuildingFindings(b, k, int(n)) for b, k, n in rows]
