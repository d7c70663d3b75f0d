"""``central.db``: the office's database in SQLite, the one module with its SQL.

A ``common.sqlite.SqliteFile``: WAL, ``synchronous=FULL`` so an event is on disk before
the ack that lets the gateway forget it, and a seq before the message that carries it
leaves; the numbered migrations of ``provisioning/db/sqlite_schema.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from common.sqlite import SqliteFile, StoreError, rollback
from provisioning.db import (
    Allocated,
    AppliedRecord,
    Arrival,
    ChainCheck,
    ChainProblem,
    ChainProblemFound,
    EnrollmentRecord,
    EntryRecord,
    EventRecord,
    GatewayCounts,
    GatewayRecord,
    HeartbeatState,
    ListChange,
    PendingRequest,
    RequestOutcome,
    RevokedHash,
    SnapshotContents,
    StoredBatch,
    StoredEvent,
    TenantEvent,
)
from provisioning.db.rekey_sql import RekeyStatements
from provisioning.db.seqs import GATEWAY_COUNTERS, next_seq, reported_counters
from provisioning.db.sqlite_reconcile import SqliteReconcile
from provisioning.db.sqlite_schema import MIGRATIONS
from provisioning.errors import CentralError


def _entry(row: dict[str, Any]) -> EntryRecord:
    return EntryRecord(cred=row["cred"], permit=row["permit"], valid_from=row["valid_from"],
                       valid_until=row["valid_until"],
                       doors=None if row["doors"] is None else tuple(json.loads(row["doors"])),
                       schedule=row["schedule"], confirmed_at=row["confirmed_at"],
                       updated_ms=row["updated_ms"])


def _entry_row(gateway: str, entry: EntryRecord) -> tuple[Any, ...]:
    doors = None if entry.doors is None else json.dumps(list(entry.doors))
    return (gateway, entry.cred, entry.permit, entry.valid_from, entry.valid_until, doors,
            entry.schedule, entry.confirmed_at, entry.updated_ms)


_ENROLLMENT_COLUMNS = ("gateway", "id", "seq", "unit", "cred", "permit", "permit_hash",
                       "lease_end", "provisional_until", "account", "received_ms", "status",
                       "reason", "decided_ms", "list_version", "decision_seq", "elsewhere",
                       "ended_ms")
_INSERT_ENROLLMENT = (
    "INSERT OR IGNORE INTO enrollments (gateway, id, seq, unit, cred, permit, permit_hash, "
    "lease_end, provisional_until, account, received_ms, status, reason, decided_ms, "
    "list_version, decision_seq, elsewhere, ended_ms) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (gateway, seq, event_id, ts_ms, kind, door, reader, "
    "direction, reason, cred, data, prev_hash, hash, received_ms, attachment) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


def _enrollment(row: dict[str, Any]) -> EnrollmentRecord:
    fields = {k: row[k] for k in _ENROLLMENT_COLUMNS}
    fields["elsewhere"] = tuple(json.loads(row["elsewhere"] or "[]"))
    return EnrollmentRecord(**fields)


def _enrollment_row(record: EnrollmentRecord) -> tuple[Any, ...]:
    values = {k: getattr(record, k) for k in _ENROLLMENT_COLUMNS}
    values["elsewhere"] = json.dumps(list(record.elsewhere)) if record.elsewhere else None
    return tuple(values[k] for k in _ENROLLMENT_COLUMNS)


def _event_record(r: dict[str, Any]) -> EventRecord:
    return EventRecord(r["seq"], r["event_id"], r["ts_ms"], r["kind"], r["door"], r["reader"],
                       r["direction"], r["reason"], r["cred"], r["data"], r["prev_hash"],
                       r["hash"], r["attachment"])


def _returned(row: Any, gateway: str) -> Any:
    """The row an ``UPDATE gateways … RETURNING`` gave; an unknown gateway is an error
    (callers check first: a gateway is never deleted)."""
    if row is None:
        raise CentralError(f"gateway {gateway!r}: not in the database")
    return row


_COUNTERS = frozenset(GATEWAY_COUNTERS.values()) | {"ack_seq"}
_REPORTED = sorted(set(GATEWAY_COUNTERS.values()))
_RAISE_COUNTERS = "UPDATE gateways SET {} WHERE id = :id AND ({})".format(  # noqa: S608
    ", ".join(f"{c} = max({c}, :{c})" for c in _REPORTED),
    " OR ".join(f"{c} < :{c}" for c in _REPORTED))
"""Raises every reported counter that is below (a row none is below is not written)."""


def _allocate(conn: sqlite3.Connection, gateway: str, column: str, now_ms: int
              ) -> Allocated:
    """The next number of a ``gateways`` counter (``next_seq``), stored in this write
    transaction (BEGIN IMMEDIATE: no other writer in between)."""
    assert column in _COUNTERS  # a name of this module, never input
    prev = int(_returned(conn.execute(
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


class SqliteOfficeDatabase(RekeyStatements, SqliteFile, SqliteReconcile):
    """``OfficeDatabase`` on one SQLite file, errors as ``CentralError`` (the registry
    comparison, cases and retention: ``SqliteReconcile``, provisioning/db/sqlite_reconcile.py)."""

    def __init__(self, path: Path) -> None:
        try:
            super().__init__(path, MIGRATIONS, autocheckpoint=True, busy_timeout_s=10.0)
        except StoreError as exc:
            raise CentralError(str(exc)) from exc

    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        try:
            return super().conn()
        except StoreError as exc:
            raise CentralError(str(exc)) from exc

    def close(self) -> None:
        """Close every connection; a later use opens fresh ones."""
        super().close()
        self._local = threading.local()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE); rolled back on any error."""
        conn = self.conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(conn)
            raise CentralError(f"{self.path}: {exc}") from exc
        except BaseException:
            rollback(conn)
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite_utils.Database]:
        """Reads on this thread's connection (dict rows through sqlite-utils)."""
        try:
            yield sqlite_utils.Database(self.conn())
        except sqlite3.Error as exc:
            raise CentralError(f"{self.path}: {exc}") from exc

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
                             [_entry_row(gateway, e) for e in entries])

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
        return [_entry(r) for r in db.query(
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
            version = _allocate(conn, gateway, "list_version", published_ms).seq
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
                rows.append(_entry(found[0]))
            version = self._next_version(conn, gateway, published_ms)
        return version, rows

    def allocate_revocation(self, target: str, items: Sequence[RevokedHash],
                            revoked_ms: int) -> Allocated:
        """Record revocations at ``target`` (or ``*``); returns the stream seq and the one
        before it."""
        with self._tx() as conn:
            allocated = (_allocate_all(conn, revoked_ms) if target == "*"
                         else _allocate(conn, target, "rev_seq", revoked_ms))
            conn.executemany("INSERT OR REPLACE INTO revocations VALUES (?,?,?,?,?)",
                             [(target, kind, digest, allocated.seq, revoked_ms)
                              for kind, digest in items])
        return allocated

    def allocate_command(self, gateway: str, now_ms: int) -> int:
        """The next ``cmd`` seq."""
        with self._tx() as conn:
            return _allocate(conn, gateway, "cmd_seq", now_ms).seq

    def allocate_heartbeat(self, gateway: str, now_ms: int) -> HeartbeatState:
        """The next ``hb`` seq and the versions it vouches for."""
        with self._tx() as conn:
            seq = _allocate(conn, gateway, "hb_seq", now_ms).seq
            version, rev_seq = conn.execute(
                "SELECT list_version, rev_seq FROM gateways WHERE id = ?",
                (gateway,)).fetchone()
            all_seq = conn.execute("SELECT seq FROM streams WHERE name = 'all'").fetchone()[0]
        return HeartbeatState(seq, int(version), int(rev_seq), int(all_seq))

    def allocate_ack(self, gateway: str, now_ms: int) -> int:
        """The next ``ack`` seq."""
        with self._tx() as conn:
            return _allocate(conn, gateway, "ack_seq", now_ms).seq

    # -- receiving ---------------------------------------------------------------------

    def store_events(self, gateway: str, events: Sequence[EventRecord], received_ms: int,
                     check: ChainCheck) -> StoredBatch:
        """Store a batch once per seq, record its chain problems, advance ``acked_upto``."""
        problems: list[ChainProblemFound] = []
        new = 0
        with self._tx() as conn:
            for index, ev in enumerate(events):
                inserted = conn.execute(
                    _INSERT_EVENT,
                    (gateway, ev.seq, ev.event_id, ev.ts_ms, ev.kind, ev.door, ev.reader,
                     ev.direction, ev.reason, ev.cred, ev.data, ev.prev_hash, ev.hash,
                     received_ms, ev.attachment)).rowcount
                if not inserted:
                    stored = conn.execute("SELECT hash FROM events WHERE gateway = ? AND "
                                          "seq = ?", (gateway, ev.seq)).fetchone()[0]
                    problems.extend(check(Arrival(index, False, stored, None, None)))
                    continue
                new += 1
                before = conn.execute("SELECT hash FROM events WHERE gateway = ? AND seq = ?",
                                      (gateway, ev.seq - 1)).fetchone()
                after = conn.execute("SELECT prev_hash FROM events WHERE gateway = ? AND "
                                     "seq = ?", (gateway, ev.seq + 1)).fetchone()
                problems.extend(check(Arrival(
                    index, True, None, None if before is None else before[0],
                    None if after is None else after[0])))
            conn.executemany("INSERT OR IGNORE INTO chain_problems VALUES (?,?,?,?)",
                             [(gateway, s, p, received_ms) for s, p in problems])
            upto = _returned(conn.execute("SELECT acked_upto FROM gateways WHERE id = ?",
                                          (gateway,)).fetchone(), gateway)[0]
            # A gap the gateway declared (``events_dropped``: its outbox passed its cap and
            # the oldest undelivered events were dropped) is acknowledged across, or the
            # gateway could never deliver anything after it.
            dropped = [(int(f), int(la)) for f, la in conn.execute(
                "SELECT json_extract(data, '$.first_seq'), json_extract(data, '$.last_seq') "
                "FROM events WHERE gateway = ? AND seq > ? AND kind = 'events_dropped'",
                (gateway, upto)) if f is not None and la is not None]
            for (seq,) in conn.execute("SELECT seq FROM events WHERE gateway = ? AND seq > ? "
                                       "ORDER BY seq", (gateway, upto)):
                if seq != upto + 1 and not any(f <= upto + 1 and la >= seq - 1
                                                for f, la in dropped):
                    break
                upto = seq
            conn.execute("UPDATE gateways SET acked_upto = ? WHERE id = ?", (upto, gateway))
        return StoredBatch(new, int(upto), tuple(problems))

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
            answered: int | None = _returned(conn.execute(
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

    def chain_problems(self, gateway: str) -> list[ChainProblem]:
        """The chain problems found in the gateway's events, by seq and problem."""
        with self._read() as db:
            return [ChainProblem(r["seq"], r["problem"], r["found_ms"])
                    for r in db.query("SELECT * FROM chain_problems WHERE gateway = ? "
                                      "ORDER BY seq, problem", [gateway])]

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

    def events(self, gateway: str, *, after_seq: int, limit: int | None) -> list[StoredEvent]:
        """Stored events above ``after_seq`` in seq order (the newest ``limit``)."""
        with self._read() as db:
            rows = list(db.query(
                "SELECT * FROM events WHERE gateway = ? AND seq > ? ORDER BY seq DESC "
                "LIMIT ?", [gateway, after_seq, -1 if limit is None else limit]))
        rows.reverse()
        return [StoredEvent(_event_record(r), r["received_ms"]) for r in rows]

    def enrollment_counts(self, gateway: str) -> dict[str, int]:
        """How many of the gateway's enrollments are in each status (those with any)."""
        with self._read() as db:
            return {r["status"]: r["n"] for r in db.query(
                "SELECT status, count(*) AS n FROM enrollments WHERE gateway = ? "
                "GROUP BY status ORDER BY status", [gateway])}

    # -- enrollments made at gateways --------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A value of the office's settings, None when unset."""
        try:
            return super().meta(key)
        except sqlite3.Error as exc:
            raise CentralError(f"{self.path}: {exc}") from exc

    def set_meta(self, key: str, value: str) -> None:
        """Set one of the office's settings."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def tenant_events(self, gateway: str, limit: int) -> list[TenantEvent]:
        """Tenant events above ``tenant_upto`` up to ``acked_upto``, with attachments."""
        # The kinds are spelled out as in the partial index events_tenant, so that SQLite
        # uses it: the cost is that of the tenant events, whatever else was stored.
        with self._read() as db:
            return [TenantEvent(_event_record(r), bool(r["problem"])) for r in db.query(
                "SELECT e.*, EXISTS (SELECT 1 FROM chain_problems p WHERE p.gateway = "
                "e.gateway AND p.seq = e.seq) AS problem FROM gateways g JOIN events e "
                "ON e.gateway = g.id WHERE g.id = ? AND e.kind IN ('tenant_enrolled', "
                "'tenant_moved_out', 'tenant_lease_ended') AND e.seq > g.tenant_upto "
                "AND e.seq <= g.acked_upto ORDER BY e.seq LIMIT ?", [gateway, limit])]

    @staticmethod
    def _advance(conn: sqlite3.Connection, gateway: str, upto: int) -> None:
        conn.execute("UPDATE gateways SET tenant_upto = max(tenant_upto, ?) WHERE id = ?",
                     (upto, gateway))

    def advance_tenant_cursor(self, gateway: str, upto: int) -> None:
        """Raise ``tenant_upto`` to ``upto`` (never lower it)."""
        with self._tx() as conn:
            self._advance(conn, gateway, upto)

    def revoked(self, gateway: str, kind: str, digest: bytes) -> bool:
        """Whether ``digest`` is revoked (as ``kind``) at ``gateway`` or everywhere."""
        with self._read() as db:
            return db.execute("SELECT 1 FROM revocations WHERE gateway IN (?, '*') AND "
                              "kind = ? AND hash = ?", [gateway, kind, digest]
                              ).fetchone() is not None

    def permit_elsewhere(self, gateway: str, permit_hash: bytes, now_s: int) -> list[str]:
        """Other gateways that list this permit, or hold an open enrollment of it."""
        with self._read() as db:
            return [r[0] for r in db.execute(
                "SELECT gateway FROM entries WHERE permit = ? AND gateway != ? AND "
                "(valid_until IS NULL OR valid_until > ?) "
                "UNION SELECT gateway FROM enrollments WHERE permit_hash = ? AND "
                "gateway != ? AND status IN ('received', 'held', 'confirmed') ORDER BY 1",
                [permit_hash, gateway, now_s, permit_hash, gateway]).fetchall()]

    def record_enrollment(self, record: EnrollmentRecord) -> bool:
        """Store a new enrollment and move the cursor to its seq, together."""
        with self._tx() as conn:
            inserted = conn.execute(_INSERT_ENROLLMENT, _enrollment_row(record)).rowcount
            self._advance(conn, record.gateway, record.seq)
        return bool(inserted)

    @staticmethod
    def _enrollment_in(conn: sqlite3.Connection, gateway: str, enrollment_id: str
                       ) -> EnrollmentRecord | None:
        rows = list(sqlite_utils.Database(conn).query(
            "SELECT * FROM enrollments WHERE gateway = ? AND id = ?", [gateway, enrollment_id]))
        return _enrollment(rows[0]) if rows else None

    @staticmethod
    def _next_version(conn: sqlite3.Connection, gateway: str, published_ms: int
                      ) -> Allocated:
        allocated = _allocate(conn, gateway, "list_version", published_ms)
        conn.execute("UPDATE gateways SET list_published_ms = ? WHERE id = ?",
                     (published_ms, gateway))
        return allocated

    def _unlist(self, conn: sqlite3.Connection, record: EnrollmentRecord, now_ms: int
                ) -> ListChange | None:
        """A confirmed enrollment's card out of the list under a new version."""
        if record.status != "confirmed" or record.cred is None:
            return None
        if not conn.execute("DELETE FROM entries WHERE gateway = ? AND cred = ?",
                            (record.gateway, record.cred)).rowcount:
            return None  # removed meanwhile ('remove --card'): nothing to send
        version = self._next_version(conn, record.gateway, now_ms)
        return ListChange(version.seq, [], [record.cred], [record.id], version.prev)

    def end_enrollment(self, gateway: str, enrollment_id: str, seq: int, reason: str,
                       ended_ms: int) -> ListChange | None:
        """Mark an enrollment ended (its card out of the list) and move the cursor."""
        with self._tx() as conn:
            self._advance(conn, gateway, seq)
            record = self._enrollment_in(conn, gateway, enrollment_id)
            if record is None or record.status == "ended":
                return None
            change = self._unlist(conn, record, ended_ms)
            conn.execute("UPDATE enrollments SET status = 'ended', reason = ?, ended_ms = ?, "
                         "list_version = coalesce(?, list_version) WHERE gateway = ? AND id = ?",
                         (reason, ended_ms, None if change is None else change.version,
                          gateway, enrollment_id))
        return change

    def enrollment(self, gateway: str, enrollment_id: str) -> EnrollmentRecord | None:
        """One enrollment."""
        with self._read() as db:
            return self._enrollment_in(db.conn, gateway, enrollment_id)

    def enrollments(self, gateway: str | None = None, status: str | None = None
                    ) -> list[EnrollmentRecord]:
        """Enrollments of one gateway or all, of one status or all."""
        with self._read() as db:
            return [_enrollment(r) for r in db.query(
                "SELECT * FROM enrollments WHERE (? IS NULL OR gateway = ?) AND "
                "(? IS NULL OR status = ?) ORDER BY gateway, seq",
                [gateway, gateway, status, status])]

    def hold_enrollments(self, gateway: str, ids: Sequence[str], reason: str) -> None:
        """Received enrollments to ``held``."""
        with self._tx() as conn:
            conn.executemany("UPDATE enrollments SET status = 'held', reason = ? "
                             "WHERE gateway = ? AND id = ? AND status = 'received'",
                             [(reason, gateway, i) for i in ids])

    def confirm_enrollments(self, gateway: str, entries: Mapping[str, EntryRecord],
                            decided_ms: int) -> ListChange | None:
        """Entries in, enrollments confirmed, one new list version; None if none was."""
        with self._tx() as conn:
            confirmed = [i for i in entries if conn.execute(
                "UPDATE enrollments SET status = 'confirmed', reason = NULL, decided_ms = ?, "
                "decision_seq = NULL WHERE gateway = ? AND id = ? AND "
                "status IN ('received', 'held')", (decided_ms, gateway, i)).rowcount]
            if not confirmed:
                return None  # nothing written: the version stays unspent
            upsert = [entries[i] for i in confirmed]
            conn.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?)",
                             [_entry_row(gateway, e) for e in upsert])
            version = self._next_version(conn, gateway, decided_ms)
            conn.executemany("UPDATE enrollments SET list_version = ? WHERE gateway = ? AND "
                             "id = ?", [(version.seq, gateway, i) for i in confirmed])
        return ListChange(version.seq, upsert, [], confirmed, version.prev)

    def reject_enrollment(self, gateway: str, enrollment_id: str, reason: str,
                          decided_ms: int) -> tuple[EnrollmentRecord, ListChange | None] | None:
        """Reject an open or confirmed enrollment; its decision becomes due."""
        with self._tx() as conn:
            record = self._enrollment_in(conn, gateway, enrollment_id)
            if record is None or record.status not in ("received", "held", "confirmed"):
                return None
            change = self._unlist(conn, record, decided_ms)
            conn.execute("UPDATE enrollments SET status = 'rejected', reason = ?, "
                         "decided_ms = ?, decision_seq = NULL, "
                         "list_version = coalesce(?, list_version) WHERE gateway = ? AND id = ?",
                         (reason, decided_ms, None if change is None else change.version,
                          gateway, enrollment_id))
            after = self._enrollment_in(conn, gateway, enrollment_id)
        assert after is not None
        return after, change

    def resend_decision(self, gateway: str, enrollment_id: str) -> bool:
        """Make a confirmed or rejected enrollment's decision due again."""
        with self._tx() as conn:
            return bool(conn.execute(
                "UPDATE enrollments SET decision_seq = NULL WHERE gateway = ? AND id = ? AND "
                "status IN ('confirmed', 'rejected')", (gateway, enrollment_id)).rowcount)

    def allocate_decisions(self, gateway: str, limit: int, now_ms: int
                           ) -> tuple[int, list[EnrollmentRecord]] | None:
        """The next ``enr`` seq and the due decisions it carries (marked sent)."""
        with self._tx() as conn:
            rows = [_enrollment(r) for r in sqlite_utils.Database(conn).query(
                "SELECT * FROM enrollments WHERE gateway = ? AND status IN ('confirmed', "
                "'rejected') AND decision_seq IS NULL ORDER BY seq LIMIT ?", [gateway, limit])]
            if not rows:
                return None
            seq = _allocate(conn, gateway, "enr_seq", now_ms).seq
            conn.executemany("UPDATE enrollments SET decision_seq = ? WHERE gateway = ? AND "
                             "id = ?", [(seq, gateway, r.id) for r in rows])
        return seq, [dataclasses.replace(r, decision_seq=seq) for r in rows]

    # -- requests from one-shot commands to the running serve --------------------------

    def queue_request(self, op: str, args: str, requested_ms: int) -> int:
        """Queue a request; returns its id."""
        with self._tx() as conn:
            return int(conn.execute(
                "INSERT INTO requests (op, args, requested_ms) VALUES (?,?,?) RETURNING id",
                (op, args, requested_ms)).fetchone()[0])

    def request_outcome(self, request: int) -> RequestOutcome | None:
        """How the request ended, or None while it is open."""
        with self._read() as db:
            done, result, kind, error = db.execute(
                "SELECT done_ms, result, error_kind, error FROM requests WHERE id = ?",
                [request]).fetchone()
        return None if done is None else RequestOutcome(result, kind, error)

    def withdraw_request(self, request: int, now_ms: int) -> bool:
        """Close a request as ``expired`` unless ``serve`` has taken it."""
        with self._tx() as conn:
            return bool(conn.execute(
                "UPDATE requests SET done_ms = ?, error_kind = 'expired' "
                "WHERE id = ? AND taken_ms IS NULL", (now_ms, request)).rowcount)

    def open_requests(self) -> list[PendingRequest]:
        """Requests neither taken nor done, oldest first."""
        with self._read() as db:
            return [PendingRequest(*row) for row in db.execute(
                "SELECT id, op, args, requested_ms FROM requests WHERE done_ms IS NULL "
                "AND taken_ms IS NULL ORDER BY id").fetchall()]

    def take_request(self, request: int, now_ms: int) -> bool:
        """Claim an open request; False when it was withdrawn meanwhile."""
        with self._tx() as conn:
            return bool(conn.execute(
                "UPDATE requests SET taken_ms = ? WHERE id = ? AND taken_ms IS NULL AND "
                "done_ms IS NULL", (now_ms, request)).rowcount)

    def finish_request(self, request: int, now_ms: int, outcome: RequestOutcome) -> None:
        """Record a request's outcome (once)."""
        with self._tx() as conn:
            conn.execute("UPDATE requests SET done_ms = ?, result = ?, error_kind = ?, "
                         "error = ? WHERE id = ? AND done_ms IS NULL",
                         (now_ms, outcome.result, outcome.error_kind, outcome.error, request))

    def reset_requests(self, now_ms: int, keep_ms: int) -> None:
        """Forget old finished requests; close those a stopped ``serve`` had taken."""
        with self._tx() as conn:
            conn.execute("DELETE FROM requests WHERE done_ms IS NOT NULL AND done_ms < ?",
                         (now_ms - keep_ms,))
            # Claimed by a serve that stopped before finishing: whether it was sent is
            # unknown, so it is closed, not redone (the protocol recovers a lost message).
            conn.execute("UPDATE requests SET done_ms = ?, error_kind = 'failure', "
                         "error = 'serve stopped while performing it' "
                         "WHERE taken_ms IS NOT NULL AND done_ms IS NULL", (now_ms,))
