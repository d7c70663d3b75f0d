"""The office's two databases for the office tests: ``central.db`` (SQLite) and
PostgreSQL, on the local server, in a database of each test's own.

Not a test module. Test modules that run on both take the ``office_db`` fixture (declared
with ``pytest_plugins = ("tests.pg",)``): it is parametrised ``sqlite`` / ``postgresql``,
and ``use(folder)`` points an office folder at the database, as an operator does
(``permitgate-central database URL`` writes the folder's ``database.url``), so every
``Central`` and every ``permitgate-central`` process on that folder uses it.

The server is the one at ``$PERMITGATE_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, trust authentication). Each test gets
a database made for it and dropped afterwards (``WITH (FORCE)``: a process the test
killed may have left a session behind). A server that cannot be reached fails the test,
naming the URL: it is part of what the tests need, as Mosquitto is.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from provisioning.db import OfficeDatabase
from provisioning.db.backend import set_database
from provisioning.db.postgres import PostgresOfficeDatabase
from provisioning.db.sqlite import SqliteOfficeDatabase

ADMIN_URL = os.environ.get("PERMITGATE_TEST_PG",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
KINDS = ("sqlite", "postgresql")


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {ADMIN_URL} cannot be reached ({exc}); the office tests "
                    "need a server (set $PERMITGATE_TEST_PG to another one)", pytrace=False)


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test; its URL. Dropped afterwards."""
    name = f"permitgate_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = conninfo_to_dict(ADMIN_URL)
    info["dbname"] = name
    try:
        yield make_conninfo(**{k: str(v) for k, v in info.items() if v is not None})
    finally:
        with _admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def postgres_url(conninfo: str) -> str:
    """A ``postgresql://`` URL for a libpq connection string (what ``database.url``
    holds)."""
    info = conninfo_to_dict(conninfo)
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host', '')}{port}/{info['dbname']}"


@dataclass(frozen=True, slots=True)
class OfficeDb:
    """One of the office's databases, for one test."""

    kind: str
    """``sqlite`` or ``postgresql``."""
    url: str | None
    """The PostgreSQL database's URL; None for SQLite."""

    def use(self, folder: Path) -> None:
        """Point an office folder at this database (nothing to do for ``central.db``)."""
        if self.url is not None:
            set_database(folder, self.url)

    def open(self, folder: Path) -> OfficeDatabase:
        """This database, opened directly (schema made or upgraded)."""
        if self.url is None:
            return SqliteOfficeDatabase(folder / "central.db")
        return PostgresOfficeDatabase(self.url)


@pytest.fixture(params=KINDS)
def office_db(request: pytest.FixtureRequest) -> Iterator[OfficeDb]:
    """The office's database: ``central.db``, or a PostgreSQL database of this test's
    own."""
    if request.param == "sqlite":
        yield OfficeDb("sqlite", None)
        return
    with scratch_database() as conninfo:
        yield OfficeDb("postgresql", postgres_url(conninfo))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own (for tests of PostgreSQL alone)."""
    with scratch_database() as conninfo:
        yield postgres_url(conninfo)
