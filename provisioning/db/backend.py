"""Which database an office folder uses, and how its publishers stay in order.

A district office keeps ``central.db`` (SQLite) in its folder, as always. A city's office
names a PostgreSQL database in the folder's ``database.url`` (one line,
``postgresql://user@host:port/dbname``; ``permitgate-central database URL`` writes it),
and then every command on that folder, and every ``serve`` instance started from a copy
of it, uses that database. The keys stay in the folder either way.

``open_backend`` returns the database with the two things that differ between the two:

- the publisher lock: with SQLite, ``serve.lock`` in the folder (one ``serve``; a
  one-shot command hands its operation to it); with PostgreSQL, advisory locks in the
  database (several ``serve`` instances with a share group and distinct client ids, or
  one without; a one-shot command hands over to any of them);
- the publishing order (``provisioning.serve.PublishOrder``): nothing to do for one
  ``serve``; between several, each gateway's turn (``provisioning.db.postgres``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from provisioning.db import OfficeDatabase
from provisioning.errors import CentralUsageError
from provisioning.serve import ONE_PUBLISHER, PublishOrder

DB_NAME = "central.db"
"""The SQLite database in the folder."""
DATABASE_SETTING = "database.url"
"""The folder's setting naming a PostgreSQL database instead."""
URL_SCHEMES = ("postgresql://", "postgres://")


class PublisherLock(Protocol):
    """Who may publish for a folder's database: ``serve`` (``exclusive``) or a one-shot
    command; ``hold`` is False when the other kind holds it."""

    def hold(self, *, exclusive: bool) -> bool:
        """Take the lock; False when it cannot be had now. Holding it already counts."""

    def release(self) -> None:
        """Let go of the lock, if held."""


@dataclass(frozen=True, slots=True)
class Backend:
    """An office's database and how its publishers share it."""

    db: OfficeDatabase
    lock: PublisherLock
    order: PublishOrder
    where: str
    """The database, for messages (never a password)."""
    busy: str
    """Why a ``serve`` was refused the lock, once ``hold`` said no."""

    def refusal(self) -> str:
        """The message for a ``serve`` refused the lock."""
        lock_reason = getattr(self.lock, "refusal", "")
        return f"{self.where}: {lock_reason or self.busy}"


def database_url(folder: Path) -> str | None:
    """The PostgreSQL URL the folder's ``database.url`` names, or None (SQLite)."""
    path = folder / DATABASE_SETTING
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CentralUsageError(f"{path}: cannot read it: {exc.strerror}") from None
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    if len(lines) != 1 or not lines[0].startswith(URL_SCHEMES):
        raise CentralUsageError(f"{path}: one line, a postgresql:// URL (delete the file to "
                                f"use {DB_NAME})")
    return lines[0]


def check_url(url: str) -> str:
    """``url`` if it names a PostgreSQL database (``CentralUsageError`` otherwise)."""
    if not url.startswith(URL_SCHEMES) or any(c.isspace() for c in url):
        raise CentralUsageError(f"database {url!r}: a URL such as "
                                "postgresql://office@db.example/permitgate")
    return url


def _require_psycopg() -> None:
    """psycopg is the ``office`` extra: a district office runs without it."""
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError as exc:
        raise CentralUsageError(f"PostgreSQL needs psycopg ({exc}): pip install "
                                "'permitgate[office]'") from None


def open_backend(folder: Path, *, client_id: str, share_group: str | None) -> Backend:
    """The folder's database (created or upgraded as needed) and its publisher lock.

    A share group needs PostgreSQL: ``central.db`` serves one ``serve`` only."""
    url = database_url(folder)
    if url is None:
        if share_group is not None:
            raise CentralUsageError(f"--share: several serves share a PostgreSQL database "
                                    f"({folder / DATABASE_SETTING}); {DB_NAME} serves one")
        from provisioning.db.sqlite import SqliteOfficeDatabase  # noqa: PLC0415
        from provisioning.handoff import FolderLock  # noqa: PLC0415 - handoff imports db
        return Backend(SqliteOfficeDatabase(folder / DB_NAME), FolderLock(folder),
                       ONE_PUBLISHER, str(folder),
                       "another 'serve' (or a one-shot command) is using this folder; "
                       "only one may publish for it")
    _require_psycopg()
    from provisioning.db.postgres import (  # noqa: PLC0415 - after the import check
        PostgresOfficeDatabase,
        PostgresServeLock,
    )
    db = PostgresOfficeDatabase(url)
    lock = PostgresServeLock(db, client_id, share_group)
    return Backend(db, lock, lock, db.where, "another 'serve' is using this database")


def set_database(folder: Path, url: str) -> str:
    """Point the folder at a PostgreSQL database: its schema made (or upgraded) now, then
    ``database.url`` written (mode 0600: a URL may hold a password). Refused when the
    folder's ``central.db`` holds gateways already (this tool does not move an office's
    data). Returns the database, for the message."""
    check_url(url)
    local = folder / DB_NAME
    if local.exists():
        from provisioning.db.sqlite import SqliteOfficeDatabase  # noqa: PLC0415
        sqlite = SqliteOfficeDatabase(local)
        try:
            held = len(sqlite.gateway_ids())
        finally:
            sqlite.close()
        if held:
            raise CentralUsageError(f"{local} holds {held} gateway(s): an office's data is "
                                    "not moved to PostgreSQL by this tool; start a new folder")
    _require_psycopg()
    from provisioning.db.postgres import PostgresOfficeDatabase  # noqa: PLC0415
    db = PostgresOfficeDatabase(url)
    where = db.where
    db.close()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / DATABASE_SETTING
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(url + "\n")
    temporary.replace(path)
    return where


def describe(folder: Path) -> str:
    """Which database the folder uses, for people."""
    url = database_url(folder)
    if url is None:
        return f"{folder / DB_NAME} (SQLite)"
    _require_psycopg()
    from provisioning.db.postgres import where  # noqa: PLC0415
    return f"{where(url)} (PostgreSQL, named in {folder / DATABASE_SETTING})"
