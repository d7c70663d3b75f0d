"""The connections of ``PostgresOfficeDatabase`` (provisioning/db/postgres.py), its
transactions, and the publishing turns of several ``serve`` instances.

``PostgresConnection`` is the base of every mixin of ``PostgresOfficeDatabase``: a
connection per thread (a new one after the last broke), ``_tx`` (one transaction),
``_read`` (statements outside a transaction), ``_batch_tx`` (a transaction the caller
begins and commits inside pipelines), every psycopg error as ``CentralError`` naming the
database. A thread that ``begin_turns`` takes a gateway's turn (``_turn``, a session
advisory lock) before each ordered allocation, until ``end_turns`` (see
``PostgresServeLock``, provisioning/db/postgres_lock.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from provisioning.errors import CentralError

Conn = psycopg.Connection[tuple[Any, ...]]

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


def key_of(name: str) -> int:
    """A signed 32-bit advisory lock key for a name (a collision only serialises two
    names' turns: each thread holds at most one turn, so it cannot deadlock)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)


@dataclass(slots=True)
class _Turns:
    """The publishing turn this thread holds while ``serve`` works (``begin``/``end``)."""

    flush: Callable[[], None]
    held: int | None = None


class PostgresConnection:
    """Connections, transactions and publishing turns on one PostgreSQL database (the
    base of ``PostgresOfficeDatabase`` and its mixins); it makes no table."""

    def __init__(self, url: str, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.url = url
        self.where = where(url)
        self._lock_timeout_s = lock_timeout_s
        self._local = threading.local()
        self._connections: list[Conn] = []
        self._conn_lock = threading.Lock()
        self._days: set[int] = set()
        """The day partitions of ``events`` known to exist (``PostgresEvents``)."""
        self.taker_pid: int | None = None
        """The server pid of this process's serve lock, recorded with the requests it
        takes (``PostgresServeLock``)."""

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
        key = key_of(gateway)
        if turns.held == key:
            return
        if turns.held is not None:
            turns.flush()
            self._give_back(turns)
        with self._read() as conn:
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (TURN_NS, key))
        turns.held = key
