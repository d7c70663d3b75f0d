"""The office's PostgreSQL database: gateways, their entries, the numbers of every
stream (list versions, ``rev``, ``all``, ``cmd``, ``hb``, ``ack``), what gateways report
(applied, status, resync requests, counters) and the reports on them.

``PostgresGateways`` is mixed into ``PostgresOfficeDatabase`` (provisioning/db/postgres.py,
whose docstring tells how numbers are allocated across instances). ``allocate`` and
``next_version`` serve the enrollments too (postgres_enrollments.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from provisioning.db.postgres_connection import Conn, PostgresConnection
from provisioning.db.records import (
    Allocated,
    AppliedRecord,
    EntryRecord,
    GatewayCounts,
    GatewayRecord,
    HeartbeatState,
    RevokedHash,
    SnapshotContents,
)
from provisioning.db.rows import entry_record, entry_row, returned
from provisioning.db.seqs import next_seq, reported_counters

_GATEWAY_FIELDS = tuple(f.name for f in dataclasses.fields(GatewayRecord))
ENTRY_UPSERT = (
    "INSERT INTO entries (gateway, cred, permit, valid_from, valid_until, doors, schedule, "
    "confirmed_at, updated_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (gateway, cred) DO UPDATE SET permit = excluded.permit, "
    "valid_from = excluded.valid_from, valid_until = excluded.valid_until, "
    "doors = excluded.doors, schedule = excluded.schedule, "
    "confirmed_at = excluded.confirmed_at, updated_ms = excluded.updated_ms")


def allocate(conn: Conn, gateway: str, column: str, now_ms: int) -> Allocated:
    """The next number of a ``gateways`` counter (``next_seq``), read under the row lock
    and written in the caller's transaction."""
    ident = sql.Identifier(column)
    prev = int(returned(conn.execute(sql.SQL(
        "SELECT {} FROM gateways WHERE id = %s FOR UPDATE").format(ident),
        (gateway,)).fetchone(), gateway)[0])
    seq = next_seq(prev, now_ms)
    conn.execute(sql.SQL("UPDATE gateways SET {} = %s WHERE id = %s").format(ident),
                 (seq, gateway))
    return Allocated(seq, prev)


def next_version(conn: Conn, gateway: str, published_ms: int) -> Allocated:
    """The next list version (``allocate``), published now."""
    allocated = allocate(conn, gateway, "list_version", published_ms)
    conn.execute("UPDATE gateways SET list_published_ms = %s WHERE id = %s",
                 (published_ms, gateway))
    return allocated


