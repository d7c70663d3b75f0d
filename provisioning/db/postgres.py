"""The office's database in PostgreSQL (psycopg 3), for a city.

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

``PostgresOfficeDatabase`` is made of mixins, one module each (this backend's own on
``PostgresConnection``):

- ``postgres_connection.py``: connections, transactions, publishing turns;
- ``postgres_gateways.py``: gateways, entries, stream numbers, what gateways report;
- ``postgres_events.py``: events (partitions, COPY, what a gateway row knows);
- ``postgres_enrollments.py``: settings, tenant events, enrollments;
- ``postgres_requests.py``: the requests of one-shot commands;
- ``postgres_lock.py``: ``PostgresServeLock``;
- ``postgres_reconcile.py`` (and ``postgres_comparison.py``): the registry comparison,
  cases and retention; ``rekey_sql.py``: site-key change-overs (shared with SQLite);
- this module: the schema's migrations and the office's settings.

Only these modules and ``postgres_schema.py`` speak PostgreSQL's SQL; what turns
records into rows and back is shared with SQLite (``rows.py``).
"""

from __future__ import annotations

from typing import Any, cast

from provisioning.db.postgres_connection import (
    LOCK_NS,
    LOCK_TIMEOUT_S,
    MIGRATE_KEY,
    where,
)
from provisioning.db.postgres_enrollments import PostgresEnrollments
from provisioning.db.postgres_events import PostgresEvents
from provisioning.db.postgres_gateways import PostgresGateways
from provisioning.db.postgres_lock import PostgresServeLock
from provisioning.db.postgres_reconcile import PostgresReconcile
from provisioning.db.postgres_requests import PostgresRequests
from provisioning.db.postgres_schema import MIGRATIONS
from provisioning.db.rekey_sql import RekeyStatements
from provisioning.errors import CentralError

__all__ = [
    "LOCK_TIMEOUT_S",
    "PostgresOfficeDatabase",
    "PostgresServeLock",
    "where",
]


class PostgresOfficeDatabase(PostgresGateways, PostgresEvents, PostgresEnrollments,
                             PostgresRequests, PostgresReconcile, RekeyStatements):
    """``OfficeDatabase`` on a PostgreSQL database, errors as ``CentralError`` (the registry
    comparison, cases and retention: ``PostgresReconcile``, postgres_reconcile.py).

    ``RekeyStatements`` comes last: its ``_tx`` placeholder must not hide
    ``PostgresConnection._tx``."""

    _MARK = "%s"

    def __init__(self, url: str, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        super().__init__(url, lock_timeout_s=lock_timeout_s)
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    # -- the office's settings -----------------------------------------------------------

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

    # -- the schema ----------------------------------------------------------------------

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
