"""The office's database in PostgreSQL (psycopg 3), for a city: the one module with its SQL.

``PostgresOfficeDatabase`` is ``OfficeDatabase`` on a PostgreSQL database named by a URL
(``postgresql://user@host:port/dbname``; libpq's environment and ``~/.pgpass`` supply
what it leaves out), with the numbered migrations of ``postgres_schema.py``. Every method
behaves as the SQLite one does (the office tests run on both); what differs is how, for
volume and for several ``serve`` instances sharing one database:

- **Events** are partitioned by day of their own time and stored by COPY (binary). The
  key is ``(gateway, seq, ts_ms)`` (a partitioned table's unique key must hold the
  partition column); a seq is nevertheless stored once whatever its time: each batch
  first locks its gateway's row (``SELECT … FOR UPDATE``: batches of one gateway are
  stored one at a time, whichever instance received them), and the row knows which seqs
  are stored without reading ``events``: all up to ``acked_upto`` (bar declared gaps and
  seqs before ``--events-from``), and the runs it lists above. Only seqs that may be
  stored are looked up (a resent batch, a link to a stored neighbour), first in the
  partitions of the batch's days, then, for what is still missing, in all of them. A
  batch that continues the chain looks nothing up: the hash of the event at
  ``acked_upto`` is in the row. ``acked_upto`` advances over those runs and the gaps
  ``events_dropped`` events declared, exactly as ``SqliteOfficeDatabase`` computes it
  from the stored rows.
- **Numbers** are allocated as in SQLite (``provisioning.db.seqs.next_seq`` on the
  counter read ``FOR UPDATE``, written in the same transaction; the ``all`` stream's row
  is read ``FOR SHARE`` where a snapshot or heartbeat vouches for it), so two instances
  never hand out the same one.
- **Order of publishing across instances** (``PostgresServeLock``): while a ``serve``
  works, an allocation of a number that a gateway checks in order (list versions, the
  ``rev``, ``cmd``, ``hb`` and ``enr`` streams; the ``all`` stream as ``*``) and the
  acting on its tenant events first take that gateway's turn, a session advisory lock
  held until the messages are with the broker. Acks are in no order, so they take none.
- **Requests** of one-shot commands are taken by one instance (``UPDATE … WHERE
  taken_ms IS NULL``); one taken by a ``serve`` whose server session has ended is
  closed as failed by whoever looks at it next.

Only this module and ``postgres_schema.py`` speak PostgreSQL's SQL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from provisioning.db import (
    TENANT_KINDS,
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
from provisioning.db.postgres_reconcile import PostgresReconcile
from provisioning.db.postgres_schema import END_DAY_MS, FIRST_DAY_MS, MIGRATIONS
from provisioning.db.rekey_sql import RekeyStatements
from provisioning.db.seqs import next_seq, reported_counters
from provisioning.errors import CentralError

Conn = psycopg.Connection[tuple[Any, ...]]

DAY_MS = 86_400_000
LOCK_NS = 0x70670001
"""Advisory lock keys of the office (the first of the two 32-bit keys): migrations,
partitions, the serve lock, the heartbeat leader."""
TURN_NS = 0x70670002
"""Advisory lock keys of publishing turns: the second key is a hash of the gateway id."""
MIGRATE_KEY, PARTITION_KEY, MUTEX_KEY, SERVE_KEY, ONESHOT_KEY, LEADER_KEY = range(1, 7)
CLIENT_NS = 0x70670003
"""Advisory lock keys of serve instances: the second key is a hash of the client id."""
LOCK_TIMEOUT_S = 30.0
"""How long a statement waits for a row or advisory lock before it fails: an instance
that holds a gateway's turn gives it back within the publish timeout (10 s)."""
CONNECT_TIMEOUT_S = 10

_GATEWAY_FIELDS = tuple(f.name for f in dataclasses.fields(GatewayRecord))
_ENROLLMENT_COLUMNS = tuple(f.name for f in dataclasses.fields(EnrollmentRecord))
_EVENT_COLUMNS = ("gateway", "seq", "event_id", "ts_ms", "kind", "door", "reader",
                  "direction", "reason", "cred", "data", "prev_hash", "hash",
                  "received_ms", "attachment")
_EVENT_TYPES = ("text", "int8", "text", "int8", "text", "text", "text", "text", "text",
                "text", "text", "text", "text", "int8", "text")
_ENTRY_UPSERT = (
    "INSERT INTO entries (gateway, cred, permit, valid_from, valid_until, doors, schedule, "
    "confirmed_at, updated_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (gateway, cred) DO UPDATE SET permit = excluded.permit, "
    "valid_from = excluded.valid_from, valid_until = excluded.valid_until, "
    "doors = excluded.doors, schedule = excluded.schedule, "
    "confirmed_at = excluded.confirmed_at, updated_ms = excluded.updated_ms")
_INSERT_ENROLLMENT = (
    "INSERT INTO enrollments (gateway, id, seq, unit, cred, permit, permit_hash, lease_end, "
    "provisional_until, account, received_ms, status, reason, decided_ms, list_version, "
    "decision_seq, elsewhere, ended_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
    "%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING")