class PostgresGateways(PostgresConnection):
    """Gateways, entries, stream numbers and reports (mixed into
    ``PostgresOfficeDatabase``)."""

    # -- gateways and enrollment ----------------------------------------------------

    def add_gateway(self, gateway: str, site: str, site_key_path: str, acked_upto: int,
                    created_ms: int) -> bool:
        """Register a gateway; False (nothing changed) when the id exists already."""
        with self._read() as conn:
            return conn.execute(
                "INSERT INTO gateways (id, site, site_key_path, acked_upto, created_ms) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (gateway, site, site_key_path, acked_upto, created_ms)).rowcount == 1

    @staticmethod
    def _gateway_query(conn: Conn, where_sql: str, params: Sequence[Any]
                       ) -> list[GatewayRecord]:
        columns = sql.SQL(", ").join(sql.Identifier(f) for f in _GATEWAY_FIELDS)
        query = sql.SQL("SELECT {} FROM gateways ").format(columns) + sql.SQL(
            cast(Any, where_sql))
        with conn.cursor(row_factory=dict_row) as cur:
            return [GatewayRecord(**r) for r in cur.execute(query, params)]

    def gateway(self, gateway: str) -> GatewayRecord | None:
        """One gateway, or None when it is not registered."""
        with self._read() as conn:
            rows = self._gateway_query(conn, "WHERE id = %s", [gateway])
        return rows[0] if rows else None

    def gateways(self) -> list[GatewayRecord]:
        """Every gateway, by id."""
        with self._read() as conn:
            return self._gateway_query(conn, "ORDER BY id", [])

    def gateway_ids(self) -> list[str]:
        """Every gateway id, sorted."""
        with self._read() as conn:
            return [r[0] for r in conn.execute("SELECT id FROM gateways ORDER BY id")]

    def put_entries(self, gateway: str, entries: Sequence[EntryRecord]) -> None:
        """Store (or replace, by credential hash) entries of ``gateway``, all at once."""
        with self._tx() as conn, conn.cursor() as cur:
            cur.executemany(ENTRY_UPSERT, [entry_row(gateway, e) for e in entries])

    def delete_entry(self, gateway: str, cred: bytes) -> bool:
        """Delete one entry; False when there was none."""
        with self._read() as conn:
            return bool(conn.execute("DELETE FROM entries WHERE gateway = %s AND cred = %s",
                                     (gateway, cred)).rowcount)

    def entries(self, gateway: str) -> list[EntryRecord]:
        """The entries of ``gateway`` by credential hash."""
        with self._read() as conn:
            return self._entries(conn, gateway)

    @staticmethod
    def _entries(conn: Conn, gateway: str) -> list[EntryRecord]:
        with conn.cursor(row_factory=dict_row) as cur:
            return [entry_record(r) for r in cur.execute(
                "SELECT * FROM entries WHERE gateway = %s ORDER BY cred", (gateway,))]

    def revocations(self, gateway: str) -> list[RevokedHash]:
        """Its own and the global revocations, each once, by kind and hash."""
        with self._read() as conn:
            return self._revocations(conn, gateway)

    @staticmethod
    def _revocations(conn: Conn, gateway: str) -> list[RevokedHash]:
        return [(r[0], bytes(r[1])) for r in conn.execute(
            "SELECT kind, hash FROM revocations WHERE gateway IN (%s, '*') "
            "GROUP BY kind, hash ORDER BY kind, hash", (gateway,))]

    # -- publishing ------------------------------------------------------------------

    @staticmethod
    def _all_seq(conn: Conn, *, lock: bool) -> int:
        # FOR SHARE: a broadcast revocation (which updates this row) commits before or
        # after this transaction, never between its reads.
        row = conn.execute("SELECT seq FROM streams WHERE name = 'all' FOR SHARE" if lock
                           else "SELECT seq FROM streams WHERE name = 'all'").fetchone()
        assert row is not None
        return int(row[0])

    def allocate_snapshot(self, gateway: str, published_ms: int, *,
                          resync: bool) -> SnapshotContents:
        """The next list version with what it carries, read in the same transaction."""
        self._turn(gateway)
        with self._tx() as conn:
            version = allocate(conn, gateway, "list_version", published_ms).seq
            rev_seq = returned(conn.execute(
                "UPDATE gateways SET list_published_ms = %s, "
                "resync_answered_ms = CASE WHEN %s THEN %s ELSE resync_answered_ms END "
                "WHERE id = %s RETURNING rev_seq",
                (published_ms, resync, published_ms, gateway)).fetchone(), gateway)[0]
            all_seq = self._all_seq(conn, lock=True)
            entries = self._entries(conn, gateway)
            revoked = self._revocations(conn, gateway)
        return SnapshotContents(int(version), int(rev_seq), all_seq, entries, revoked)

    def allocate_delta(self, gateway: str, upsert: Sequence[bytes], published_ms: int
                       ) -> tuple[Allocated, list[EntryRecord]] | None:
        """The next list version and the entries to upsert; None when one is missing."""
        self._turn(gateway)
        with self._tx() as conn:
            rows: list[EntryRecord] = []
            with conn.cursor(row_factory=dict_row) as cur:
                for cred in upsert:
                    found = cur.execute("SELECT * FROM entries WHERE gateway = %s AND "
                                        "cred = %s", (gateway, cred)).fetchone()
                    if found is None:
                        return None  # nothing written: the version stays unspent
                    rows.append(entry_record(found))
            version = next_version(conn, gateway, published_ms)
        return version, rows

    def allocate_revocation(self, target: str, items: Sequence[RevokedHash],
                            revoked_ms: int) -> Allocated:
        """Record revocations at ``target`` (or ``*``); returns the stream seq and the one
        before it."""
        self._turn(target)
        with self._tx() as conn:
            if target == "*":
                row = conn.execute("SELECT seq FROM streams WHERE name = 'all' FOR UPDATE"
                                   ).fetchone()
                assert row is not None
                allocated = Allocated(next_seq(int(row[0]), revoked_ms), int(row[0]))
                conn.execute("UPDATE streams SET seq = %s WHERE name = 'all'",
                             (allocated.seq,))
            else:
                allocated = allocate(conn, target, "rev_seq", revoked_ms)
            seq = allocated.seq
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO revocations VALUES (%s, %s, %s, %s, %s) ON CONFLICT "
                    "(gateway, kind, hash) DO UPDATE SET seq = excluded.seq, "
                    "revoked_ms = excluded.revoked_ms",
                    [(target, kind, digest, seq, revoked_ms) for kind, digest in items])
        return allocated

    def allocate_command(self, gateway: str, now_ms: int) -> int:
        """The next ``cmd`` seq."""
        self._turn(gateway)
        with self._tx() as conn:
            return allocate(conn, gateway, "cmd_seq", now_ms).seq

    def allocate_heartbeat(self, gateway: str, now_ms: int) -> HeartbeatState:
        """The next ``hb`` seq and the versions it vouches for."""
        self._turn(gateway)
        with self._tx() as conn:
            seq = allocate(conn, gateway, "hb_seq", now_ms).seq
            version, rev_seq = returned(conn.execute(
                "SELECT list_version, rev_seq FROM gateways WHERE id = %s",
                (gateway,)).fetchone(), gateway)
            all_seq = self._all_seq(conn, lock=True)
        return HeartbeatState(seq, int(version), int(rev_seq), all_seq)

    def allocate_ack(self, gateway: str, now_ms: int) -> int:
        """The next ``ack`` seq. Acks are in no order, so no turn; and a gateway checks
        neither their order nor replays, so this commit does not wait for the disk
        (``synchronous_commit`` off on a connection of its own): a server crash may hand
        out an ack seq again, which no gateway minds, and the batch's own commit
        (``store_events``) does wait. One flush per batch instead of two: a durable
        commit costs about 5 ms on this project's machine."""
        conn: Conn | None = getattr(self._local, "ack_conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = self.connect(synchronous=False)
            self._local.ack_conn = conn
        try:
            with conn.transaction():
                return allocate(conn, gateway, "ack_seq", now_ms).seq
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    # -- what gateways report ------------------------------------------------------------

    def record_applied(self, gateway: str, applied: AppliedRecord) -> None:
        """Keep a gateway's report on one stream and its list version as reported."""
        a = applied
        with self._tx() as conn:
            conn.execute("INSERT INTO applied VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                         "ON CONFLICT (gateway, stream) DO UPDATE SET seq = excluded.seq, "
                         "status = excluded.status, reason = excluded.reason, "
                         "list_version = excluded.list_version, ts_ms = excluded.ts_ms, "
                         "received_ms = excluded.received_ms",
                         (gateway, a.stream, a.seq, a.status, a.reason, a.list_version,
                          a.ts_ms, a.received_ms))
            conn.execute("UPDATE gateways SET applied_list_version = %s, applied_ms = %s "
                         "WHERE id = %s", (a.list_version, a.received_ms, gateway))

    def record_status(self, gateway: str, status_json: str, list_version: int | None,
                      received_ms: int) -> None:
        """Keep a gateway's status and, when it names one, its list version."""
        with self._read() as conn:
            conn.execute(
                "UPDATE gateways SET status = %s, status_ms = %s, "
                "applied_list_version = coalesce(%s, applied_list_version), "
                "applied_ms = CASE WHEN %s::bigint IS NULL THEN applied_ms ELSE %s END "
                "WHERE id = %s",
                (status_json, received_ms, list_version, list_version, received_ms, gateway))

    def record_resync_request(self, gateway: str, reason: str,
                              requested_ms: int) -> int | None:
        """Note a resync request; returns when the last one was answered, if ever."""
        with self._read() as conn:
            answered: int | None = returned(conn.execute(
                "UPDATE gateways SET resync_requested_ms = %s, resync_reason = %s "
                "WHERE id = %s RETURNING resync_answered_ms",
                (requested_ms, reason, gateway)).fetchone(), gateway)[0]
        return answered

    def raise_counters(self, gateway: str, versions: Mapping[str, int], now_ms: int) -> None:
        """Raise the counters to what the gateway reports having stored, never lower (a
        row none is below is not written, nor locked)."""
        reported = reported_counters(versions, now_ms)
        columns = [sql.Identifier(c) for c in sorted(reported.gateway)]
        values = [reported.gateway[c] for c in sorted(reported.gateway)]
        with self._tx() as conn:
            conn.execute(sql.SQL("UPDATE gateways SET {} WHERE id = %s AND ({})").format(
                sql.SQL(", ").join(sql.SQL("{0} = GREATEST({0}, %s)").format(c)
                                   for c in columns),
                sql.SQL(" OR ").join(sql.SQL("{} < %s").format(c) for c in columns)),
                (*values, gateway, *values))
            conn.execute("UPDATE streams SET seq = %s WHERE name = 'all' AND seq < %s",
                         (reported.all, reported.all))

    def count_malformed(self, gateway: str) -> None:
        """One more malformed message from a registered gateway."""
        with self._read() as conn:
            conn.execute("UPDATE gateways SET malformed = malformed + 1 WHERE id = %s",
                         (gateway,))

    def count_unknown_gateway_message(self) -> None:
        """One more message from a gateway that is not registered."""
        with self._read() as conn:
            conn.execute("INSERT INTO meta VALUES ('unknown_gateway_messages', '1') ON "
                         "CONFLICT (key) DO UPDATE SET value = "
                         "(meta.value::bigint + 1)::text")

    # -- reports -----------------------------------------------------------------------

    def all_seq(self) -> int:
        """The broadcast revocation stream's seq."""
        with self._read() as conn:
            return self._all_seq(conn, lock=False)

    def global_revocation_count(self) -> int:
        """How many revocations apply at every gateway."""
        with self._read() as conn:
            row = conn.execute("SELECT count(*) FROM revocations WHERE gateway = '*'"
                               ).fetchone()
        assert row is not None
        return int(row[0])

    def unknown_gateway_messages(self) -> int:
        """How many messages came from gateways that are not registered."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'unknown_gateway_messages'"
                               ).fetchone()
        return int(row[0]) if row else 0

    def applied(self, gateway: str) -> list[AppliedRecord]:
        """The gateway's last report on each stream, by stream."""
        with self._read() as conn:
            return [AppliedRecord(*r) for r in conn.execute(
                "SELECT stream, seq, status, reason, list_version, ts_ms, received_ms "
                "FROM applied WHERE gateway = %s ORDER BY stream", (gateway,))]

    def counts(self, gateway: str) -> GatewayCounts:
        """How many entries, own revocations and events the office holds for it (the
        events counted as they are stored, not by reading every partition)."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM entries WHERE gateway = g.id), "
                "(SELECT count(*) FROM revocations WHERE gateway = g.id), "
                "g.event_count, g.highest_seq FROM gateways g WHERE g.id = %s",
                (gateway,)).fetchone()
        if row is None:
            return GatewayCounts(0, 0, 0, None)
        return GatewayCounts(int(row[0]), int(row[1]), int(row[2]), row[3])
