"""The office's PostgreSQL database for the registry comparison, cases and retention: the
SQL of ``OfficeDatabase``'s section "the registry comparison, cases and retention"
(provisioning/db/sqlite_reconcile.py is the SQLite one; the rules are in
provisioning/db/__init__.py).

``PostgresReconcile`` is mixed into ``PostgresOfficeDatabase``. A comparison
(``reconcile_session``) opens a connection of its own and works in temporary tables of
it: PostgreSQL drops them when the connection closes, crash or not, so the registry's
permit numbers never reach the office's tables. ``find`` reads the office's tables in one
``REPEATABLE READ`` transaction (one snapshot) that writes only those temporary tables:
it takes no lock that ``serve`` waits for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, cast

import psycopg
from psycopg.rows import dict_row

from provisioning.db import (
    FINDING_KINDS,
    BuildingFindings,
    CaseRecord,
    DailyEntries,
    EventRecord,
    FindingRecord,
    FoldResult,
    ReconcileParams,
    RegistryCounts,
    RegistryRow,
    StoredEvent,
)
from provisioning.errors import CentralError

Conn = psycopg.Connection[tuple[Any, ...]]

_CREATE = (
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
        permit TEXT,
        source TEXT NOT NULL,
        enrollment TEXT,
        unit TEXT,
        since_ms BIGINT NOT NULL)""",
    "CREATE INDEX rc_cards_card ON rc_cards(gateway, cred)",
    "CREATE INDEX rc_cards_permit ON rc_cards(permit_hash, building)",
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

_INSERT_ROW = (
    "INSERT INTO rc_registry (line, permit, permit_hash, building, unit, status, "
    "registered_day, valid_until_day) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")

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

_INSERT_CARD = ("INSERT INTO rc_cards (gateway, building, cred, prefix, permit_hash, "
                "source, enrollment, since_ms) ")
_PREFIX = "encode(substring({t}.cred FROM 1 FOR 5), 'hex')"

_LISTED = _INSERT_CARD + """
    SELECT e.gateway, g.site, e.cred, """ + _PREFIX.format(t="e") + """, e.permit, 'list',
           (SELECT en.id FROM enrollments en WHERE en.gateway = e.gateway
            AND en.cred = e.cred AND en.status = 'confirmed' ORDER BY en.seq DESC LIMIT 1),
           coalesce(e.confirmed_at * 1000, e.updated_ms)
    FROM entries e JOIN gateways g ON g.id = e.gateway
    WHERE (e.valid_from IS NULL OR e.valid_from <= %(now_s)s)
      AND (e.valid_until IS NULL OR e.valid_until > %(now_s)s)
      AND """ + _NOT_REVOKED.format(t="e", permit="permit")  # noqa: S608 - constant fragments

_PROVISIONAL = _INSERT_CARD + """
    SELECT en.gateway, g.site, en.cred, """ + _PREFIX.format(t="en") + """, en.permit_hash,
           'provisional', en.id, en.received_ms
    FROM enrollments en JOIN gateways g ON g.id = en.gateway
    WHERE en.status IN ('received', 'held') AND en.cred IS NOT NULL
      AND en.provisional_until > %(now_s)s AND en.lease_end > %(now_s)s
      AND NOT EXISTS (SELECT 1 FROM rc_cards c WHERE c.gateway = en.gateway
                      AND c.cred = en.cred)
      AND """ + _NOT_REVOKED.format(t="en", permit="permit_hash")  # noqa: S608 - constant fragments

_NAME_CARDS = """
    UPDATE rc_cards SET
        permit = coalesce(
            (SELECT en.permit FROM enrollments en
             WHERE en.gateway = rc_cards.gateway AND en.id = rc_cards.enrollment),
            (SELECT r.permit FROM rc_registry r
             WHERE r.permit_hash = rc_cards.permit_hash ORDER BY r.id LIMIT 1)),
        unit = coalesce(
            (SELECT r.unit FROM rc_registry r WHERE r.permit_hash = rc_cards.permit_hash
             AND r.building = rc_cards.building ORDER BY r.id LIMIT 1),
            (SELECT en.unit FROM enrollments en
             WHERE en.gateway = rc_cards.gateway AND en.id = rc_cards.enrollment))"""

