"""The list database: the allowlist, revocations and every synced stream's version.

``ListWrites`` is the part of ``agent.store.Store`` that writes the list database (the
``<name>-lists.db`` file beside the event database): whole lists, snapshots staged chunk
by chunk and swapped in, deltas and revocations. Every write streams its rows in batches
of ``LIST_BATCH`` and none holds the list write lock for long: a snapshot's staged rows go
in a transaction per step, the swap renames tables, and the tables it replaced are emptied
afterwards a step at a time (``reclaim_step``), so a revocation or a reader never waits for
work in proportion to the list (bench/load.py, bench/revocation.py).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import structlog

from agent.tenants import LIST_MIGRATION as TENANTS_MIGRATION
from common.sqlite import SqliteFile, StoreError, rollback

log = structlog.get_logger()

LIST_MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE credentials (
        cred BLOB PRIMARY KEY,          -- HMAC-SHA256(site key, card id)
        permit BLOB,                    -- HMAC-SHA256(office permit key, permit number)
        valid_from INTEGER,             -- Unix s, inclusive; NULL = unbounded
        valid_until INTEGER,            -- Unix s, exclusive; NULL = unbounded
        doors TEXT,                     -- door ids joined by commas, NULL for every door
        schedule TEXT NOT NULL DEFAULT 'always',
        confirmed_at INTEGER            -- Unix s the office last confirmed the permit
    ) WITHOUT ROWID;
    CREATE INDEX credentials_permit ON credentials(permit);
    CREATE TABLE revocations (
        key BLOB PRIMARY KEY,           -- a credential hash or a permit hash
        kind TEXT NOT NULL CHECK (kind IN ('credential', 'permit')),
        revoked_at INTEGER NOT NULL,
        stream TEXT,                    -- the stream that brought it (rev, all, snapshot)
        seq INTEGER                     -- and its seq there
    ) WITHOUT ROWID;
    CREATE TABLE sync_state (
        stream TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        detail TEXT
    ) WITHOUT ROWID;
    """,
    # 2: tenants enrolled at the gateway (agent/tenants.py).
    TENANTS_MIGRATION,
    # 3: no query looks credentials up by permit (revocations are keyed by the permit
    # hash itself), and the index made every list write slower.
    "DROP INDEX IF EXISTS credentials_permit;",
)
LIST_BATCH = 5000
"""Rows per ``executemany`` when a list is written (whole lists, snapshot chunks, deltas,
revocations): rows are pulled from the caller's iterator a batch at a time, so a list
operation holds at most this many rows in memory whatever its size (bench/load.py)."""

_CREDENTIALS_TABLE = """CREATE TABLE {name} (
    cred BLOB PRIMARY KEY, permit BLOB, valid_from INTEGER, valid_until INTEGER, doors TEXT,
    schedule TEXT NOT NULL DEFAULT 'always', confirmed_at INTEGER) WITHOUT ROWID"""
_REVOCATIONS_TABLE = """CREATE TABLE {name} (
    key BLOB PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('credential', 'permit')),
    revoked_at INTEGER NOT NULL, stream TEXT, seq INTEGER) WITHOUT ROWID"""
"""The allowlist table as ``replace_allowlist`` rebuilds it (same columns as migration 1)."""



@dataclass(frozen=True, slots=True)
class CredentialEntry:
    """One allowlist row, already hashed."""

    cred: bytes
    permit: bytes | None = None
    valid_from: int | None = None
    valid_until: int | None = None
    doors: tuple[str, ...] | None = None
    schedule: str = "always"
    confirmed_at: int | None = None



def _credential_row(entry: CredentialEntry) -> tuple[Any, ...]:
    """The table row of an allowlist entry; refuses what would not read back the same."""
    if not isinstance(entry, CredentialEntry):
        raise TypeError(f"not an allowlist entry: {type(entry).__name__}")
    doors: str | None = None
    if entry.doors is not None:
        for door in entry.doors:
            if not isinstance(door, str) or not door or "," in door:
                raise ValueError(f"door id {door!r} is not a plain non-empty id")
        doors = ",".join(entry.doors)
    return (entry.cred, entry.permit, entry.valid_from, entry.valid_until, doors,
            entry.schedule, entry.confirmed_at)



