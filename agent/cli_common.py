"""What the ``permitgate`` commands share: the exit statuses, the two errors ``main``
turns into them, and loading the configuration and the store.

These live outside agent/cli.py so that the command modules need not import it:
``python -m agent.cli`` runs that file as ``__main__``, and an error class defined there
would be another class than the one a command module raised through ``agent.cli``, so
``main`` would not catch it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.config import DEFAULT_CONFIG_NAME, Config, load_config
from agent.diskspace import free_bytes, looks_full
from agent.resolve import resolve_store_path
from agent.runtime import check_drivers
from agent.store import Store
from common.sqlite import StoreError
from drivers.registry import DriverError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command-line argument is unusable; the message says which."""


class FailureError(Exception):
    """A runtime failure (exit status 1) that is not the store's; the message says which."""


def config_path(args: argparse.Namespace) -> Path | None:
    """The configuration file named by ``--config`` or ``$PERMITGATE_CONFIG``; None for
    the embedded defaults."""
    raw = args.config or os.environ.get("PERMITGATE_CONFIG")
    return Path(raw) if raw else None


def load(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The configuration, with every driver's options checked, and its path."""
    path = config_path(args)
    config = load_config(path)
    try:
        check_drivers(config)
    except DriverError as exc:
        # Name the file, as configuration errors do: "readers[0].options.port" alone does
        # not say which of several configurations (--config, $PERMITGATE_CONFIG) was read.
        raise DriverError(f"{path or DEFAULT_CONFIG_NAME}: {exc}") from exc
    return config, path


def open_store(args: argparse.Namespace) -> tuple[Config, Store]:
    """The configuration and its existing store, opened."""
    config, path = load(args)
    return config, existing_store(config, path)


def existing_store(config: Config, path: Path | None) -> Store:
    """The store of the configuration at ``path``, opened; ``StoreError`` when there is
    none yet or it cannot be opened."""
    db = resolve_store_path(config, path)
    if not db.exists():
        raise StoreError(f"{db}: no database yet (start the agent once with "
                         "'permitgate run')")
    try:
        return Store(db)
    except StoreError as exc:
        if looks_full(exc, db.parent):
            raise StoreError(f"{db}: cannot be opened: the disk is full "
                             f"({free_bytes(db.parent)} bytes free). A running agent denies "
                             "every card it cannot record and opens the store by itself "
                             "once there is room: free space on this file system") from exc
        raise