def where(url: str) -> str:
    """The database a URL names, without its password, for messages."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql database (unreadable URL)"
    host = info.get("host") or "local socket"
    port = f":{info['port']}" if info.get("port") else ""
    user = f"{info['user']}@" if info.get("user") else ""
    return f"postgresql://{user}{host}{port}/{info.get('dbname') or ''}"


def _key(name: str) -> int:
    """A signed 32-bit advisory lock key for a name (a collision only serialises two
    names' turns: each thread holds at most one turn, so it cannot deadlock)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)


def _day(ts_ms: int) -> int | None:
    """The UTC day (days since 1970) of a time, or None outside the day partitions."""
    if ts_ms < FIRST_DAY_MS or ts_ms >= END_DAY_MS:
        return None
    return ts_ms // DAY_MS


def _partition(ts_ms: int) -> str:
    """The partition of ``events`` that holds an event of this time."""
    day = _day(ts_ms)
    if day is not None:
        return f"events_{day:06d}"
    return "events_before" if ts_ms < FIRST_DAY_MS else "events_after"


def _entry(row: Mapping[str, Any]) -> EntryRecord:
    return EntryRecord(cred=bytes(row["cred"]),
                       permit=None if row["permit"] is None else bytes(row["permit"]),
                       valid_from=row["valid_from"], valid_until=row["valid_until"],
                       doors=None if row["doors"] is None else tuple(json.loads(row["doors"])),
                       schedule=row["schedule"], confirmed_at=row["confirmed_at"],
                       updated_ms=row["updated_ms"])


def _entry_row(gateway: str, entry: EntryRecord) -> tuple[Any, ...]:
    doors = None if entry.doors is None else json.dumps(list(entry.doors))
    return (gateway, entry.cred, entry.permit, entry.valid_from, entry.valid_until, doors,
            entry.schedule, entry.confirmed_at, entry.updated_ms)


def _enrollment(row: Mapping[str, Any]) -> EnrollmentRecord:
    fields = {k: row[k] for k in _ENROLLMENT_COLUMNS}
    for name in ("cred", "permit_hash"):
        if fields[name] is not None:
            fields[name] = bytes(fields[name])
    fields["elsewhere"] = tuple(json.loads(row["elsewhere"] or "[]"))
    return EnrollmentRecord(**fields)


def _enrollment_row(record: EnrollmentRecord) -> tuple[Any, ...]:
    values = {k: getattr(record, k) for k in _ENROLLMENT_COLUMNS}
    values["elsewhere"] = json.dumps(list(record.elsewhere)) if record.elsewhere else None
    return tuple(values[k] for k in _ENROLLMENT_COLUMNS)


def _event_record(r: Mapping[str, Any]) -> EventRecord:
    return EventRecord(r["seq"], r["event_id"], r["ts_ms"], r["kind"], r["door"], r["reader"],
                       r["direction"], r["reason"], r["cred"], r["data"], r["prev_hash"],
                       r["hash"], r["attachment"])


def _returned(row: Any, gateway: str) -> Any:
    """The row an ``UPDATE gateways … RETURNING`` gave; an unknown gateway is an error."""
    if row is None:
        raise CentralError(f"gateway {gateway!r}: not in the database")
    return row


def _allocate(conn: Conn, gateway: str, column: str, now_ms: int) -> Allocated:
    """The next number of a ``gateways`` counter (``next_seq``), read under the row lock
    and written in the caller's transaction."""
    ident = sql.Identifier(column)
    prev = int(_returned(conn.execute(sql.SQL(
        "SELECT {} FROM gateways WHERE id = %s FOR UPDATE").format(ident),
        (gateway,)).fetchone(), gateway)[0])
    seq = next_seq(prev, now_ms)
    conn.execute(sql.SQL("UPDATE gateways SET {} = %s WHERE id = %s").format(ident),
                 (seq, gateway))
    return Allocated(seq, prev)


def _declared(data: str) -> tuple[int, int] | None:
    """``(first_seq, last_seq)`` of an ``events_dropped`` event's data, if it names both
    as numbers."""
    try:
        value = json.loads(data)
        first, last = value.get("first_seq"), value.get("last_seq")
        if first is None or last is None:
            return None
        return int(first), int(last)
    except (ValueError, TypeError, AttributeError):
        return None


# -- what a gateway row knows about the stored seqs --------------------------------------


@dataclass(slots=True)
class _Known:
    """The stored seqs of one gateway, as its row records them (see the module
    docstring): every seq up to ``upto`` may be stored; above it, exactly the ``runs``."""

    upto: int
    runs: list[tuple[int, int]]
    gaps: list[tuple[int, int, int]]
    """``(first_seq, last_seq, seq)`` of each ``events_dropped`` stored above ``upto``."""
    head_hash: str | None
    head_ts: int | None
    count: int
    highest: int | None

    @classmethod
    def of(cls, row: Sequence[Any]) -> _Known:
        upto, above, gaps, head_hash, head_ts, count, highest = row
        return cls(int(upto), [(above[i], above[i + 1]) for i in range(0, len(above), 2)],
                   [(gaps[i], gaps[i + 1], gaps[i + 2]) for i in range(0, len(gaps), 3)],
                   head_hash, head_ts, int(count), highest)

    def may_be_stored(self, seq: int) -> bool:
        if seq < 1 or self.count == 0:
            return False
        return seq <= self.upto or any(a <= seq <= b for a, b in self.runs)

    def surely_stored(self, seq: int) -> bool:
        return seq > self.upto and any(a <= seq <= b for a, b in self.runs)

    def advance(self, new_seqs: Sequence[int], hashes: Mapping[int, tuple[str, int]]) -> None:
        """Take in newly stored seqs and move ``upto`` over the contiguous ones and the
        declared gaps, as ``SqliteOfficeDatabase.store_events`` walks the stored rows."""
        runs = sorted([*self.runs, *((s, s) for s in set(new_seqs) if s > self.upto)])
        merged: list[tuple[int, int]] = []
        for a, b in runs:
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        upto = self.upto
        while merged:
            a, b = merged[0]
            if a != upto + 1 and not any(f <= upto + 1 and la >= a - 1
                                         for f, la, _ in self.gaps):
                break
            upto = b
            merged.pop(0)
        if upto != self.upto:
            head = hashes.get(upto)
            self.head_hash, self.head_ts = (None, None) if head is None else head
        self.upto = upto
        self.runs = merged
        self.gaps = [g for g in self.gaps if g[2] > upto]

    def columns(self) -> tuple[Any, ...]:
        return (self.upto, [s for run in self.runs for s in run],
                [s for gap in self.gaps for s in gap], self.head_hash, self.head_ts,
                self.count, self.highest)


@dataclass(slots=True)
class _Turns:
    """The publishing turn this thread holds while ``serve`` works (``begin``/``end``)."""

    flush: Callable[[], None]
    held: int | None = None


class PostgresOfficeDatabase(RekeyStatements, PostgresReconcile):
    """``OfficeDatabase`` on a PostgreSQL database, errors as ``CentralError`` (the registry
    comparison, cases and retention: ``PostgresReconcile``, postgres_reconcile.py)."""

    _MARK = "%s"

    def __init__(self, url: str, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.url = url
        self.where = where(url)
        self._lock_timeout_s = lock_timeout_s
        self._local = threading.local()
        self._connections: list[Conn] = []
        self._conn_lock = threading.Lock()
        self._days: set[int] = set()
        self.taker_pid: int | None = None
        """The server pid of this process's serve lock, recorded with the requests it
        takes (``PostgresServeLock``)."""
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    # -- connections --------------------------------------------------------------------

    def connect(self, *, synchronous: bool = True) -> Conn:
        """A new autocommit connection (``CentralError`` when the server refuses);
        ``synchronous`` False: its commits do not wait for the disk."""
        options = f"-c lock_timeout={int(self._lock_timeout_s * 1000)}"
        if not synchronous:
            options += " -c synchronous_commit=off"
        try:
            conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                application_name="permitgate-central", options=options)
        except psycopg.Error as exc:
            raise CentralError(f"{self.where}: cannot connect: {exc}".strip()) from None
        with self._conn_lock:
            self._connections.append(conn)
        return conn

    def _conn(self) -> Conn:
        """This thread's connection (a new one after the last broke)."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            conn = None
            turns: _Turns | None = getattr(self._local, "turns", None)
            if turns is not None:
                turns.held = None  # released with the session that held it
        if conn is None:
            conn = self.connect()
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close every connection; a later use opens fresh ones."""
        with self._conn_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        self._local = threading.local()

    def _error(self, exc: psycopg.Error) -> CentralError:
        return CentralError(f"{self.where}: {str(exc).strip()}")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Conn]:
        """One transaction; rolled back on any error."""
        conn = self._conn()
        try:
            with conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[Conn]:
        """Statements outside a transaction (each its own)."""
        conn = self._conn()
        try:
            yield conn
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _migrate(self) -> None:
        """Apply the migrations this database lacks, once whoever else starts now."""
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NS, MIGRATE_KEY))
            current = 0
            if conn.execute("SELECT to_regclass('meta')").fetchone() != (None,):
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                   ).fetchone()
                current = int(row[0]) if row else 0
            if current > len(MIGRATIONS):
                raise CentralError(f"{self.where}: schema version {current} is newer than "
                                   f"this program understands ({len(MIGRATIONS)}); upgrade "
                                   "permitgate")
            for version in range(current + 1, len(MIGRATIONS) + 1):
                conn.execute(cast(Any, MIGRATIONS[version - 1]))
                conn.execute("INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT "
                             "(key) DO UPDATE SET value = excluded.value", (str(version),))

    # -- publishing turns (see PostgresServeLock) ----------------------------------------

    def begin_turns(self, flush: Callable[[], None]) -> None:
        """From now on, on this thread, an ordered allocation takes its gateway's turn
        first; ``flush`` puts every message sent so far with the broker."""
        self._local.turns = _Turns(flush)

    def end_turns(self) -> None:
        """Flush and give back the turn this thread holds; stop taking turns."""
        turns: _Turns | None = getattr(self._local, "turns", None)
        self._local.turns = None
        if turns is not None and turns.held is not None:
            try:
                turns.flush()
            finally:
                self._give_back(turns)

    def _give_back(self, turns: _Turns) -> None:
        held, turns.held = turns.held, None
        conn: Conn | None = getattr(self._local, "conn", None)
        if held is None or conn is None or conn.closed or conn.broken:
            return
        try:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (TURN_NS, held))
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _turn(self, gateway: str) -> None:
        """Wait for and take ``gateway``'s publishing turn, if this thread takes turns
        (one at a time: the turn held is flushed and given back first)."""
        turns: _Turns | None = getattr(self._local, "turns", None)
        if turns is None:
            return
        key = _key(gateway)
        if turns.held == key:
            return
        if turns.held is not None:
            turns.flush()
            self._give_back(turns)
        with self._read() as conn:
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (TURN_NS, key))
        turns.held = key

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
            cur.executemany(_ENTRY_UPSERT, [_entry_row(gateway, e) for e in entries])

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
            return [_entry(r) for r in cur.execute(
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
            version = _allocate(conn, gateway, "list_version", published_ms).seq
            rev_seq = _returned(conn.execute(
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
                    rows.append(_entry(found))
            version = self._next_version(conn, gateway, published_ms)
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
                allocated = _allocate(conn, target, "rev_seq", revoked_ms)
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
            return _allocate(conn, gateway, "cmd_seq", now_ms).seq

    def allocate_heartbeat(self, gateway: str, now_ms: int) -> HeartbeatState:
        """The next ``hb`` seq and the versions it vouches for."""
        self._turn(gateway)
        with self._tx() as conn:
            seq = _allocate(conn, gateway, "hb_seq", now_ms).seq
            version, rev_seq = _returned(conn.execute(
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
                return _allocate(conn, gateway, "ack_seq", now_ms).seq
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    # -- receiving ---------------------------------------------------------------------

    def _ensure_partitions(self, days: set[int]) -> None:
        """The day partitions of ``days``, made now where missing (each in a short
        transaction of its own, under an advisory lock, before the batch's)."""
        missing = days - self._days
        if not missing:
            return
        with self._read() as conn:
            for day in sorted(missing):
                name = _partition(day * DAY_MS)
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                                 (LOCK_NS, PARTITION_KEY))
                    if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,):
                        # LIKE + ATTACH: attaching locks the parent only against other
                        # DDL, where CREATE … PARTITION OF would stop every insert.
                        conn.execute(sql.SQL(
                            "CREATE TABLE {} (LIKE events INCLUDING DEFAULTS "
                            "INCLUDING CONSTRAINTS)").format(sql.Identifier(name)))
                        conn.execute(sql.SQL(
                            "ALTER TABLE events ATTACH PARTITION {} FOR VALUES FROM ({}) "
                            "TO ({})").format(sql.Identifier(name), sql.Literal(day * DAY_MS),
                                              sql.Literal((day + 1) * DAY_MS)))
                self._days.add(day)

    @staticmethod
    def _lookup(conn: Conn, gateway: str, seqs: set[int], days: set[int]
                ) -> dict[int, tuple[str, str, int]]:
        """``seq -> (hash, prev_hash, ts_ms)`` of the stored ``seqs``: first in the
        partitions of ``days``, then the rest in all of them."""
        found: dict[int, tuple[str, str, int]] = {}
        wanted = sorted(seqs)
        if days:
            lo, hi = min(days) * DAY_MS, (max(days) + 1) * DAY_MS
            for seq, hash_, prev, ts in conn.execute(
                    "SELECT seq, hash, prev_hash, ts_ms FROM events WHERE gateway = %s AND "
                    "seq = ANY(%s) AND ts_ms >= %s AND ts_ms < %s",
                    (gateway, wanted, lo, hi)):
                found[seq] = (hash_, prev, ts)
        rest = [s for s in wanted if s not in found]
        if rest:
            for seq, hash_, prev, ts in conn.execute(
                    "SELECT seq, hash, prev_hash, ts_ms FROM events WHERE gateway = %s AND "
                    "seq = ANY(%s)", (gateway, rest)):
                found[seq] = (hash_, prev, ts)
        return found

    @contextlib.contextmanager
    def _batch_tx(self) -> Iterator[Conn]:
        """A transaction the caller begins and commits itself inside pipelines (a round
        trip each for lock-and-read and write-and-commit); rolled back on any error."""
        conn = self._conn()
        try:
            yield conn
        except BaseException as exc:
            if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, psycopg.Error):
                raise self._error(exc) from exc
            raise

    def store_events(self, gateway: str, events: Sequence[EventRecord], received_ms: int,
                     check: ChainCheck) -> StoredBatch:
        """Store a batch once per seq, record its chain problems, advance ``acked_upto``."""
        self._ensure_partitions({d for ev in events if (d := _day(ev.ts_ms)) is not None})
        problems: list[ChainProblemFound] = []
        with self._batch_tx() as conn:
            with conn.pipeline():
                conn.execute("BEGIN")
                known = _Known.of(_returned(conn.execute(
                    "SELECT acked_upto, stored_above, declared_gaps, head_hash, head_ts_ms, "
                    "event_count, highest_seq FROM gateways WHERE id = %s FOR UPDATE",
                    (gateway,)).fetchone(), gateway))
            batch_seqs = {ev.seq for ev in events}
            wanted = {s for ev in events for s in (ev.seq - 1, ev.seq, ev.seq + 1)
                      if known.may_be_stored(s)}
            head_only = (known.head_hash is not None and known.upto in wanted
                         and known.upto not in batch_seqs and known.upto - 1 not in batch_seqs)
            if head_only:
                wanted.discard(known.upto)
            days = {d for ev in events if (d := _day(ev.ts_ms)) is not None}
            if known.head_ts is not None and (d := _day(known.head_ts)) is not None:
                days.add(d)
            rows = self._lookup(conn, gateway, wanted, days) if wanted else {}
            # The link of the batch's first event to the one before it comes from the row
            # when that one is the event at acked_upto.
            before_of = {known.upto: known.head_hash} if head_only else {}
            new: list[EventRecord] = []
            for index, ev in enumerate(events):
                stored = rows.get(ev.seq)
                if stored is not None:
                    problems.extend(check(Arrival(index, False, stored[0], None, None)))
                    continue
                new.append(ev)
                rows[ev.seq] = (ev.hash, ev.prev_hash, ev.ts_ms)
                before = rows.get(ev.seq - 1)
                after = rows.get(ev.seq + 1)
                problems.extend(check(Arrival(
                    index, True, None,
                    before[0] if before is not None else before_of.get(ev.seq - 1),
                    None if after is None else after[1])))
            self._copy(conn, gateway, new, received_ms)
            for ev in new:
                if ev.kind == "events_dropped" and ev.seq > known.upto:
                    declared = _declared(ev.data)
                    if declared is not None:
                        known.gaps.append((*declared, ev.seq))
            known.count += len(new)
            if new:
                top = max(ev.seq for ev in new)
                known.highest = top if known.highest is None else max(known.highest, top)
            known.advance([ev.seq for ev in new], {s: (r[0], r[2]) for s, r in rows.items()})
            tenant = [(gateway, ev.seq, ev.ts_ms) for ev in new if ev.kind in TENANT_KINDS]
            with conn.pipeline(), conn.cursor() as cur:
                if problems:
                    cur.executemany("INSERT INTO chain_problems VALUES (%s, %s, %s, %s) "
                                    "ON CONFLICT DO NOTHING",
                                    [(gateway, s, p, received_ms) for s, p in problems])
                if tenant:
                    cur.executemany("INSERT INTO tenant_event_keys VALUES (%s, %s, %s)",
                                    tenant)
                cur.execute("UPDATE gateways SET (acked_upto, stored_above, declared_gaps, "
                            "head_hash, head_ts_ms, event_count, highest_seq) = "
                            "(%s, %s, %s, %s, %s, %s, %s) WHERE id = %s",
                            (*known.columns(), gateway))
                cur.execute("COMMIT")
        return StoredBatch(len(new), known.upto, tuple(problems))

    @staticmethod
    def _copy(conn: Conn, gateway: str, new: Sequence[EventRecord], received_ms: int) -> None:
        """COPY (binary) the new events straight into their day partitions (the parent
        would route each row, which costs more than the copy itself for a batch)."""
        by_partition: dict[str, list[EventRecord]] = {}
        for ev in new:
            by_partition.setdefault(_partition(ev.ts_ms), []).append(ev)
        for name, rows in by_partition.items():
            statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, _EVENT_COLUMNS)))
            with conn.cursor() as cur, cur.copy(statement) as copy:
                copy.set_types(_EVENT_TYPES)
                for ev in rows:
                    copy.write_row((gateway, ev.seq, ev.event_id, ev.ts_ms, ev.kind, ev.door,
                                    ev.reader, ev.direction, ev.reason, ev.cred, ev.data,
                                    ev.prev_hash, ev.hash, received_ms, ev.attachment))

    @staticmethod
    def _forget_events(conn: Conn, gateway: str, end: int, deleted: int) -> None:
        """After retention deleted the gateway's events up to ``end`` (never past
        ``acked_upto``): its count, its highest seq once none is left, and the event at
        ``acked_upto`` if it was one of them (a batch then finds no stored neighbour
        there, as in ``central.db``). Its tenant events there were acted on already."""
        conn.execute("UPDATE gateways SET event_count = event_count - %s, "
                     "highest_seq = CASE WHEN event_count - %s > 0 THEN highest_seq END, "
                     "head_hash = CASE WHEN acked_upto > %s THEN head_hash END, "
                     "head_ts_ms = CASE WHEN acked_upto > %s THEN head_ts_ms END "
                     "WHERE id = %s", (deleted, deleted, end, end, gateway))
        conn.execute("DELETE FROM tenant_event_keys WHERE gateway = %s AND seq <= %s",
                     (gateway, end))

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
            answered: int | None = _returned(conn.execute(
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

    def chain_problems(self, gateway: str) -> list[ChainProblem]:
        """The chain problems found in the gateway's events, by seq and problem."""
        with self._read() as conn:
            return [ChainProblem(*r) for r in conn.execute(
                "SELECT seq, problem, found_ms FROM chain_problems WHERE gateway = %s "
                "ORDER BY seq, problem", (gateway,))]

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

    def events(self, gateway: str, *, after_seq: int, limit: int | None) -> list[StoredEvent]:
        """Stored events above ``after_seq`` in seq order (the newest ``limit``)."""
        with self._read() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = list(cur.execute(
                "SELECT * FROM events WHERE gateway = %s AND seq > %s ORDER BY seq DESC "
                "LIMIT %s", (gateway, after_seq, limit)))
        rows.reverse()
        return [StoredEvent(_event_record(r), r["received_ms"]) for r in rows]

    def enrollment_counts(self, gateway: str) -> dict[str, int]:
        """How many of the gateway's enrollments are in each status (those with any)."""
        with self._read() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(
                "SELECT status, count(*) FROM enrollments WHERE gateway = %s "
                "GROUP BY status ORDER BY status", (gateway,))}

    # -- enrollments made at gateways --------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A value of the office's settings, None when unset."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set one of the office's settings."""
        with self._read() as conn:
            conn.execute("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
                         "SET value = excluded.value", (key, value))

    def _due_tenant_events(self, conn: Conn, gateway: str, limit: int) -> list[TenantEvent]:
        keys = conn.execute(
            "SELECT t.seq, t.ts_ms FROM gateways g JOIN tenant_event_keys t ON "
            "t.gateway = g.id WHERE g.id = %s AND t.seq > g.tenant_upto AND "
            "t.seq <= g.acked_upto ORDER BY t.seq LIMIT %s", (gateway, limit)).fetchall()
        if not keys:
            return []
        with conn.cursor(row_factory=dict_row) as cur:
            found = {(r["seq"], r["ts_ms"]): r for r in cur.execute(
                "SELECT e.*, EXISTS (SELECT 1 FROM chain_problems p WHERE p.gateway = "
                "e.gateway AND p.seq = e.seq) AS problem FROM events e WHERE "
                "e.gateway = %s AND e.seq = ANY(%s) AND e.ts_ms = ANY(%s)",
                (gateway, [k[0] for k in keys], sorted({k[1] for k in keys})))}
        return [TenantEvent(_event_record(r), bool(r["problem"]))
                for key in keys if (r := found.get((key[0], key[1]))) is not None]

    def tenant_events(self, gateway: str, limit: int) -> list[TenantEvent]:
        """Tenant events above ``tenant_upto`` up to ``acked_upto``, with attachments.

        Acting on them is ordered: when some are due, the gateway's turn is taken first
        and they are read again (another instance may have acted on them meanwhile)."""
        with self._read() as conn:
            due = self._due_tenant_events(conn, gateway, limit)
        if due and getattr(self._local, "turns", None) is not None:
            self._turn(gateway)
            with self._read() as conn:
                due = self._due_tenant_events(conn, gateway, limit)
        return due

    @staticmethod
    def _advance(conn: Conn, gateway: str, upto: int) -> None:
        conn.execute("UPDATE gateways SET tenant_upto = greatest(tenant_upto, %s) "
                     "WHERE id = %s", (upto, gateway))

    def advance_tenant_cursor(self, gateway: str, upto: int) -> None:
        """Raise ``tenant_upto`` to ``upto`` (never lower it)."""
        with self._read() as conn:
            self._advance(conn, gateway, upto)

    def revoked(self, gateway: str, kind: str, digest: bytes) -> bool:
        """Whether ``digest`` is revoked (as ``kind``) at ``gateway`` or everywhere."""
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM revocations WHERE gateway IN (%s, '*') AND "
                                "kind = %s AND hash = %s", (gateway, kind, digest)
                                ).fetchone() is not None

    def permit_elsewhere(self, gateway: str, permit_hash: bytes, now_s: int) -> list[str]:
        """Other gateways that list this permit, or hold an open enrollment of it."""
        with self._read() as conn:
            return [r[0] for r in conn.execute(
                "SELECT gateway FROM entries WHERE permit = %s AND gateway != %s AND "
                "(valid_until IS NULL OR valid_until > %s) "
                "UNION SELECT gateway FROM enrollments WHERE permit_hash = %s AND "
                "gateway != %s AND status IN ('received', 'held', 'confirmed') ORDER BY 1",
                (permit_hash, gateway, now_s, permit_hash, gateway))]

    def record_enrollment(self, record: EnrollmentRecord) -> bool:
        """Store a new enrollment and move the cursor to its seq, together."""
        with self._tx() as conn:
            inserted = conn.execute(_INSERT_ENROLLMENT, _enrollment_row(record)).rowcount
            self._advance(conn, record.gateway, record.seq)
        return bool(inserted)

    @staticmethod
    def _enrollment_in(conn: Conn, gateway: str, enrollment_id: str, *,
                       lock: bool = False) -> EnrollmentRecord | None:
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT * FROM enrollments WHERE gateway = %s AND id = %s FOR UPDATE" if lock
                else "SELECT * FROM enrollments WHERE gateway = %s AND id = %s",
                (gateway, enrollment_id)).fetchone()
        return _enrollment(row) if row is not None else None

    @staticmethod
    def _next_version(conn: Conn, gateway: str, published_ms: int) -> Allocated:
        allocated = _allocate(conn, gateway, "list_version", published_ms)
        conn.execute("UPDATE gateways SET list_published_ms = %s WHERE id = %s",
                     (published_ms, gateway))
        return allocated

    def _unlist(self, conn: Conn, record: EnrollmentRecord, now_ms: int) -> ListChange | None:
        """A confirmed enrollment's card out of the list under a new version."""
        if record.status != "confirmed" or record.cred is None:
            return None
        if not conn.execute("DELETE FROM entries WHERE gateway = %s AND cred = %s",
                            (record.gateway, record.cred)).rowcount:
            return None  # removed meanwhile ('remove --card'): nothing to send
        version = self._next_version(conn, record.gateway, now_ms)
        return ListChange(version.seq, [], [record.cred], [record.id], version.prev)

    def end_enrollment(self, gateway: str, enrollment_id: str, seq: int, reason: str,
                       ended_ms: int) -> ListChange | None:
        """Mark an enrollment ended (its card out of the list) and move the cursor."""
        self._turn(gateway)
        with self._tx() as conn:
            self._advance(conn, gateway, seq)
            record = self._enrollment_in(conn, gateway, enrollment_id, lock=True)
            if record is None or record.status == "ended":
                return None
            change = self._unlist(conn, record, ended_ms)
            conn.execute("UPDATE enrollments SET status = 'ended', reason = %s, "
                         "ended_ms = %s, list_version = coalesce(%s, list_version) "
                         "WHERE gateway = %s AND id = %s",
                         (reason, ended_ms, None if change is None else change.version,
                          gateway, enrollment_id))
        return change

    def enrollment(self, gateway: str, enrollment_id: str) -> EnrollmentRecord | None:
        """One enrollment."""
        with self._read() as conn:
            return self._enrollment_in(conn, gateway, enrollment_id)

    def enrollments(self, gateway: str | None = None, status: str | None = None
                    ) -> list[EnrollmentRecord]:
        """Enrollments of one gateway or all, of one status or all."""
        with self._read() as conn, conn.cursor(row_factory=dict_row) as cur:
            return [_enrollment(r) for r in cur.execute(
                "SELECT * FROM enrollments WHERE (%s::text IS NULL OR gateway = %s) AND "
                "(%s::text IS NULL OR status = %s) ORDER BY gateway, seq",
                (gateway, gateway, status, status))]

    def hold_enrollments(self, gateway: str, ids: Sequence[str], reason: str) -> None:
        """Received enrollments to ``held``."""
        with self._read() as conn:
            conn.execute("UPDATE enrollments SET status = 'held', reason = %s "
                         "WHERE gateway = %s AND id = ANY(%s) AND status = 'received'",
                         (reason, gateway, list(ids)))

    def confirm_enrollments(self, gateway: str, entries: Mapping[str, EntryRecord],
                            decided_ms: int) -> ListChange | None:
        """Entries in, enrollments confirmed, one new list version; None if none was."""
        self._turn(gateway)
        with self._tx() as conn:
            confirmed = [i for i in entries if conn.execute(
                "UPDATE enrollments SET status = 'confirmed', reason = NULL, "
                "decided_ms = %s, decision_seq = NULL WHERE gateway = %s AND id = %s AND "
                "status IN ('received', 'held')", (decided_ms, gateway, i)).rowcount]
            if not confirmed:
                return None  # nothing written: the version stays unspent
            upsert = [entries[i] for i in confirmed]
            with conn.cursor() as cur:
                cur.executemany(_ENTRY_UPSERT, [_entry_row(gateway, e) for e in upsert])
            version = self._next_version(conn, gateway, decided_ms)
            conn.execute("UPDATE enrollments SET list_version = %s WHERE gateway = %s AND "
                         "id = ANY(%s)", (version.seq, gateway, confirmed))
        return ListChange(version.seq, upsert, [], confirmed, version.prev)

    def reject_enrollment(self, gateway: str, enrollment_id: str, reason: str,
                          decided_ms: int) -> tuple[EnrollmentRecord, ListChange | None] | None:
        """Reject an open or confirmed enrollment; its decision becomes due."""
        self._turn(gateway)
        with self._tx() as conn:
            record = self._enrollment_in(conn, gateway, enrollment_id, lock=True)
            if record is None or record.status not in ("received", "held", "confirmed"):
                return None
            change = self._unlist(conn, record, decided_ms)
            conn.execute("UPDATE enrollments SET status = 'rejected', reason = %s, "
                         "decided_ms = %s, decision_seq = NULL, "
                         "list_version = coalesce(%s, list_version) "
                         "WHERE gateway = %s AND id = %s",
                         (reason, decided_ms, None if change is None else change.version,
                          gateway, enrollment_id))
            after = self._enrollment_in(conn, gateway, enrollment_id)
        assert after is not None
        return after, change

    def resend_decision(self, gateway: str, enrollment_id: str) -> bool:
        """Make a confirmed or rejected enrollment's decision due again."""
        with self._read() as conn:
            return bool(conn.execute(
                "UPDATE enrollments SET decision_seq = NULL WHERE gateway = %s AND id = %s "
                "AND status IN ('confirmed', 'rejected')", (gateway, enrollment_id)).rowcount)

    def allocate_decisions(self, gateway: str, limit: int, now_ms: int
                           ) -> tuple[int, list[EnrollmentRecord]] | None:
        """The next ``enr`` seq and the due decisions it carries (marked sent)."""
        due_sql = ("SELECT * FROM enrollments WHERE gateway = %s AND status IN "
                   "('confirmed', 'rejected') AND decision_seq IS NULL ORDER BY seq LIMIT %s")
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM enrollments WHERE gateway = %s AND status IN "
                            "('confirmed', 'rejected') AND decision_seq IS NULL LIMIT 1",
                            (gateway,)).fetchone() is None:
                return None  # the usual answer, without a turn or a transaction
        self._turn(gateway)
        with self._tx() as conn:
            with conn.cursor(row_factory=dict_row) as cur:
                rows = [_enrollment(r) for r in cur.execute(
                    cast(Any, due_sql + " FOR UPDATE"), (gateway, limit))]
            if not rows:
                return None
            seq = _allocate(conn, gateway, "enr_seq", now_ms).seq
            conn.execute("UPDATE enrollments SET decision_seq = %s WHERE gateway = %s AND "
                         "id = ANY(%s)", (seq, gateway, [r.id for r in rows]))
        return seq, [dataclasses.replace(r, decision_seq=seq) for r in rows]

    # -- requests from one-shot commands to the running serve --------------------------

    def queue_request(self, op: str, args: str, requested_ms: int) -> int:
        """Queue a request; returns its id."""
        with self._read() as conn:
            row = conn.execute("INSERT INTO requests (op, args, requested_ms) VALUES "
                               "(%s, %s, %s) RETURNING id", (op, args, requested_ms)
                               ).fetchone()
        assert row is not None
        return int(row[0])

    def request_outcome(self, request: int) -> RequestOutcome | None:
        """How the request ended, or None while it is open. One taken by a ``serve``
        whose server session has ended is closed now as failed (whether it was sent is
        unknown, as when a stopped serve is found at the next start)."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT done_ms, result, error_kind, error, taken_ms IS NOT NULL AND "
                "(taken_by IS NULL OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
                "WHERE a.pid = requests.taken_by)) FROM requests WHERE id = %s",
                (request,)).fetchone()
            if row is None:
                raise CentralError(f"{self.where}: request {request} is not in the queue")
            done, result, kind, error, orphaned = row
            if done is None and orphaned:
                conn.execute("UPDATE requests SET done_ms = (extract(epoch FROM now()) * "
                             "1000)::bigint, error_kind = 'failure', error = 'serve stopped "
                             "while performing it' WHERE id = %s AND done_ms IS NULL",
                             (request,))
                return self.request_outcome(request)
        return None if done is None else RequestOutcome(result, kind, error)

    def withdraw_request(self, request: int, now_ms: int) -> bool:
        """Close a request as ``expired`` unless ``serve`` has taken it."""
        with self._read() as conn:
            return bool(conn.execute(
                "UPDATE requests SET done_ms = %s, error_kind = 'expired' "
                "WHERE id = %s AND taken_ms IS NULL", (now_ms, request)).rowcount)

    def open_requests(self) -> list[PendingRequest]:
        """Requests neither taken nor done, oldest first."""
        with self._read() as conn:
            return [PendingRequest(*row) for row in conn.execute(
                "SELECT id, op, args, requested_ms FROM requests WHERE done_ms IS NULL "
                "AND taken_ms IS NULL ORDER BY id")]

    def take_request(self, request: int, now_ms: int) -> bool:
        """Claim an open request; False when it was withdrawn (or taken by another
        instance) meanwhile."""
        with self._read() as conn:
            return bool(conn.execute(
                "UPDATE requests SET taken_ms = %s, taken_by = coalesce(%s, "
                "pg_backend_pid()) WHERE id = %s AND taken_ms IS NULL AND done_ms IS NULL",
                (now_ms, self.taker_pid, request)).rowcount)

    def finish_request(self, request: int, now_ms: int, outcome: RequestOutcome) -> None:
        """Record a request's outcome (once)."""
        with self._read() as conn:
            conn.execute("UPDATE requests SET done_ms = %s, result = %s, error_kind = %s, "
                         "error = %s WHERE id = %s AND done_ms IS NULL",
                         (now_ms, outcome.result, outcome.error_kind, outcome.error, request))

    def reset_requests(self, now_ms: int, keep_ms: int) -> None:
        """Forget old finished requests; close those a stopped ``serve`` had taken (not
        those another running instance is performing)."""
        with self._tx() as conn:
            conn.execute("DELETE FROM requests WHERE done_ms IS NOT NULL AND done_ms < %s",
                         (now_ms - keep_ms,))
            conn.execute("UPDATE requests SET done_ms = %s, error_kind = 'failure', "
                         "error = 'serve stopped while performing it' "
                         "WHERE taken_ms IS NOT NULL AND done_ms IS NULL AND "
                         "(taken_by IS NULL OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
                         "WHERE a.pid = requests.taken_by))", (now_ms,))