class ListWrites:
    """The list-database half of ``agent.store.Store`` (which sets these attributes)."""

    _ls: SqliteFile
    lists_path: Path
    _clock_ms: Callable[[], int]
    _staged: int | None
    _reclaim: bool

    def replace_allowlist(self, entries: Iterable[CredentialEntry], version: int,
                          *, stream: str = "list") -> int:
        """Replace the whole allowlist with ``entries`` in one transaction.

        Either every entry is applied and the version recorded, or nothing changes.
        Entries are streamed in batches of ``LIST_BATCH``, never held in memory together.
        """
        rows = (_credential_row(e) for e in entries)
        with self._ls.write_lock:
            conn = self._ls.writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                # Fill a fresh table and swap it in: readers keep seeing the old list
                # until COMMIT.
                conn.execute("DROP TABLE IF EXISTS credentials_new")
                conn.execute("DROP TABLE IF EXISTS credentials_old")
                conn.execute(_CREDENTIALS_TABLE.format(name="credentials_new"))
                count = _write_rows(conn, "INSERT INTO credentials_new VALUES (?,?,?,?,?,?,?)",
                                    rows)
                conn.execute("DROP TABLE credentials")
                conn.execute("ALTER TABLE credentials_new RENAME TO credentials")
                conn.execute("INSERT OR REPLACE INTO sync_state VALUES (?,?,?,?)",
                             (stream, version, self._clock_ms(),
                              json.dumps({"entries": count})))
                conn.execute("COMMIT")
            except Exception as exc:
                # Whatever failed (the database, a bad row, the source of the entries), the
                # transaction is rolled back and the previous list stays in force.
                rollback(conn)
                raise StoreError(f"{self.lists_path}: allowlist version {version} not applied: "
                                 f"{type(exc).__name__}: {exc}") from exc
            except BaseException:
                rollback(conn)
                raise
            return count

    def revoke(self, keys: Iterable[tuple[bytes, str]], version: int | None = None,
               *, stream: str = "revocations") -> int:
        """Record revocations ``(hash, 'credential'|'permit')``; returns how many.

        ``keys`` is streamed (never held whole) and written ``LIST_BATCH`` at a time, each
        batch in a transaction of its own, so the list write lock is free between batches
        (a tenant moving out need not wait for 40,000 revocations). The design allows it
        for revocations alone: each only takes access away, so batches committed before a
        failure may stay in force. The stream's ``version`` is recorded with the last
        batch: a revocation cut short is not recorded as applied, and applying it again
        (it comes back with the next resync) replaces the same rows.
        """
        now_s = self._clock_ms() // 1000
        rows = ((k, kind, now_s, stream, version) for k, kind in keys)
        count = 0
        try:
            for batch, last in _batches(rows):
                def run(conn: sqlite3.Connection, batch: list[Any] = batch,
                        last: bool = last) -> None:
                    conn.executemany("INSERT OR REPLACE INTO revocations VALUES (?,?,?,?,?)",
                                     batch)
                    if last and version is not None:
                        conn.execute("INSERT OR REPLACE INTO sync_state VALUES (?,?,?,NULL)",
                                     (stream, version, self._clock_ms()))
                self._list_write(f"record revocations (the first {count} are recorded)", run)
                count += len(batch)
        except StoreError:
            raise
        except Exception as exc:
            # The source of the keys failed between batches: what was committed stays.
            raise StoreError(f"{self.lists_path}: cannot record revocations (the first "
                             f"{count} are recorded): {type(exc).__name__}: {exc}") from exc
        return count

    # -- sync ----------------------------------------------------------------------

    def versions(self) -> dict[str, int]:
        """The highest applied version or sequence number of every synced stream."""
        rows = self._ls.conn().execute("SELECT stream, version FROM sync_state").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def stream_detail(self, stream: str) -> dict[str, Any] | None:
        """The JSON detail recorded with a stream's version, or None."""
        row = self._ls.conn().execute("SELECT detail FROM sync_state WHERE stream=?",
                                      (stream,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def set_stream(self, stream: str, version: int, detail: Mapping[str, Any] | None = None
                   ) -> None:
        """Record a stream's version (and detail) durably."""
        self._list_write("record stream state", lambda c: c.execute(
            "INSERT OR REPLACE INTO sync_state VALUES (?,?,?,?)",
            (stream, version, self._clock_ms(), json.dumps(dict(detail)) if detail else None)))

    def begin_snapshot(self) -> None:
        """Prepare empty staging tables for a snapshot arriving in chunks; a previous,
        unfinished staging (a crash mid-download) is discarded, and so are replaced tables
        not yet emptied."""
        def run(conn: sqlite3.Connection) -> None:
            for table in ("credentials_new", "revocations_new", "credentials_old",
                          "revocations_old"):
                conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(_CREDENTIALS_TABLE.format(name="credentials_new"))
            conn.execute(_REVOCATIONS_TABLE.format(name="revocations_new"))
        self._list_write("begin snapshot", run)
        self._staged = 0

    def add_snapshot_chunk(self, entries: Iterable[CredentialEntry],
                           revoked: Iterable[tuple[bytes, str]]) -> None:
        """Stage rows of a chunk in one transaction, streaming ``entries`` and ``revoked``
        in batches. The live list is untouched until ``commit_snapshot``."""
        now_s = self._clock_ms() // 1000
        added = 0
        def run(conn: sqlite3.Connection) -> None:
            nonlocal added
            added = _write_rows(conn, "INSERT INTO credentials_new VALUES (?,?,?,?,?,?,?)",
                                (_credential_row(e) for e in entries))
            _write_rows(conn, "INSERT OR REPLACE INTO revocations_new VALUES (?,?,?,?,NULL)",
                        ((k, kind, now_s, "snapshot") for k, kind in revoked))
        self._list_write("stage snapshot chunk", run)
        self._staged = (self._staged or 0) + added

    def commit_snapshot(self, version: int, streams: Mapping[str, int],
                        expected: tuple[int, int]) -> None:
        """Swap the staged list and revocations in, in one transaction, with the list
        version and the revocation streams' seqs it covers. ``expected`` (entries,
        revocations) must match what was staged, or nothing changes.

        Revocations that arrived on a stream after the seq the snapshot covers (they may
        overtake the snapshot on their own topic) are kept, and a stream's recorded seq
        never goes backwards. The swap renames tables and does no work in proportion to
        the list: the replaced tables are emptied afterwards, a batch at a time
        (``reclaim_step``), so the list write lock is never held for long."""
        def run(conn: sqlite3.Connection) -> None:
            entries = self._staged
            if entries is None:  # staged by another Store object (a restart): count them
                entries = int(conn.execute("SELECT count(*) FROM credentials_new"
                                           ).fetchone()[0])
            staged = (entries,
                      int(conn.execute("SELECT count(*) FROM revocations_new").fetchone()[0]))
            if staged != expected:
                raise ValueError(f"staged {staged[0]} entries and {staged[1]} revocations, "
                                 f"the manifest lists {expected[0]} and {expected[1]}")
            row = conn.execute("SELECT version FROM sync_state WHERE stream='list'").fetchone()
            if row is not None and int(row[0]) >= version:
                raise ValueError(f"the list is already at version {row[0]}, not older than "
                                 f"this snapshot's {version}")
            for stream, seq in streams.items():
                conn.execute("INSERT OR IGNORE INTO revocations_new SELECT * FROM revocations "
                             "WHERE stream = ? AND seq > ?", (stream, seq))
            for table in ("credentials", "revocations"):
                # A replaced table not yet emptied (a snapshot soon after the last one)
                # goes now, whole.
                conn.execute(f"DROP TABLE IF EXISTS {table}_old")
                conn.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
                conn.execute(f"ALTER TABLE {table}_new RENAME TO {table}")
            now = self._clock_ms()
            conn.execute("INSERT OR REPLACE INTO sync_state VALUES ('list',?,?,?)",
                         (version, now, json.dumps({"entries": staged[0],
                                                    "revocations": staged[1]})))
            for stream, seq in streams.items():
                conn.execute("INSERT INTO sync_state VALUES (?,?,?,NULL) ON CONFLICT(stream) "
                             "DO UPDATE SET version = max(version, excluded.version), "
                             "updated_ms = excluded.updated_ms", (stream, seq, now))
        self._list_write(f"apply snapshot version {version}", run)
        self._staged = None
        self._reclaim = True

    def reclaim_step(self, rows: int = 2000) -> bool:
        """Empty the tables a snapshot replaced by up to ``rows`` rows (one short
        transaction), dropping each once it is empty; True while work remains."""
        if not self._reclaim:
            return False
        def run(conn: sqlite3.Connection) -> None:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN "
                "('credentials_old', 'revocations_old')")]
            if not tables:
                self._reclaim = False
                return
            table = tables[0]
            key = "cred" if table == "credentials_old" else "key"
            deleted = conn.execute(
                f"DELETE FROM {table} WHERE {key} IN "  # noqa: S608 - fixed names only
                f"(SELECT {key} FROM {table} LIMIT ?)", (rows,)).rowcount
            if deleted < rows:
                conn.execute(f"DROP TABLE {table}")
        try:
            self._list_write("reclaim a replaced list", run)
        except StoreError as exc:
            # Only space is lost: tried again after the next snapshot, or dropped whole
            # when the next one begins.
            log.warning("list_reclaim_failed", error=str(exc))
            self._reclaim = False
        return self._reclaim

    def abort_snapshot(self) -> None:
        """Discard a staged snapshot."""
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DROP TABLE IF EXISTS credentials_new")
            conn.execute("DROP TABLE IF EXISTS revocations_new")
        self._list_write("discard snapshot", run)

    def apply_delta(self, base: int, version: int, upsert: Iterable[CredentialEntry],
                    remove: Iterable[bytes]) -> None:
        """Apply changes on top of list version ``base`` as version ``version``, in one
        transaction (``upsert`` and ``remove`` streamed in batches); refused (StoreError)
        unless the current version is ``base``."""
        def run(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT version FROM sync_state WHERE stream='list'").fetchone()
            current = int(row[0]) if row else 0
            if current != base:
                raise ValueError(f"delta is based on version {base}, the list is at "
                                 f"{current}")
            _write_rows(conn, "INSERT OR REPLACE INTO credentials VALUES (?,?,?,?,?,?,?)",
                        (_credential_row(e) for e in upsert))
            _write_rows(conn, "DELETE FROM credentials WHERE cred=?", ((c,) for c in remove))
            conn.execute("INSERT OR REPLACE INTO sync_state VALUES ('list',?,?,NULL)",
                         (version, self._clock_ms()))
        self._list_write(f"apply delta to version {version}", run)

    def _list_write(self, what: str, work: Any) -> None:
        with self._ls.write_lock:
            conn = self._ls.writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                work(conn)
                conn.execute("COMMIT")
            except Exception as exc:
                rollback(conn)
                raise StoreError(f"{self.lists_path}: cannot {what}: "
                                 f"{type(exc).__name__}: {exc}") from exc
            except BaseException:
                rollback(conn)
                raise


def _batches(rows: Iterable[Any]) -> Iterator[tuple[list[Any], bool]]:
    """``rows`` in lists of ``LIST_BATCH``, each with whether it is the last (an empty
    ``rows`` gives one empty, last batch)."""
    source = iter(rows)
    batch = list(islice(source, LIST_BATCH))
    while True:
        following = list(islice(source, LIST_BATCH))
        yield batch, not following
        if not following:
            return
        batch = following


def _write_rows(conn: sqlite3.Connection, sql: str, rows: Iterable[Sequence[Any]]) -> int:
    """Run ``sql`` for every row inside the caller's transaction, ``LIST_BATCH`` rows per
    ``executemany``; returns how many rows.

    Between batches the thread sleeps for no time at all: that hands the interpreter lock
    to a reader thread waiting for it, so a long list write never keeps a decision waiting
    for more than one batch's Python work (sqlite3 itself releases it inside each step).
    """
    count = 0
    for batch, _last in _batches(rows):
        conn.executemany(sql, batch)
        count += len(batch)
        time.sleep(0)
    return count
