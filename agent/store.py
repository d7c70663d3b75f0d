"""The SQLite store: the event database and, through ``agent.lists``, the list database.

Two database files, both in WAL mode with ``synchronous=FULL`` so a commit is on disk
before the call returns (an event is durable before its door opens):

- the **event database** (``store.path``): the hash-chained event log (also the outbox),
  presence for anti-passback, and the live state of doors and readers for ``status``;
- the **list database** (``<name>-lists.db`` beside it): the allowlist (credentials by
  keyed hash), revocations and the version of every synced stream.

They are separate so that applying a whole list, a long write transaction, never holds
the write lock the card path needs to commit its event: taps go on being decided and
recorded while a million-entry list is applied. Schema changes are numbered migrations
per file.

Threads: each thread reads through its own connections; every write that extends the
event chain goes through ``append`` under one lock, which keeps sequence numbers and the
chain gap-free.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from agent.decision import Direction, Grant, Lookup, Presence
from agent.lists import LIST_MIGRATIONS, CredentialEntry, ListWrites
from agent.tenants import Tenants
from common.sqlite import SqliteFile, StoreError, rollback
from protocol.chain import GENESIS, Event, contents_match, event_hash

__all__ = ["SCHEMA_VERSION", "ChainReport", "CredentialEntry", "Store", "StoredEvent",
           "lists_path", "time_ordered_uuid"]

EVENT_MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE presence (
        cred BLOB PRIMARY KEY,
        direction TEXT NOT NULL,
        at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        ts_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        door TEXT,
        reader TEXT,
        direction TEXT,
        reason TEXT,
        cred TEXT,                      -- short prefix of the credential hash only
        data TEXT,                      -- JSON object of further fields
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        acked INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX events_unacked ON events(seq) WHERE acked = 0;
    CREATE TABLE device_state (
        kind TEXT NOT NULL,
        id TEXT NOT NULL,
        state TEXT NOT NULL,
        since_ms INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    ) WITHOUT ROWID;
    """,
    # 2: what travels with an event to the office but is not kept once it acknowledged
    # it (an enrollment's sealed permit number and full card hash); the event's own data
    # carries the SHA-256 of the attachment, so the chain covers it.
    """
    CREATE TABLE attachments (
        seq INTEGER PRIMARY KEY,
        body TEXT NOT NULL
    );
    """,
)

SCHEMA_VERSION = len(EVENT_MIGRATIONS)
READER_CACHE_KIB = 256
"""The page cache of each thread's connections (every reader thread has one to each
file): SQLite's 2 MiB default, times two files and a dozen threads, was a fifth of the
agent's resident set. A look-up touches a handful of pages, and the kernel's page cache
holds the rest (bench/load.py, bench/decision.py)."""
PRUNE_BATCH = 5000
"""Events deleted per transaction when pruning: short enough that a tap waiting for the
write lock is not held up for long."""
@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as committed, with its place in the chain."""

    seq: int
    event_id: str
    ts_ms: int
    kind: str
    door: str | None
    reader: str | None
    direction: str | None
    reason: str | None
    cred: str | None
    data: dict[str, Any]
    prev_hash: str
    hash: str
    acked: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {
            "seq": self.seq, "event_id": self.event_id, "ts_ms": self.ts_ms,
            "kind": self.kind, "door": self.door, "reader": self.reader,
            "direction": self.direction, "reason": self.reason, "cred": self.cred,
            "data": self.data, "prev_hash": self.prev_hash, "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The result of verifying the event chain."""

    ok: bool
    checked: int
    first_seq: int | None
    last_seq: int | None
    problems: tuple[str, ...]


def time_ordered_uuid(ms: int) -> uuid.UUID:
    """A version 7 UUID (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Ids that grow with time land on the rightmost page of the unique index, so an insert
    touches one page there instead of a random one (the card path writes fewer pages).
    """
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 \
        | (0b10 << 62) | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    return uuid.UUID(int=value)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def lists_path(path: Path) -> Path:
    """The list database that belongs to the event database at ``path``."""
    return path.with_name(f"{path.stem}-lists{path.suffix or '.db'}")


