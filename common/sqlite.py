"""SQLite files as both the agent and the office keep them.

WAL with ``synchronous=FULL`` (a commit is on disk before the call returns), one
connection per thread plus one writer connection, and numbered schema migrations applied
in one transaction. The agent's two databases and the office's SQLite database are each
one ``SqliteFile``; the SQL itself stays with its owner (``agent.store``,
provisioning/db/sqlite.py).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path


class StoreError(Exception):
    """The database is unusable (corrupt, full, wrong version); the message says which."""


def _too_new(path: Path, found: int, known: int) -> StoreError:
    return StoreError(f"{path}: schema version {found} is newer than this program "
                      f"understands ({known}); upgrade permitgate")


def _statements(script: str) -> list[str]:
    """Split an SQL script into statements with SQLite's own tokenizer (comments may
    hold semicolons)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back an open transaction, if any; a failing rollback is not a second error."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class SqliteFile:
    """One SQLite file: WAL with ``synchronous=FULL``, per-thread connections, one writer
    connection, numbered migrations applied in one transaction. The agent's two databases
    and the central office's database (provisioning/db/sqlite.py) are each one of these."""

    def __init__(self, path: Path, migrations: tuple[str, ...], *, autocheckpoint: bool,
                 busy_timeout_s: float = 5.0, reader_cache_kib: int | None = None) -> None:
        """``reader_cache_kib`` bounds the page cache of each thread's own connection
        (SQLite's default is 2 MiB each); the writer keeps the default."""
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._reader_cache_kib = reader_cache_kib
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.writer = self._connect()
        try:
            # The event writer never checkpoints inside a commit (docs/performance.md): the
            # agent's housekeeping thread calls checkpoint() instead. Short-lived tools
            # still checkpoint when their last connection closes.
            self.writer.execute(f"PRAGMA wal_autocheckpoint={1000 if autocheckpoint else 0}")
            self._migrate(migrations)
        except BaseException:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: in WAL mode the log is fsynced on every commit, so an event is on disk
            # before the door it records opens (NORMAL may lose the last commits on power
            # loss: docs/events.md).
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys=ON")
            # A whole-list apply grows the WAL to the size of the list (~250 MB for 1M
            # entries); truncate it back to 64 MB after checkpoints so the SD card keeps room.
            conn.execute("PRAGMA journal_size_limit=67108864")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: cannot open the database: {exc}") from exc
        with self._conn_lock:
            self._connections.append(conn)
        return conn

    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            if self._reader_cache_kib is not None:
                conn.execute(f"PRAGMA cache_size=-{int(self._reader_cache_kib)}")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close every connection opened on this file."""
        with self._conn_lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()

    def _migrate(self, migrations: tuple[str, ...]) -> None:
        # The version is read inside the write transaction, so two processes opening a
        # new file at once (the agent and a `permitgate status`) cannot both migrate it;
        # the whole migration and its version stamp commit together or not at all.
        conn = self.writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            current = 0
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                            "name = 'meta'").fetchone():
                row = conn.execute(
                    "SELECT value FROM meta WHERE key='schema_version'").fetchone()
                current = int(row[0]) if row else 0
            if current > len(migrations):
                rollback(conn)
                raise _too_new(self.path, current, len(migrations))
            for version in range(current + 1, len(migrations) + 1):
                for statement in _statements(migrations[version - 1]):
                    conn.execute(statement)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                             (str(version),))
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            rollback(conn)
            raise StoreError(f"{self.path}: cannot prepare the schema: {exc}") from exc
        except BaseException:
            rollback(conn)
            raise

    def meta(self, key: str) -> str | None:
        """A value from this file's meta table."""
        row = self.conn().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])
