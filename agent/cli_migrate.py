"""``permitgate migrate``: the start check ``install.sh`` runs before a new release starts.

It opens the configuration and the store as a start does, with the data folder's lock
held (so no agent runs on it meanwhile), applies the store's pending schema migrations
(after copying both database files aside with ``--backup``) and runs SQLite's
``quick_check`` on them. A store that does not exist yet is left alone: the first start
creates it. The agent migrates on open too; running this first takes the migration out of
the start and lets ``install.sh`` put the previous release back when the new one's
migration or store fails (docs/operations.md, "Upgrading").
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from pathlib import Path
from typing import Any, TextIO

from agent import __version__
from agent.datalock import DataLock
from agent.lists import LIST_MIGRATIONS
from agent.resolve import resolve_paths
from agent.store import SCHEMA_VERSION, Store, lists_path
from common.sqlite import StoreError

RESTORE_NAME = "restore"
"""In a ``--backup`` folder: the live path of each database file copied there, one a line;
the copy has the same file name."""
MIGRATED_NAME = "migrated"
"""In a ``--backup`` folder: present when a migration was due (written before it runs): an
older release refuses the migrated store until the copies are put back."""


def add_migrate_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``migrate`` on ``permitgate``'s subparsers."""
    migrate = sub.add_parser("migrate", parents=[common], help="open the configuration and "
                             "the store, apply the store's migrations (install.sh's start "
                             "check)")
    migrate.add_argument("--backup", metavar="DIR", help="first copy both database files "
                         "into DIR, with the list of where they belong")
    migrate.set_defaults(func=cmd_migrate)


def schema_version(path: Path) -> int:
    """The schema version stamped in a database file (0 for a file without one)."""
    conn = sqlite3.connect(path)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                            "name = 'meta'").fetchone():
            return 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: cannot read the schema version: {exc}") from exc
    finally:
        conn.close()


def backup(files: list[Path], folder: Path) -> list[Path]:
    """Copy each database file (SQLite's online backup: a consistent copy whatever its
    WAL holds) into ``folder`` (made mode 0700), each copy mode 0600, and write the list
    of live paths (``RESTORE_NAME``); the copies."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    copies = []
    for path in files:
        target = folder / path.name
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        source, copy = sqlite3.connect(path), sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            copy.close()
            source.close()
        copies.append(target)
    (folder / RESTORE_NAME).write_text("".join(f"{path}\n" for path in files), "utf-8")
    return copies


def cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    """Open the configuration and the store, migrate the store, check it."""
    from agent import cli  # noqa: PLC0415 - cli imports this module

    config, path = cli._load(args)  # noqa: SLF001 - the CLI's one configuration loader
    paths = resolve_paths(config, path)
    out.write(f"{path or '<embedded defaults>'}: OK (permitgate {__version__})\n")
    db = paths.store
    if not db.exists():
        out.write(f"store {db}: none yet (the first start creates it)\n")
        return cli.EXIT_OK
    owner = db.stat().st_uid
    if owner != os.geteuid():
        # A migration run as another user (root) would leave files the agent cannot open.
        raise cli.UsageError(f"{db} belongs to uid {owner}: run this as the agent's user "
                             "(sudo -u permitgate permitgate migrate ...)")
    lock = DataLock.acquire(paths.lock)
    try:
        files = [f for f in (db, lists_path(db)) if f.exists()]
        before = {f: schema_version(f) for f in files}
        due = (before[db] < SCHEMA_VERSION
               or before.get(lists_path(db), 0) < len(LIST_MIGRATIONS))
        if args.backup:
            folder = Path(args.backup)
            (folder / MIGRATED_NAME).unlink(missing_ok=True)
            backup(files, folder)
            if due:
                (folder / MIGRATED_NAME).write_text("", "utf-8")
            out.write(f"backup {folder}: {', '.join(f.name for f in files)}\n")
        store = Store(db)
        try:
            check = store.quick_check()
        finally:
            store.close()
        files = [f for f in (db, lists_path(db)) if f.exists()]
        after = {f: schema_version(f) for f in files}
    finally:
        lock.release()
    for f in files:
        was, now = before.get(f, 0), after[f]
        out.write(f"store {f}: schema {was} -> {now}\n" if was != now
                  else f"store {f}: schema {now}, nothing to migrate\n")
    if check != "ok":
        out.write(f"store {db}: integrity check FAILED: {check}\n")
        return cli.EXIT_FAILURE
    out.write("integrity ok\n")
    return cli.EXIT_OK