class Store(ListWrites):
    """The agent's databases. Open one per process; it hands each thread connections."""

    def __init__(self, path: Path, *, clock_ms: Any = _now_ms,
                 background_checkpoint: bool = False) -> None:
        self.path = path
        self.lists_path = lists_path(path)
        self._clock_ms = clock_ms
        self.clock_tag: Callable[[], str | None] | None = None
        """Set by the agent: the clock's state when it is not ``ok`` (agent/clock.py)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path.parent}: cannot create the store directory: "
                             f"{exc.strerror}") from exc
        self._ev = SqliteFile(path, EVENT_MIGRATIONS, autocheckpoint=not background_checkpoint,
                              reader_cache_kib=READER_CACHE_KIB)
        try:
            self._ls = SqliteFile(self.lists_path, LIST_MIGRATIONS, autocheckpoint=True,
                                  reader_cache_kib=READER_CACHE_KIB)
            self.tenants = Tenants(self._ls)
        except BaseException:
            self._ev.close()
            raise
        self._write_lock = self._ev.write_lock
        self._writer = self._ev.writer
        self._staged: int | None = None
        """Entries staged by ``add_snapshot_chunk`` since ``begin_snapshot``."""
        self._reclaim = True
        """Whether replaced list tables may remain to be emptied (``reclaim_step``)."""
        try:
            self._last_seq, self._last_hash = self._chain_head()
        except BaseException:
            self.close()
            raise

    def _conn(self) -> sqlite3.Connection:
        return self._ev.conn()

    def close(self) -> None:
        """Close every connection this store opened."""
        self._ev.close()
        self._ls.close()

    def db(self) -> sqlite3.Connection:
        """This thread's connection to the event database (for reading)."""
        return self._ev.conn()

    def checkpoint(self) -> None:
        """Copy committed WAL pages into the database files without blocking writers."""
        try:
            self._ev.conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: checkpoint failed: {exc}") from exc

    def schema_version(self) -> int:
        """The schema version of the event database."""
        return int(self.meta("schema_version") or 0)

    def quick_check(self) -> str:
        """SQLite's ``quick_check`` of both files: ``"ok"`` or the first problem found."""
        for db in (self._ev, self._ls):
            row = db.conn().execute("PRAGMA quick_check").fetchone()
            if str(row[0]) != "ok":
                return f"{db.path.name}: {row[0]}"
        return "ok"

    def meta(self, key: str) -> str | None:
        """A value from the event database's meta table."""
        return self._ev.meta(key)

    def set_meta(self, key: str, value: str) -> None:
        """Store a value in the event database's meta table."""
        with self._write_lock:
            try:
                self._writer.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot write {key}: {exc}") from exc

    # -- decisions -----------------------------------------------------------------

    def lookup(self, cred: bytes) -> Lookup:
        """Everything the decision needs about ``cred``; a database error becomes
        ``Lookup.error`` so the decision can deny with a reason instead of raising."""
        try:
            conn = self._ls.conn()
            row = conn.execute(
                "SELECT valid_from, valid_until, doors, schedule, permit, confirmed_at "
                "FROM credentials WHERE cred=?", (cred,)).fetchone()
            grant: Grant | None = None
            keys: tuple[bytes, ...] = (cred,)
            if row is not None:
                doors = (None if row[2] is None
                         else frozenset(row[2].split(",")) if row[2] else frozenset())
                grant = Grant(row[0], row[1], doors, row[3], row[5])
                if row[4] is not None:
                    keys = (cred, row[4])
            marks = ",".join("?" * len(keys))
            revoked = conn.execute(
                f"SELECT 1 FROM revocations WHERE key IN ({marks}) LIMIT 1",  # noqa: S608 - placeholders only
                keys).fetchone() is not None
            # A tenant enrolled here: provisional access, or confirmed access while the
            # office's list has not caught up; a move-out here revokes whatever the
            # office's list still says (agent/tenants.py).
            vrow = conn.execute("SELECT version FROM sync_state WHERE stream = 'list'"
                                ).fetchone()
            local, moved_out = self.tenants.lookup(conn, cred, int(vrow[0]) if vrow else 0)
            grant = grant or local
            revoked = revoked or moved_out
            prow = self._ev.conn().execute("SELECT direction, at FROM presence WHERE cred=?",
                                (cred,)).fetchone()
            presence = Presence(Direction(prow[0]), prow[1]) if prow else None
        except (sqlite3.Error, ValueError) as exc:
            return Lookup(error=f"{type(exc).__name__}: {exc}")
        return Lookup(grant=grant, revoked=revoked, presence=presence)

    # -- event log -----------------------------------------------------------------

    def _chain_head(self) -> tuple[int, str]:
        row = self._writer.execute(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
        anchor_seq = self.meta("chain_anchor_seq")
        anchor_hash = self.meta("chain_anchor_hash")
        if anchor_seq is not None and anchor_hash is not None:
            return int(anchor_seq), anchor_hash
        return 0, GENESIS

    def append(self, event: Event, *, presence: tuple[bytes, Direction] | None = None,
               device: tuple[str, str, str] | None = None,
               attachment: str | None = None) -> StoredEvent:
        """Append ``event`` durably and return it as committed.

        ``attachment`` travels to the office with the event and is deleted once the office
        acknowledges it; the event's data must carry its SHA-256 (``attachment_digest``)
        for the chain to cover it.

        ``presence`` (credential hash, direction) is updated in the same transaction, so
        anti-passback state and the event that explains it can never disagree.
        ``device`` (kind, id, state) likewise records the live state ``status`` shows.
        Raises ``StoreError`` when the write fails (disk full, I/O error); nothing is
        half-written then and the chain head is unchanged.
        """
        tag = self.clock_tag() if self.clock_tag is not None else None
        if tag is not None and "clock" not in event.data:
            # Events carry the clock state they were recorded under when it is not "ok"
            # (agent/clock.py); absent means the clock was judged right.
            event = replace(event, data={**event.data, "clock": tag})
        with self._write_lock:
            seq = self._last_seq + 1
            event_id = str(time_ordered_uuid(self._clock_ms()))
            ts_ms = self._clock_ms()
            digest = event_hash(self._last_hash, seq, event_id, ts_ms, event)
            data = json.dumps(dict(event.data), sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False)
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO events (seq, event_id, ts_ms, kind, door, reader, direction,"
                    " reason, cred, data, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (seq, event_id, ts_ms, event.kind, event.door, event.reader,
                     event.direction, event.reason, event.cred, data, self._last_hash, digest))
                if presence is not None:
                    conn.execute("INSERT OR REPLACE INTO presence VALUES (?,?,?)",
                                 (presence[0], presence[1].value, ts_ms // 1000))
                if device is not None:
                    conn.execute("INSERT OR REPLACE INTO device_state VALUES (?,?,?,?)",
                                 (*device, ts_ms))
                if attachment is not None:
                    conn.execute("INSERT INTO attachments VALUES (?,?)", (seq, attachment))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                rollback(conn)
                raise StoreError(f"{self.path}: cannot record event {event.kind!r}: "
                                 f"{exc}") from exc
            stored = StoredEvent(seq, event_id, ts_ms, event.kind, event.door, event.reader,
                                 event.direction, event.reason, event.cred,
                                 dict(event.data), self._last_hash, digest)
            self._last_seq, self._last_hash = seq, digest
            return stored

    def last_event_ms(self) -> int | None:
        """Time of the newest event, or None."""
        row = self._conn().execute("SELECT max(ts_ms) FROM events").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def events(self, *, after_seq: int = 0, limit: int | None = None, kind: str | None = None,
               door: str | None = None, reason: str | None = None,
               since_ms: int | None = None, newest_first: bool = False) -> list[StoredEvent]:
        """Events matching the filters, oldest first unless ``newest_first``."""
        clauses = ["seq > ?"]
        args: list[Any] = [after_seq]
        for column, value in (("kind", kind), ("door", door), ("reason", reason)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if since_ms is not None:
            clauses.append("ts_ms >= ?")
            args.append(since_ms)
        order = "DESC" if newest_first else "ASC"
        where = " AND ".join(clauses)
        sql = ("SELECT seq, event_id, ts_ms, kind, door, reader, direction, reason, cred, "  # noqa: S608 - fixed columns, values bound
               f"data, prev_hash, hash, acked FROM events WHERE {where} ORDER BY seq {order}")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._conn().execute(sql, args).fetchall()
        return [_stored(row) for row in rows]

    def iter_events(self, batch: int = 5000) -> Iterator[StoredEvent]:
        """Every stored event in sequence order, read in batches."""
        after = 0
        while True:
            chunk = self.events(after_seq=after, limit=batch)
            if not chunk:
                return
            yield from chunk
            after = chunk[-1].seq

    def verify_chain(self) -> ChainReport:
        """Recompute every event's hash and link; report gaps, edits and broken links."""
        problems: list[str] = []
        anchor_seq = int(self.meta("chain_anchor_seq") or 0)
        prev_hash = self.meta("chain_anchor_hash") or GENESIS
        expected_seq = anchor_seq + 1
        checked = 0
        first: int | None = None
        last: int | None = None
        for ev in self.iter_events():
            first = ev.seq if first is None else first
            last = ev.seq
            checked += 1
            if ev.seq != expected_seq:
                problems.append(f"gap: expected seq {expected_seq}, found {ev.seq}")
            if ev.prev_hash != prev_hash:
                problems.append(f"seq {ev.seq}: link broken (prev_hash does not match the "
                                "hash of the event before it)")
            if not contents_match(ev):
                problems.append(f"seq {ev.seq}: contents edited (hash does not match)")
            prev_hash = ev.hash
            expected_seq = ev.seq + 1
            if len(problems) >= 100:
                problems.append("… stopped after 100 problems")
                break
        return ChainReport(not problems, checked, first, last, tuple(problems))

    def prune(self, *, retention_days: int, max_events: int, keep_unacked: bool,
              presence_max_age_s: int | None = None, by_age: bool = True) -> int:
        """Delete old events and return how many went.

        Deletes the oldest events while they are older than ``retention_days`` (stopping at
        the first recent one, so an event stamped by a wrong clock never takes newer
        events with it) or while more than ``max_events`` are stored. Deletion is always a
        prefix of the chain; the hash of the newest deleted event becomes the chain anchor,
        so ``verify_chain`` still checks every remaining link. With ``keep_unacked`` an
        event the central office has not acknowledged is never deleted. Deletes run in
        batches of 5,000 so the card path never waits long for the write lock. Presence
        rows older than ``presence_max_age_s`` are deleted too.
        """
        now = self._clock_ms()
        reader = self._ev.conn()
        upto = 0
        if by_age:
            # Only with a clock judged right: a clock far ahead would make every event
            # look old (a +400-day jump deleted the whole log before this gate).
            first_recent = reader.execute(
                "SELECT min(seq) FROM events WHERE ts_ms >= ?",
                (now - retention_days * 86_400_000,)).fetchone()[0]
            upto = int(first_recent) - 1 if first_recent is not None else self._last_seq
        total = int(reader.execute("SELECT count(*) FROM events").fetchone()[0])
        if total > max_events:
            row = reader.execute("SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET ?",
                                 (total - max_events - 1,)).fetchone()
            upto = max(upto, int(row[0]))
        if keep_unacked:
            pending = self.first_unacked()
            if pending is not None:
                upto = min(upto, pending - 1)
        deleted = 0
        while True:
            with self._write_lock:
                conn = self._writer
                lowest = conn.execute("SELECT min(seq) FROM events").fetchone()[0]
                if lowest is None or lowest > upto:
                    break
                end = min(upto, int(lowest) + PRUNE_BATCH - 1)
                anchor = conn.execute("SELECT seq, hash FROM events WHERE seq <= ? "
                                      "ORDER BY seq DESC LIMIT 1", (end,)).fetchone()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    deleted += conn.execute("DELETE FROM events WHERE seq <= ?",
                                            (end,)).rowcount
                    conn.execute("DELETE FROM attachments WHERE seq <= ?", (end,))
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('chain_anchor_seq', ?)",
                                 (str(anchor[0]),))
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('chain_anchor_hash', ?)",
                                 (anchor[1],))
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    rollback(conn)
                    raise StoreError(f"{self.path}: cannot prune events: {exc}") from exc
        if presence_max_age_s is not None and by_age:
            with self._write_lock:
                try:
                    self._writer.execute("DELETE FROM presence WHERE at < ?",
                                         (now // 1000 - presence_max_age_s,))
                except sqlite3.Error as exc:
                    raise StoreError(f"{self.path}: cannot prune presence: {exc}") from exc
        return deleted

    def mark_acked(self, upto_seq: int) -> int:
        """Mark events up to ``upto_seq`` as acknowledged by the central office."""
        with self._write_lock:
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    "UPDATE events SET acked = 1 WHERE acked = 0 AND seq <= ?", (upto_seq,))
                # The office has them now: what only it may read leaves the gateway.
                conn.execute("DELETE FROM attachments WHERE seq <= ?", (upto_seq,))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                rollback(conn)
                raise StoreError(f"{self.path}: cannot mark events delivered: {exc}") from exc
            return int(cur.rowcount)

    def last_passages(self, creds: Sequence[bytes]) -> dict[bytes, int]:
        """When each of ``creds`` last passed a door (Unix s, from anti-passback presence,
        kept as long as events are), for the cards that did."""
        found: dict[bytes, int] = {}
        conn = self._conn()
        for start in range(0, len(creds), 500):
            part = creds[start:start + 500]
            marks = ",".join("?" * len(part))
            for cred, at in conn.execute(
                    f"SELECT cred, at FROM presence WHERE cred IN ({marks})", part):  # noqa: S608 - placeholders only
                found[bytes(cred)] = int(at)
        return found

    def first_seq_since(self, since_ms: int) -> int | None:
        """The first event at or after ``since_ms``, found by bisection over seq (event
        times follow seq except across a clock step, where this errs by that step)."""
        conn = self._conn()
        lo, hi = conn.execute("SELECT min(seq), max(seq) FROM events").fetchone()
        if lo is None:
            return None
        lo, hi = int(lo), int(hi) + 1
        while lo < hi:
            mid = (lo + hi) // 2
            row = conn.execute("SELECT ts_ms FROM events WHERE seq >= ? ORDER BY seq LIMIT 1",
                               (mid,)).fetchone()
            if row is None or int(row[0]) >= since_ms:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def entries_per_day(self, zone: tzinfo, since_ms: int) -> list[dict[str, Any]]:
        """Granted entries per site-local day and door since ``since_ms``: counts only."""
        first = self.first_seq_since(since_ms)
        if first is None:
            return []
        counts: dict[tuple[str, str], int] = {}
        for ts_ms, door in self._conn().execute(
                "SELECT ts_ms, door FROM events WHERE seq >= ? AND kind = 'access_granted' "
                "AND direction = 'entry'", (first,)):
            day = datetime.fromtimestamp(ts_ms / 1000, zone).date().isoformat()
            counts[(day, door)] = counts.get((day, door), 0) + 1
        return [{"day": day, "door": door, "count": n}
                for (day, door), n in sorted(counts.items())]

    def attachments(self, first_seq: int, last_seq: int) -> dict[int, str]:
        """The attachments of the events ``first_seq``..``last_seq`` still held."""
        return {int(seq): str(body) for seq, body in self._conn().execute(
            "SELECT seq, body FROM attachments WHERE seq BETWEEN ? AND ?",
            (first_seq, last_seq))}

    def overflow(self, max_events: int) -> tuple[int, int] | None:
        """(first, last) seq of the undelivered events that must go for the store to hold
        no more than ``max_events`` once every delivered one is gone; None if none must."""
        conn = self._ev.conn()
        total = int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
        if total <= max_events:
            return None
        row = conn.execute("SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET ?",
                           (total - max_events - 1,)).fetchone()
        first = conn.execute("SELECT min(seq) FROM events").fetchone()[0]
        return int(first), int(row[0])

    def first_unacked(self) -> int | None:
        """The oldest event the central office has not acknowledged, or None."""
        row = self._ev.conn().execute(
            "SELECT min(seq) FROM events WHERE acked = 0").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def last_seq(self) -> int:
        """The sequence number of the newest event."""
        return self._last_seq

    # -- status --------------------------------------------------------------------

    def set_device_state(self, kind: str, ident: str, state: str) -> None:
        """Record the live state of a door or reader for ``status``."""
        with self._write_lock:
            self._writer.execute("INSERT OR REPLACE INTO device_state VALUES (?,?,?,?)",
                                 (kind, ident, state, self._clock_ms()))

    def device_states(self) -> list[dict[str, Any]]:
        """Every recorded door and reader state."""
        return _dicts(self._ev.conn().execute(
            "SELECT kind, id, state, since_ms FROM device_state ORDER BY kind, id"))

    def sync_states(self) -> list[dict[str, Any]]:
        """Version and time of every synced stream."""
        return _dicts(self._ls.conn().execute(
            "SELECT stream, version, updated_ms, detail FROM sync_state ORDER BY stream"))

    def counts(self, *only: str) -> dict[str, int]:
        """Row counts that ``status`` reports: ``credentials``, ``revocations``,
        ``events``, ``outbox``, or just those named in ``only``. Each count reads its
        whole table (a million-entry list is a 100 MB read): what runs every few seconds
        asks for the one it needs."""
        ev, ls = self._ev.conn(), self._ls.conn()
        queries = {
            "credentials": (ls, "SELECT count(*) FROM credentials"),
            "revocations": (ls, "SELECT count(*) FROM revocations"),
            "events": (ev, "SELECT count(*) FROM events"),
            "outbox": (ev, "SELECT count(*) FROM events WHERE acked = 0"),
        }
        return {name: int(conn.execute(sql).fetchone()[0])
                for name, (conn, sql) in queries.items() if not only or name in only}


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """Every row of ``cursor`` as a dict by column name."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def _stored(row: Sequence[Any]) -> StoredEvent:
    return StoredEvent(int(row[0]), row[1], int(row[2]), row[3], row[4], row[5], row[6],
                       row[7], row[8], json.loads(row[9]) if row[9] else {}, row[10], row[11],
                       bool(row[12]))
