"""``central.db``: gateways, their entries, the numbers of every stream (list versions,
``rev``, ``all``, ``cmd``, ``hb``, ``ack``), what gateways report (applied, status,
resync requests, counters) and the reports on them.

``SqliteGateways`` is mixed into ``SqliteOfficeDatabase`` (provisioning/db/sqlite.py).
``allocate`` and ``next_version`` serve the enrollments too (sqlite_enrollments.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

import sqlite_utils

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
from provisioning.db.seqs import GATEWAY_COUNTERS, next_seq, reported_counters
from provisioning.db.sqlite_connection import SqliteConnection

_COUNTERS = frozenset(GATEWAY_COUNTERS.values()) | {"ack_seq"}
_REPORTED = sorted(set(GATEWAY_COUNTERS.values()))
_RAISE_COUNTERS = "UPDATE gateways SET {} WHERE id = :id AND ({})".format(  # noqa: S608
    ", ".join(f"{c} = max({c}, :{c})" for c in _REPORTED),
    " OR ".join(f"{c} < :{c}" for c in _REPORTED))
"""Raises every reported counter that is below (a row none is below is not written)."""


def allocate(conn: sqlite3.Connection, gateway: str, column: str, now_ms: int
             ) -> Allocated:
    """The next number of a ``gateways`` counter (``next_seq``), stored in this write
    transaction (BEGIN IMMEDIATE: no other writer in between)."""
    assert column in _COUNTERS  # a name in this package's code, never input
    prev = int(returned(conn.execute(
        f"SELECT {column} FROM gateways WHERE id = ?",  # noqa: S608 - a constant name
        (gateway,)).fetchone(), gateway)[0])
    seq = next_seq(prev, now_ms)
    conn.execute(f"UPDATE gateways SET {column} = ? WHERE id = ?",  # noqa: S608 - as above
                 (seq, gateway))
    return Allocated(seq, prev)


def _allocate_all(conn: sqlite3.Connection, now_ms: int) -> Allocated:
    """The next seq of the ``all`` stream (``next_seq``)."""
    prev = int(conn.execute("SELECT seq FROM streams WHERE name = 'all'").fetchone()[0])
    seq = next_seq(prev, now_ms)
    conn.execute("UPDATE streams SET seq = ? WHERE name = 'all'", (seq,))
    return Allocated(seq, prev)


def next_version(conn: sqlite3.Connection, gateway: str, published_ms: int) -> Allocated:
    """The next list version (``allocate``), published now."""
    allocated = allocate(conn, gateway, "list_version", published_ms)
    conn.execute("UPDATE gateways SET list_published_ms = ? WHERE id = ?",
                 (published_ms, gateway))
    return allocated


class SqliteGateways(SqliteConnection):
    """Gateways, entries, stream numbers and reports (mixed into
    ``SqliteOfficeDatabase``)."""

    # -- gateways and enrollment ----------------------------------------------------

    def add_gateway(self, gateway: str, site: str, site_key_path: str, acked_upto: int,
                    created_ms: int) -> bool:
        """Register a gateway; False (nothing changed) when the id exists already."""
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM gateways WHERE id = ?", (gateway,)).fetchone():
                return False
            conn.execute("INSERT INTO gateways (id, site, site_key_path, acked_upto, "
                         "created_ms) VALUES (?,?,?,?,?)",
                         (gateway, site, site_key_path, acked_upto, created_ms))
        return True

    def gateway(self, gateway: str) -> GatewayRecord | None:
        """One gateway, or None when it is not registered."""
        with self._read() as db:
            rows = list(db.query("SELECT * FROM gateways WHERE id = ?", [gateway]))
        return GatewayRecord(**rows[0]) if rows else None

    def gateways(self) -> list[GatewayRecord]:
        """Every gateway, by id."""
        with self._read() as db:
            return [GatewayRecord(**r) for r in db.query("SELECT * FROM gateways ORDER BY id")]

    def gateway_ids(self) -> list[str]:
        """Every gateway id, sorted."""
        with self._read() as db:
            return [r["id"] for r in db.query("SELECT id FROM gateways ORDER BY id")]

    def put_entries(self, gateway: str, entries: Sequence[EntryRecord]) -> None:
        """Store (or replace, by credential hash) entries of ``gateway``, all at once."""
        with self._tx() as conn:
            conn.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?)",
                             [entry_row(gateway, e) for e in entries])

    def delete_entry(self, gateway: str, cred: bytes) -> bool:
        """Delete one entry; False when there was none."""
        with self._tx() as conn:
            return bool(conn.execute("DELETE FROM entries WHERE gateway = ? AND cred = ?",
                                     (gateway, cred)).rowcount)

    def entries(self, gateway: str) -> list[EntryRecord]:
        """The entries of ``gateway`` by credential hash."""
        with self._read() as db:
            return self._entries(db, gateway)

    @staticmethod
    def _entries(db: sqlite_utils.Database, gateway: str) -> list[EntryRecord]:
        return [entry_record(r) for r in db.query(
            "SELECT * FROM entries WHERE gateway = ? ORDER BY cred", [gateway])]

    def revocations(self, gateway: str) -> list[RevokedHash]:
        """Its own and the global revocations, each once, by kind and hash."""
        with self._read() as db:
            return self._revocations(db, gateway)

    @staticmethod
    def _revocations(db: sqlite_utils.Database, gateway: str) -> list[RevokedHash]:
        return [(r["kind"], r["hash"]) for r in db.query(
            "SELECT kind, hash FROM revocations WHERE gateway IN (?, '*') "
            "GROUP BY kind, hash ORDER BY kind, hash", [gateway])]

    # -- publishing ------------------------------------------------------------------

    def allocate_snapshot(self, gateway: str, published_ms: int, *,
                          resync: bool) -> SnapshotContents:
        """The next list version with what it carries, read in the same transaction."""
        with self._tx() as conn:
            version = allocate(conn, gateway, "list_version", published_ms).seq
            rev_seq = conn.execute(
                "UPDATE gateways SET list_published_ms = ?, "
                "resync_answered_ms = CASE WHEN ? THEN ? ELSE resync_answered_ms END "
                "WHERE id = ? RETURNING rev_seq",
                (published_ms, resync, published_ms, gateway)).fetchone()[0]
            all_seq = conn.execute("SELECT seq FROM streams WHERE name = 'all'").fetchone()[0]
            db = sqlite_utils.Database(conn)
            entries = self._entries(db, gateway)
            revoked = self._revocations(db, gateway)
        return SnapshotContents(int(version), int(rev_seq), int(all_seq), entries, revoked)

    def allocate_delta(self, gateway: str, upsert: Sequence[bytes], published_ms: int
                       ) -> tuple[Allocated, list[EntryRecord]] | None:
        """The next list version and the entries to upsert; None when one is missing."""
        with self._tx() as conn:
            rows = []
            for cred in upsert:
                found = list(sqlite_utils.Database(conn).query(
                    "SELECT * FROM entries WHERE gateway = ? AND cred = ?", [gateway, cred]))
                if not found:
                    return None  # nothing written: the version stays unspent
                rows.append(entry_record(found[0]))
            version = next_version(conn, gateway, published_ms)
        return version, rows

    def allocate_revocation(self, target: str, items: Sequence[RevokedHash],
                            revoked_ms: int) -> Allocated:
        """Record revocations at ``target`` (or ``*``); returns the stream seq and the one
        before it."""
        with self._tx() as conn:
            allocated = (_allocate_all(conn, revoked_ms) if target == "*"
                         else allocate(conn, target, "rev_seq", revoked_ms))
            conn.executemany("INSERT OR REPLACE INTO revocations VALUES (?,?,?,?,?)",
                             [(target, kind, digest, allocated.seq, revoked_ms)
                              for kind, digest in items])
        return allocated

    def allocate_command(self, gateway: str, now_ms: int) -> int:
        """The next ``cmd`` seq."""
        with self._tx() as conn:
            return allocate(conn, gateway, "cmd_seq", now_ms).seq

    def allocate_heartbeat(self, gateway: str, now_ms: int) -> HeartbeatState:
        """The next ``hb`` seq and the versions it vouches for."""
        with self._tx() as conn:
            seq = allocate(conn, gateway, "hb_seq", now_ms).seq
            version, rev_seq = conn.execute(
                "SELECT list_version, rev_seq FROM gateways WHERE id = ?",
                (gateway,)).fetchone()
            all_seq = conn.execute("SELECT seq FROM streams WHERE name = 'all'").fetchone()[0]
        return HeartbeatState(seq, int(version), int(rev_seq), int(all_seq))

    def allocate_ack(self, gateway: str, now_ms: int) -> int:
        """The next ``ack`` seq."""
        with self._tx() as conn:
            return allocate(conn, gateway, "ack_seq", now_ms).seq

    # -- what gateways report ------------------------------------------------------------

    def record_applied(self, gateway: str, applied: AppliedRecord) -> None:
        """Keep a gateway's report on one stream and its list version as reported."""
        a = applied
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO applied VALUES (?,?,?,?,?,?,?,?)",
                         (gateway, a.stream, a.seq, a.status, a.reason, a.list_version,
                          a.ts_ms, a.received_ms))
            conn.execute("UPDATE gateways SET applied_list_version = ?, applied_ms = ? "
                         "WHERE id = ?", (a.list_version, a.received_ms, gateway))

    def record_status(self, gateway: str, status_json: str, list_version: int | None,
                      received_ms: int) -> None:
        """Keep a gateway's status and, when it names one, its list version."""
        with self._tx() as conn:
            conn.execute("UPDATE gateways SET status = ?, status_ms = ? WHERE id = ?",
                         (status_json, received_ms, gateway))
            if list_version is not None:
                conn.execute("UPDATE gateways SET applied_list_version = ?, applied_ms = ? "
                             "WHERE id = ?", (list_version, received_ms, gateway))

    def record_resync_request(self, gateway: str, reason: str,
                              requested_ms: int) -> int | None:
        """Note a resync request; returns when the last one was answered, if ever."""
        with self._tx() as conn:
            answered: int | None = returned(conn.execute(
                "UPDATE gateways SET resync_requested_ms = ?, resync_reason = ? WHERE id = ? "
                "RETURNING resync_answered_ms", (requested_ms, reason, gateway)).fetchone(),
                gateway)[0]
        return answered

    def raise_counters(self, gateway: str, versions: Mapping[str, int], now_ms: int) -> None:
        """Raise the counters to what the gateway reports having stored, never lower."""
        reported = reported_counters(versions, now_ms)
        with self._tx() as conn:
            conn.execute(_RAISE_COUNTERS, {**reported.gateway, "id": gateway})
            conn.execute("UPDATE streams SET seq = ? WHERE name = 'all' AND seq < ?",
                         (reported.all, reported.all))

    def count_malformed(self, gateway: str) -> None:
        """One more malformed message from a registered gateway."""
        with self._tx() as conn:
            conn.execute("UPDATE gateways SET malformed = malformed + 1 WHERE id = ?",
                         (gateway,))

    def count_unknown_gateway_message(self) -> None:
        """One more message from a gateway that is not registered."""
        with self._tx() as conn:
            conn.execute("INSERT INTO meta VALUES ('unknown_gateway_messages', '1') ON "
                         "CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")

    # -- reports -----------------------------------------------------------------------

    def all_seq(self) -> int:
        """The broadcast revocation stream's seq."""
        with self._read() as db:
            return int(db.execute("SELECT seq FROM streams WHERE name = 'all'").fetchone()[0])

    def global_revocation_count(self) -> int:
        """How many revocations apply at every gateway."""
        with self._read() as db:
            return int(db.execute("SELECT count(*) FROM revocations WHERE gateway = '*'"
                                  ).fetchone()[0])

    def unknown_gateway_messages(self) -> int:
        """How many messages came from gateways that are not registered."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'unknown_gateway_messages'"
                             ).fetchone()
        return int(row[0]) if row else 0

    def applied(self, gateway: str) -> list[AppliedRecord]:
        """The gateway's last report on each stream, by stream."""
        with self._read() as db:
            return [AppliedRecord(r["stream"], r["seq"], r["status"], r["reason"],
                                  r["list_version"], r["ts_ms"], r["received_ms"])
                    for r in db.query("SELECT * FROM applied WHERE gateway = ? "
                                      "ORDER BY stream", [gateway])]

    def counts(self, gateway: str) -> GatewayCounts:
        """How many entries, own revocations and events the office holds for it."""
        with self._read() as db:
            def one(sql: str) -> Any:
                return db.execute(sql, [gateway]).fetchone()[0]

            return GatewayCounts(
                entries=one("SELECT count(*) FROM entries WHERE gateway = ?"),
                revocations=one("SELECT count(*) FROM revocations WHERE gateway = ?"),
                events=one("SELECT count(*) FROM events WHERE gateway = ?"),
                highest_seq=one("SELECT max(seq) FROM events WHERE gateway = ?"))
