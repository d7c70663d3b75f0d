"""The list database's snapshot swap and the reclaiming of replaced tables (agent/lists.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from agent.store import CredentialEntry, Store, lists_path

STREAMS = {"rev": 0, "all": 0}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "events.db")
    try:
        yield opened
    finally:
        opened.close()


def card(i: int, tag: int = 0) -> bytes:
    return bytes([tag]) + i.to_bytes(31, "big")


def entries(n: int, tag: int = 0) -> list[CredentialEntry]:
    return [CredentialEntry(cred=card(i, tag), permit=card(i, 99)) for i in range(n)]


def snapshot(store: Store, version: int, rows: list[CredentialEntry], step: int = 100) -> None:
    store.begin_snapshot()
    for start in range(0, len(rows), step):
        store.add_snapshot_chunk(rows[start:start + step], [])
    store.commit_snapshot(version, STREAMS, (len(rows), 0))


def tables(store: Store) -> set[str]:
    with closing(sqlite3.connect(lists_path(store.path))) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_a_snapshot_swap_keeps_the_replaced_list_aside_until_reclaimed(store: Store) -> None:
    """After a swap the new list is live at once and the old rows wait in ``*_old``
    tables, which ``reclaim_step`` empties a bounded number of rows at a time and then
    drops."""
    snapshot(store, 1, entries(500, tag=1))
    while store.reclaim_step(rows=100):
        pass
    snapshot(store, 2, entries(450, tag=2))
    assert store.lookup(card(3, 2)).grant is not None
    assert store.lookup(card(3, 1)).grant is None
    assert {"credentials_old", "revocations_old"} <= tables(store)
    steps = 0
    while store.reclaim_step(rows=100):
        steps += 1
    assert steps >= 5  # 500 old rows, 100 a step: never one long transaction
    assert not {"credentials_old", "revocations_old"} & tables(store)
    assert store.counts()["credentials"] == 450
    assert store.quick_check() == "ok"


def test_a_snapshot_before_the_last_is_reclaimed_drops_the_leftover(store: Store) -> None:
    """A second snapshot arriving before the first's replaced tables are emptied still
    applies; the leftovers are dropped whole."""
    snapshot(store, 1, entries(300, tag=1))
    snapshot(store, 2, entries(200, tag=2))
    snapshot(store, 3, entries(100, tag=3))
    assert store.versions()["list"] == 3
    assert store.counts()["credentials"] == 100
    while store.reclaim_step():
        pass
    assert not {"credentials_old", "revocations_old"} & tables(store)


def test_a_reopened_store_finishes_reclaiming(tmp_path: Path) -> None:
    """Replaced tables left by a stop are emptied by the next process's store."""
    first = Store(tmp_path / "events.db")
    try:
        snapshot(first, 1, entries(200, tag=1))
        snapshot(first, 2, entries(100, tag=2))
    finally:
        first.close()
    second = Store(tmp_path / "events.db")
    try:
        assert "credentials_old" in tables(second)
        while second.reclaim_step():
            pass
        assert "credentials_old" not in tables(second)
        assert second.counts()["credentials"] == 100
    finally:
        second.close()


def test_staged_counts_must_match_the_manifest(store: Store) -> None:
    """A snapshot whose staged entries differ from its manifest's count is refused and the
    live list stays."""
    snapshot(store, 1, entries(50, tag=1))
    store.begin_snapshot()
    store.add_snapshot_chunk(entries(40, tag=2), [])
    with pytest.raises(Exception, match="staged 40 entries"):
        store.commit_snapshot(2, STREAMS, (41, 0))
    assert store.versions()["list"] == 1
    assert store.lookup(card(1, 1)).grant is not None


def test_the_permit_index_is_gone(store: Store) -> None:
    """The list database carries no index on permit hashes (no query used it; every list
    write paid for it)."""
    snapshot(store, 1, entries(10))
    with closing(sqlite3.connect(lists_path(store.path))) as conn:
        indexes = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}
    assert not any("permit" in name for name in indexes)