# -- several serves on one database -------------------------------------------------------


class PostgresServeLock:
    """This process's place among the publishers of one PostgreSQL database: the
    counterpart of ``serve.lock`` (``provisioning.handoff.FolderLock``) and the order of
    publishing between several ``serve`` instances (``provisioning.serve.PublishOrder``).

    ``hold(exclusive=True)`` is taken by a ``serve``: without a share group it must be
    the only one; with one, it shares the database with other serves of distinct client
    ids. ``hold(exclusive=False)`` is taken by a one-shot command, which is refused while
    any serve runs (it hands its operation over instead). Both are session advisory locks
    on a connection of their own, so a killed process lets go of them at once."""

    def __init__(self, db: PostgresOfficeDatabase, client_id: str,
                 share_group: str | None) -> None:
        self._db = db
        self._client_id = client_id
        self._share_group = share_group
        self._conn: Conn | None = None
        self._leading = False
        self.refusal = ""
        """Why the last ``hold`` failed, for the message."""

    def hold(self, *, exclusive: bool) -> bool:
        """Take the lock (``serve``: exclusive; a one-shot publisher: shared); False when
        it cannot be had now. Holding it already counts."""
        if self._conn is not None:
            return True
        conn = self._db.connect()
        try:
            ok = self._take(conn, as_serve=exclusive)
        except psycopg.Error as exc:
            conn.close()
            raise CentralError(f"{self._db.where}: {str(exc).strip()}") from exc
        if not ok:
            conn.close()
            return False
        self._conn = conn
        if exclusive:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            self._db.taker_pid = None if row is None else int(row[0])
        return True

    def _take(self, conn: Conn, *, as_serve: bool) -> bool:
        with conn.transaction():
            # Deciding and taking under one mutex: a serve and a one-shot command that
            # start together cannot both find the other absent.
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NS, MUTEX_KEY))
            return self._take_serve(conn) if as_serve else self._take_oneshot(conn)

    @staticmethod
    def _try(conn: Conn, query: str, ns: int, key: int) -> bool:
        row = conn.execute(cast(Any, query), (ns, key)).fetchone()
        return bool(row and row[0])

    def _take_oneshot(self, conn: Conn) -> bool:
        if not self._try(conn, "SELECT pg_try_advisory_lock(%s, %s)", LOCK_NS, SERVE_KEY):
            self.refusal = "a serve is running"
            return False
        self._try(conn, "SELECT pg_advisory_unlock(%s, %s)", LOCK_NS, SERVE_KEY)
        return self._try(conn, "SELECT pg_try_advisory_lock_shared(%s, %s)", LOCK_NS,
                         ONESHOT_KEY)

    def _take_serve(self, conn: Conn) -> bool:
        if not self._try(conn, "SELECT pg_try_advisory_lock(%s, %s)", LOCK_NS, ONESHOT_KEY):
            self.refusal = "a one-shot command is publishing"
            return False
        self._try(conn, "SELECT pg_advisory_unlock(%s, %s)", LOCK_NS, ONESHOT_KEY)
        if self._share_group is None:
            if self._try(conn, "SELECT pg_try_advisory_lock(%s, %s)", LOCK_NS, SERVE_KEY):
                return True
            self.refusal = "another 'serve' is running on this database"
            return False
        if not self._try(conn, "SELECT pg_try_advisory_lock_shared(%s, %s)", LOCK_NS,
                         SERVE_KEY):
            self.refusal = "another 'serve' without a share group is running on this database"
            return False
        if self._try(conn, "SELECT pg_try_advisory_lock(%s, %s)", CLIENT_NS,
                     _key(self._client_id)):
            return True
        self._try(conn, "SELECT pg_advisory_unlock_shared(%s, %s)", LOCK_NS, SERVE_KEY)
        self.refusal = (f"another 'serve' with client id {self._client_id!r} is running on "
                        "this database")
        return False

    def release(self) -> None:
        """Let go of the lock (and the lead), if held."""
        conn, self._conn = self._conn, None
        self._leading = False
        if conn is not None:
            self._db.taker_pid = None
            with contextlib.suppress(psycopg.Error):
                conn.close()  # the session's advisory locks go with it

    # -- PublishOrder (provisioning.serve) ------------------------------------------------

    def begin(self, flush: Callable[[], None]) -> None:
        """Start a unit of the worker's work: allocations take their gateway's turn."""
        self._db.begin_turns(flush)

    def end(self) -> None:
        """End the unit: flush, give the turn back."""
        self._db.end_turns()

    def leads(self) -> bool:
        """Whether this serve sends the periodic heartbeats: one serve of the database
        at a time, the first to ask; another takes over when its session ends."""
        conn = self._conn
        if conn is None:
            return True  # not serving against others (tests driving a Central directly)
        if not self._leading:
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)",
                                   (LOCK_NS, LEADER_KEY)).fetchone()
            except psycopg.Error as exc:
                raise CentralError(f"{self._db.where}: {str(exc).strip()}") from exc
            self._leading = bool(row and row[0])
        return self._leading