_INSERT_FINDING = ("INSERT INTO rc_findings (rank, kind, building, gateway, cred, "
                   "permit_hash, permit, unit, line, enrollment, detail) ")

_RANK = {kind: rank for rank, kind in enumerate(FINDING_KINDS)}

_FINDINGS: tuple[str, ...] = (
    # unregistered_resident
    _INSERT_FINDING + f"""
    SELECT {_RANK["unregistered_resident"]}, 'unregistered_resident', c.building, c.gateway,
           c.cred, c.permit_hash, c.permit, c.unit, NULL, c.enrollment,
           json_build_object('source', c.source, 'registered_at',
               (SELECT coalesce(json_agg(DISTINCT r.building), '[]'::json) FROM rc_registry r
                WHERE r.permit_hash = c.permit_hash AND {_ACTIVE}))::text
    FROM rc_cards c
    WHERE NOT EXISTS (SELECT 1 FROM rc_registry r WHERE r.permit_hash = c.permit_hash
                      AND r.building = c.building)""",  # noqa: S608 - constant fragments
    # registry_inactive_but_open
    _INSERT_FINDING + f"""
    SELECT {_RANK["registry_inactive_but_open"]}, 'registry_inactive_but_open', c.building,
           c.gateway, c.cred, c.permit_hash, r.permit, coalesce(r.unit, c.unit), r.line,
           c.enrollment,
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
           c.permit_hash, c.permit, c.unit, NULL, c.enrollment,
           json_build_object('listed_since_ms', c.since_ms)::text
    FROM rc_cards c
    WHERE c.source = 'list' AND c.since_ms < %(quiet_since_ms)s
      AND NOT EXISTS (SELECT 1 FROM events e WHERE e.gateway = c.gateway
                      AND e.cred = c.prefix AND e.kind = 'access_granted'
                      AND e.direction = 'entry' AND e.ts_ms >= %(quiet_since_ms)s)
      AND NOT EXISTS (SELECT 1 FROM rc_findings f WHERE f.kind = 'gateway_silent'
                      AND f.gateway = c.gateway)""",  # noqa: S608 - constant fragments
    # permit_in_two_buildings
    _INSERT_FINDING + f"""
    SELECT {_RANK["permit_in_two_buildings"]}, 'permit_in_two_buildings', c.building,
           c.gateway, c.cred, c.permit_hash, c.permit, c.unit, NULL, c.enrollment,
           json_build_object('other_buildings',
               (SELECT coalesce(json_agg(DISTINCT o.building), '[]'::json) FROM rc_cards o
                WHERE o.permit_hash = c.permit_hash AND o.building != c.building))::text
    FROM rc_cards c
    WHERE c.permit_hash IS NOT NULL
      AND c.id = (SELECT min(x.id) FROM rc_cards x WHERE x.permit_hash = c.permit_hash
                  AND x.building = c.building)
      AND EXISTS (SELECT 1 FROM rc_cards o WHERE o.permit_hash = c.permit_hash
                  AND o.building != c.building)""",  # noqa: S608 - constant fragments
    # lease_ended_still_active
    _INSERT_FINDING + f"""
    SELECT {_RANK["lease_ended_still_active"]}, 'lease_ended_still_active', c.building,
           c.gateway, c.cred, c.permit_hash, coalesce(en.permit, c.permit),
           coalesce(c.unit, en.unit), NULL, en.id,
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

_DAY = "(ts_ms / 1000 + %(offset_s)s) / 86400"
_ENTRY = "kind = 'access_granted' AND direction = 'entry'"

_FOLD = f"""
    INSERT INTO daily_counts (gateway, day, entries, exits, denied, other)
    SELECT gateway, {_DAY},
           sum(CASE WHEN {_ENTRY} THEN 1 ELSE 0 END),
           sum(CASE WHEN kind = 'access_granted' AND direction = 'exit' THEN 1 ELSE 0 END),
           sum(CASE WHEN kind = 'access_denied' THEN 1 ELSE 0 END),
           sum(CASE WHEN kind = 'access_denied' OR (kind = 'access_granted'
                    AND direction IN ('entry', 'exit')) THEN 0 ELSE 1 END)
    FROM events WHERE gateway = %(gateway)s AND seq > %(after)s AND seq <= %(end)s
    GROUP BY gateway, {_DAY}
    ON CONFLICT (gateway, day) DO UPDATE SET
        entries = daily_counts.entries + excluded.entries,
        exits = daily_counts.exits + excluded.exits,
        denied = daily_counts.denied + excluded.denied,
        other = daily_counts.other + excluded.other"""  # noqa: S608 - constant fragments


def _finding(row: Sequence[Any]) -> FindingRecord:
    values = list(row)
    for i in (4, 6):  # cred, permit_hash
        if values[i] is not None:
            values[i] = bytes(values[i])
    return FindingRecord(*values)


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
        """Add a batch of registry rows."""
        with self._tx() as conn, conn.cursor() as cur:
            cur.executemany(_INSERT_ROW, [
                (r.line, r.permit, r.permit_hash, r.building, r.unit, r.status,
                 r.registered_day, r.valid_until_day) for r in rows])

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
        values = {"now_s": params.now_ms // 1000, "today": params.today,
                  "quiet_since_ms": params.quiet_since_ms,
                  "silent_before_ms": params.silent_before_ms,
                  "stale_before_ms": params.stale_before_ms}
        with self._tx(snapshot=True) as conn:
            for table in ("rc_sites", "rc_cards", "rc_findings", "rc_report"):
                conn.execute(cast(Any, f"TRUNCATE {table}"))
            conn.execute("CREATE INDEX IF NOT EXISTS rc_registry_permit "
                         "ON rc_registry(permit_hash, building)")
            conn.execute("INSERT INTO rc_sites SELECT DISTINCT site FROM gateways")
            conn.execute(cast(Any, _LISTED), values)
            conn.execute(cast(Any, _PROVISIONAL), values)
            conn.execute(cast(Any, _NAME_CARDS))
            conn.execute("ANALYZE rc_cards")
            for statement in _FINDINGS:
                conn.execute(cast(Any, statement), values)
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


def _one(conn: Conn, query: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
    row = conn.execute(cast(Any, query), params).fetchone()
    assert row is not None
    return row[0]


class _Host(Protocol):
    """What the mixin needs of ``PostgresOfficeDatabase``."""

    where: str

    def connect(self, *, synchronous: bool = True) -> Conn:
        """A new autocommit connection."""
        ...

    def _tx(self) -> contextlib.AbstractContextManager[Conn]:
        """One transaction, errors as ``CentralError``."""
        ...

    def _read(self) -> contextlib.AbstractContextManager[Conn]:
        """Statements outside a transaction, errors as ``CentralError``."""
        ...

    def _forget_events(self, conn: Conn, gateway: str, end: int, deleted: int) -> None:
        """What the gateway row knows of the stored events, after a fold deleted them."""
        ...


class PostgresReconcile:
    """The comparison, cases and retention on PostgreSQL (mixed into
    ``PostgresOfficeDatabase``)."""

    @contextlib.contextmanager
    def reconcile_session(self: _Host) -> Iterator[PostgresReconcileSession]:
        """A comparison on a connection of its own; its temporary tables go with it."""
        conn = self.connect()
        try:
            for statement in _CREATE:
                conn.execute(cast(Any, statement))
        except psycopg.Error as exc:
            conn.close()
            raise CentralError(f"{self.where}: {str(exc).strip()}") from exc
        try:
            yield PostgresReconcileSession(conn, self.where)
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    # -- entries per day ---------------------------------------------------------------

    def daily_entries(self: _Host, from_day: int, offset_s: int,
                      gateways: Sequence[str] | None = None) -> list[DailyEntries]:
        """Granted entries per day (and per gateway when ``gateways`` names them)."""
        values: dict[str, Any] = {"from_day": from_day, "offset_s": offset_s,
                                  "from_ms": (from_day * 86_400 - offset_s) * 1000,
                                  "gateways": list(gateways or [])}
        if gateways is None:
            query = f"""
                SELECT '*', day, sum(n) FROM (
                    SELECT day, entries AS n FROM daily_counts WHERE day >= %(from_day)s
                    UNION ALL
                    SELECT {_DAY} AS day, count(*) FROM events
                    WHERE {_ENTRY} AND ts_ms >= %(from_ms)s GROUP BY 1) AS counted
                GROUP BY day HAVING sum(n) > 0 ORDER BY day"""  # noqa: S608 - constant fragments
        else:
            chosen = "gateway = ANY(%(gateways)s)"
            query = f"""
                SELECT gateway, day, sum(n) FROM (
                    SELECT gateway, day, entries AS n FROM daily_counts
                    WHERE day >= %(from_day)s AND {chosen}
                    UNION ALL
                    SELECT gateway, {_DAY} AS day, count(*) FROM events
                    WHERE {_ENTRY} AND ts_ms >= %(from_ms)s AND {chosen} GROUP BY 1, 2
                    ) AS counted
                GROUP BY gateway, day HAVING sum(n) > 0 ORDER BY gateway, day"""  # noqa: S608 - constant fragments
        with self._read() as conn:
            return [DailyEntries(g, int(d), int(n))
                    for g, d, n in conn.execute(cast(Any, query), values).fetchall()]

    def entries_by_gateway(self: _Host, from_day: int, offset_s: int) -> dict[str, int]:
        """Granted entries per gateway from ``from_day`` on."""
        values = {"from_day": from_day, "from_ms": (from_day * 86_400 - offset_s) * 1000}
        with self._read() as conn:
            return {g: int(n) for g, n in conn.execute(cast(Any, f"""
                SELECT gateway, sum(n) FROM (
                    SELECT gateway, entries AS n FROM daily_counts WHERE day >= %(from_day)s
                    UNION ALL
                    SELECT gateway, count(*) FROM events WHERE {_ENTRY}
                    AND ts_ms >= %(from_ms)s GROUP BY gateway) AS counted
                GROUP BY gateway ORDER BY gateway"""), values).fetchall()}  # noqa: S608 - constant fragments

    # -- cases -------------------------------------------------------------------------

    def record_case(self: _Host, record: CaseRecord) -> int:
        """Add a record to the case audit; its id."""
        with self._read() as conn:
            return int(_one(
                conn, "INSERT INTO case_audit (at_ms, officer, reason, scope, permit_hash, "
                      "shown) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                (record.at_ms, record.officer, record.reason, record.scope,
                 record.permit_hash, record.shown)))

    def case_records(self: _Host, limit: int) -> list[CaseRecord]:
        """The newest case audit records, newest first."""
        with self._read() as conn, conn.cursor(row_factory=dict_row) as cur:
            return [CaseRecord(r["at_ms"], r["officer"], r["reason"], r["scope"],
                               None if r["permit_hash"] is None else bytes(r["permit_hash"]),
                               r["shown"], r["id"])
                    for r in cur.execute("SELECT * FROM case_audit ORDER BY id DESC "
                                         "LIMIT %s", (limit,))]

    def permit_cards(self: _Host, permit_hash: bytes) -> list[tuple[str, bytes]]:
        """Every (gateway, card) the office knows for a permit."""
        with self._read() as conn:
            return [(g, bytes(c)) for g, c in conn.execute(
                "SELECT gateway, cred FROM entries WHERE permit = %s UNION "
                "SELECT gateway, cred FROM enrollments WHERE permit_hash = %s AND "
                "cred IS NOT NULL ORDER BY 1, 2", (permit_hash, permit_hash)).fetchall()]

    def card_events(self: _Host, gateway: str, cred_prefix: str, since_ms: int,
                    limit: int) -> list[StoredEvent]:
        """One card's access events at one gateway, the newest ``limit``, oldest first."""
        with self._read() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = list(cur.execute(
                "SELECT * FROM events WHERE gateway = %s AND cred = %s AND kind IN "
                "('access_granted', 'access_denied') AND ts_ms >= %s ORDER BY seq DESC "
                "LIMIT %s", (gateway, cred_prefix, since_ms, limit)))
        rows.reverse()
        return [StoredEvent(EventRecord(
            r["seq"], r["event_id"], r["ts_ms"], r["kind"], r["door"], r["reader"],
            r["direction"], r["reason"], r["cred"], r["data"], r["prev_hash"], r["hash"],
            r["attachment"]), r["received_ms"]) for r in rows]

    # -- retention ---------------------------------------------------------------------

    def fold_events(self: _Host, gateway: str, before_ms: int, offset_s: int,
                    limit: int) -> FoldResult:
        """One retention step at one gateway (see ``OfficeDatabase.fold_events``)."""
        with self._tx() as conn:
            row = conn.execute("SELECT acked_upto, tenant_upto FROM gateways WHERE id = %s "
                               "FOR UPDATE", (gateway,)).fetchone()
            if row is None:
                raise CentralError(f"gateway {gateway!r}: not in the database")
            upto, tenant_upto = int(row[0]), int(row[1])
            pending = _one(conn, "SELECT min(seq) FROM tenant_event_keys WHERE gateway = %s "
                                 "AND seq > %s", (gateway, tenant_upto))
            if pending is not None:
                upto = min(upto, int(pending) - 1)
            found = conn.execute(
                "SELECT min(seq), max(seq), count(*) FROM (SELECT seq FROM events "
                "WHERE gateway = %s AND seq <= %s ORDER BY seq LIMIT %s) AS oldest",
                (gateway, upto, limit)).fetchone()
            assert found is not None
            lowest, window_end, count = found
            if not count:
                return FoldResult(0, 0, more=False)
            recent = _one(conn, "SELECT min(seq) FROM events WHERE gateway = %s AND seq "
                                "BETWEEN %s AND %s AND ts_ms >= %s",
                          (gateway, lowest, window_end, before_ms))
            end = int(window_end) if recent is None else int(recent) - 1
            if end < lowest:
                return FoldResult(0, 0, more=False)
            before = conn.execute("SELECT upto FROM folded WHERE gateway = %s",
                                  (gateway,)).fetchone()
            after = max(int(before[0]) if before else 0, int(lowest) - 1)
            folded = _one(conn, "SELECT count(*) FROM events WHERE gateway = %s AND "
                                "seq > %s AND seq <= %s", (gateway, after, end))
            conn.execute(cast(Any, _FOLD), {"gateway": gateway, "after": after, "end": end,
                                            "offset_s": offset_s})
            deleted = conn.execute("DELETE FROM events WHERE gateway = %s AND seq <= %s",
                                   (gateway, end)).rowcount
            conn.execute("INSERT INTO folded VALUES (%s, %s) ON CONFLICT (gateway) DO "
                         "UPDATE SET upto = greatest(folded.upto, excluded.upto)",
                         (gateway, end))
            self._forget_events(conn, gateway, end, deleted)
        return FoldResult(int(folded), int(deleted),
                          more=recent is None and int(count) == limit)

    def erase_ended_permits(self: _Host, before_ms: int) -> int:
        """Drop the permit number and hash of enrollments rejected or ended long ago."""
        with self._read() as conn:
            return int(conn.execute(
                "UPDATE enrollments SET permit = NULL, permit_hash = NULL "
                "WHERE status IN ('rejected', 'ended') "
                "AND coalesce(ended_ms, decided_ms, received_ms) < %s "
                "AND (permit IS NOT NULL OR permit_hash IS NOT NULL)",
                (before_ms,)).rowcount)

