"""Several ``serve`` instances on one PostgreSQL database: ``PostgresServeLock``.

Who may publish (a ``serve``, several with a share group and distinct client ids, or a
one-shot command) is decided by session advisory locks on a connection of the lock's own;
the order of publishing between instances is the gateways' turns of
``PostgresConnection`` (provisioning/db/postgres_connection.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import psycopg

from provisioning.db.postgres_connection import (
    CLIENT_NS,
    LEADER_KEY,
    LOCK_NS,
    MUTEX_KEY,
    ONESHOT_KEY,
    SERVE_KEY,
    Conn,
    key_of,
)
from provisioning.errors import CentralError

if TYPE_CHECKING:
    from provisioning.db.postgres import PostgresOfficeDatabase


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
                     key_of(self._client_id)):
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
