"""``central.db``: the office's database in SQLite.

A ``common.sqlite.SqliteFile``: WAL, ``synchronous=FULL`` so an event is on disk before
the ack that lets the gateway forget it, and a seq before the message that carries it
leaves; the numbered migrations of ``provisioning/db/sqlite_schema.py``.

``SqliteOfficeDatabase`` is made of mixins, one module each, as ``PostgresOfficeDatabase``
is (provisioning/db/postgres.py): ``sqlite_connection.py`` (the file, connections,
transactions: the base of the others), ``sqlite_gateways.py`` (gateways, entries, stream
numbers, what gateways report), ``sqlite_events.py``, ``sqlite_enrollments.py``,
``sqlite_requests.py``, ``sqlite_reconcile.py`` (the registry comparison, cases and
retention) and ``rekey_sql.py`` (site-key change-overs, shared with PostgreSQL); this
module adds the office's settings. Only these modules and ``sqlite_schema.py`` speak
SQLite's SQL; what turns records into rows and back is shared (``rows.py``).
"""

from __future__ import annotations

import sqlite3

from provisioning.db.rekey_sql import RekeyStatements
from provisioning.db.sqlite_enrollments import SqliteEnrollments
from provisioning.db.sqlite_events import SqliteEvents
from provisioning.db.sqlite_gateways import SqliteGateways
from provisioning.db.sqlite_reconcile import SqliteReconcile
from provisioning.db.sqlite_requests import SqliteRequests
from provisioning.errors import CentralError


class SqliteOfficeDatabase(SqliteGateways, SqliteEvents, SqliteEnrollments, SqliteRequests,
                           SqliteReconcile, RekeyStatements):
    """``OfficeDatabase`` on one SQLite file, errors as ``CentralError`` (the registry
    comparison, cases and retention: ``SqliteReconcile``, provisioning/db/sqlite_reconcile.py).

    ``RekeyStatements`` comes last: its ``_tx`` placeholder must not hide
    ``SqliteConnection._tx``."""

    # -- the office's settings -----------------------------------------------------------

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
