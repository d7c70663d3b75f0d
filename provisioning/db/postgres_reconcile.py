"""The office's PostgreSQL database for the registry comparison, cases and retention: the
SQL of ``OfficeDatabase``'s section "the registry comparison, cases and retention"
(provisioning/db/sqlite_reconcile.py is the SQLite one; the rules are in
provisioning/db/__init__.py).

``PostgresReconcile`` is mixed into ``PostgresOfficeDatabase``. A comparison
(``reconcile_session``) opens a connection of its own and works in temporary tables of
it: PostgreSQL drops them when the connection closes, crash or not, so the registry's
permit numbers never reach the office's tables. ``find`` reads the office's tables in one
``REPEATABLE READ`` transaction (one snapshot) that writes only those temporary tables:
it takes no lock that ``serve`` waits for. The session's tables and SQL are in
provisioning/db/postgres_comparison.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, cast

import psycopg
from psycopg.rows import dict_row

from provisioning.db.postgres_comparison import Conn, PostgresReconcileSession, prepare
from provisioning.db.records import CaseRecord, DailyEntries, FoldResult, StoredEvent
from provisioning.db.rows import case_record, stored_event
from provisioning.errors import CentralError

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
            prepare(conn)
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
            return [case_record(r) for r in cur.execute(
                "SELECT * FROM case_audit ORDER BY id DESC LIMIT %s", (limit,))]

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
        return [stored_event(r) for r in rows]

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

