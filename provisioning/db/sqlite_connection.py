"""The connections of ``SqliteOfficeDatabase`` (provisioning/db/sqlite.py) and its
transactions.

``SqliteConnection`` is the base of every mixin of ``SqliteOfficeDatabase``: the
``central.db`` file as a ``common.sqlite.SqliteFile`` (WAL, ``synchronous=FULL``, the
migrations of ``sqlite_schema.py``), a connection per thread, ``_tx`` (one write
transaction, BEGIN IMMEDIATE) and ``_read`` (dict rows through sqlite-utils), every
error as ``CentralError`` naming the file.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from common.sqlite import SqliteFile, StoreError, rollback
from provisioning.db.sqlite_schema import MIGRATIONS
from provisioning.errors import CentralError


class SqliteConnection(SqliteFile):
    """Connections and transactions on ``central.db`` (the base of
    ``SqliteOfficeDatabase`` and its mixins)."""

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
