"""Tests for the SQLite store in :mod:`agent.store`.

They run against real SQLite files under ``tmp_path``: the schema and its version, the
hash-chained event log (append, tamper detection, continuation across instances, prune
with an anchor), the all-or-nothing allowlist, revocations, presence written with its
event, and the failure paths (closed connection, full disk) that must not break the chain.
Tampering is done the way an attacker with the file would do it: a second, raw sqlite3
connection.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import cast

import pytest

from agent.decision import Direction, Grant, Presence
from agent.store import SCHEMA_VERSION, CredentialEntry, Store, StoredEvent, lists_path
from common.sqlite import StoreError
from protocol.chain import GENESIS, Event
from protocol.hashing import CredentialHasher, log_prefix

DAY_MS = 86_400_000
T0_MS = 1_780_000_000_000
"""A fixed wall-clock instant (2026-05-28) for the injected store clock."""

CRED_A = bytes(range(32))
CRED_B = bytes(range(32, 64))
CRED_C = bytes(range(64, 96))
PERMIT_P = b"P" * 32


class MsClock:
    """A settable ``clock_ms`` for ``Store``: milliseconds since the epoch."""

    def __init__(self, now_ms: int = T0_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance_days(self, days: float) -> None:
        """Move the clock forward by ``days``."""
        self.now_ms += int(days * DAY_MS)


@pytest.fixture
def clock() -> MsClock:
    """A store clock fixed at ``T0_MS`` until a test moves it."""
    return MsClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where the test's database file lives."""
    return tmp_path / "state" / "permitgate.db"


@pytest.fixture
def open_store(db_path: Path, clock: MsClock) -> Iterator[Callable[[], Store]]:
    """Opens stores on ``db_path`` with the test clock; every one is closed afterwards."""
    opened: list[Store] = []

    def make() -> Store:
        store = Store(db_path, clock_ms=clock)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[[], Store]) -> Store:
    """A fresh store on an empty database."""
    return open_store()


def raw(path: Path) -> closing[sqlite3.Connection]:
    """A second, raw connection to the database file, as a tamperer would open it."""
    return closing(sqlite3.connect(path, isolation_level=None))


def append_n(store: Store, n: int, kind: str = "door_opened") -> list[StoredEvent]:
    """Append ``n`` events numbered in their data and return them as committed."""
    return [store.append(Event(kind, door="front", data={"n": i})) for i in range(n)]


def head(store: Store) -> StoredEvent:
    """The newest stored event."""
    newest = store.events(newest_first=True, limit=1)
    assert newest, "the event log is empty"
    return newest[0]


# -- schema ----------------------------------------------------------------------------


def test_new_database_gets_the_current_schema(store: Store, db_path: Path) -> None:
    """New event and list database files are created in WAL mode with their tables and
    schema versions (2 for events, 3 for lists) recorded in each."""
    assert SCHEMA_VERSION == 2
    assert store.schema_version() == 2
    assert store.quick_check() == "ok"
    expected = {db_path: ({"meta", "presence", "events", "device_state", "attachments"}, "2"),
                lists_path(db_path): ({"meta", "credentials", "revocations", "sync_state",
                                       "enrollments", "local_revocations"}, "3")}
    for path, (wanted, schema) in expected.items():
        with raw(path) as conn:
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
            version = conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert wanted <= tables
        assert journal == "wal"
        assert version == schema


def test_reopening_is_idempotent(open_store: Callable[[], Store], db_path: Path) -> None:
    """Opening an existing database again neither migrates twice nor loses its contents."""
    first = open_store()
    first.replace_allowlist([CredentialEntry(CRED_A)], version=7)
    append_n(first, 2)
    first.close()
    for _ in range(2):
        again = open_store()
        assert again.schema_version() == 2
        assert again.lookup(CRED_A).grant is not None
        assert again.counts()["events"] == 2
        again.close()
    with raw(db_path) as conn:
        rows = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    assert rows == [("2",)]


def test_newer_schema_is_refused_naming_the_file(
        open_store: Callable[[], Store], db_path: Path) -> None:
    """A database stamped with a newer schema version than the code knows is refused with a
    StoreError that names the file."""
    open_store().close()
    with raw(db_path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                     (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError) as info:
        Store(db_path)
    assert str(db_path) in str(info.value)
    assert "newer" in str(info.value)


def test_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    """A file that is not an SQLite database raises StoreError naming it, not sqlite3's error."""
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, just some bytes " * 200)
    with pytest.raises(StoreError) as info:
        Store(path)
    assert str(path) in str(info.value)


# -- the event chain -----------------------------------------------------------------------


def test_append_gives_contiguous_seqs_and_a_valid_chain(store: Store, clock: MsClock) -> None:
    """Appended events get seq 1, 2, 3, … each linked to its predecessor's hash, and
    verify_chain accepts the chain."""
    stored = []
    for i in range(5):
        clock.now_ms += 1000
        stored.append(store.append(Event("access_granted", door="front", reader="front-in",
                                         direction="entry", reason="granted",
                                         cred="0123456789", data={"i": i})))
    assert [e.seq for e in stored] == [1, 2, 3, 4, 5]
    assert stored[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(stored):
        assert after.prev_hash == before.hash
    assert len({e.event_id for e in stored}) == 5
    assert stored[-1].ts_ms == clock.now_ms
    assert store.events() == stored
    report = store.verify_chain()
    assert report.ok, report.problems
    assert (report.checked, report.first_seq, report.last_seq) == (5, 1, 5)


def test_concurrent_appends_stay_gap_free(store: Store) -> None:
    """Appends from several threads at once still give one gap-free, verifiable chain."""
    def worker(n: int) -> None:
        for i in range(25):
            store.append(Event("door_opened", door=f"d{n}", data={"i": i}))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [e.seq for e in store.events()] == list(range(1, 101))
    assert store.verify_chain().ok


@pytest.mark.parametrize(("column", "value"), [
    ("kind", "access_granted"),
    ("reason", "granted"),
    ("door", "back"),
    ("ts_ms", T0_MS - 1),
    ("data", '{"n":99}'),
])
def test_editing_an_event_field_is_detected(store: Store, db_path: Path, column: str,
                                            value: object) -> None:
    """Changing any hashed field of a stored event makes verify_chain report that seq."""
    append_n(store, 5)
    with raw(db_path) as conn:
        # column comes from the fixed parameter list above, never from input.
        conn.execute(f"UPDATE events SET {column} = ? WHERE seq = 3", (value,))  # noqa: S608
    report = store.verify_chain()
    assert not report.ok
    assert any(p.startswith("seq 3:") and "edited" in p for p in report.problems), \
        report.problems
    assert not any("seq 2" in p or "seq 4" in p for p in report.problems), report.problems


def test_deleting_a_middle_event_is_detected(store: Store, db_path: Path) -> None:
    """Removing an event from the middle of the chain is reported as a gap at its seq."""
    append_n(store, 5)
    with raw(db_path) as conn:
        conn.execute("DELETE FROM events WHERE seq = 3")
    report = store.verify_chain()
    assert not report.ok
    assert any("expected seq 3" in p for p in report.problems), report.problems
    assert any(p.startswith("seq 4:") and "link broken" in p for p in report.problems)


def test_changing_a_prev_hash_is_detected(store: Store, db_path: Path) -> None:
    """Rewriting an event's prev_hash is reported as a broken link at that seq."""
    append_n(store, 5)
    with raw(db_path) as conn:
        conn.execute("UPDATE events SET prev_hash = ? WHERE seq = 4", ("f" * 64,))
    report = store.verify_chain()
    assert not report.ok
    assert any(p.startswith("seq 4:") and "link broken" in p for p in report.problems), \
        report.problems


def test_reopened_store_continues_the_chain(open_store: Callable[[], Store]) -> None:
    """A new Store instance on the same file continues seq and prev_hash where the last
    one stopped."""
    first = open_store()
    last = append_n(first, 3)[-1]
    first.close()
    second = open_store()
    nxt = second.append(Event("door_locked"))
    assert nxt.seq == last.seq + 1
    assert nxt.prev_hash == last.hash
    report = second.verify_chain()
    assert report.ok, report.problems
    assert report.checked == 4


# -- prune --------------------------------------------------------------------------------


def test_prune_by_retention_leaves_an_anchor(store: Store, clock: MsClock) -> None:
    """Events older than the retention are deleted, the newest deleted hash becomes the
    anchor, verify_chain still passes and seq continues after the prune."""
    old = append_n(store, 5)
    clock.advance_days(10)
    append_n(store, 3)
    deleted = store.prune(retention_days=7, max_events=1_000_000, keep_unacked=False)
    assert deleted == 5
    assert [e.seq for e in store.events()] == [6, 7, 8]
    assert store.meta("chain_anchor_seq") == "5"
    assert store.meta("chain_anchor_hash") == old[-1].hash
    report = store.verify_chain()
    assert report.ok, report.problems
    assert (report.checked, report.first_seq, report.last_seq) == (3, 6, 8)
    assert store.append(Event("door_locked")).seq == 9
    assert store.verify_chain().ok


def test_prune_by_max_events_keeps_the_newest(store: Store) -> None:
    """Beyond max_events the oldest events go, repeatedly, and the chain still verifies."""
    append_n(store, 10)
    assert store.prune(retention_days=3650, max_events=4, keep_unacked=False) == 6
    assert [e.seq for e in store.events()] == [7, 8, 9, 10]
    assert store.verify_chain().ok
    append_n(store, 3)
    assert store.prune(retention_days=3650, max_events=4, keep_unacked=False) == 3
    assert [e.seq for e in store.events()] == [10, 11, 12, 13]
    assert store.meta("chain_anchor_seq") == "9"
    report = store.verify_chain()
    assert report.ok, report.problems
    assert store.append(Event("door_locked")).seq == 14


def test_prune_of_every_event_continues_from_the_anchor_after_reopen(
        open_store: Callable[[], Store], clock: MsClock) -> None:
    """When prune empties the log, a re-opened store continues seq and prev_hash from the
    anchor."""
    first = open_store()
    last = append_n(first, 4)[-1]
    clock.advance_days(30)
    assert first.prune(retention_days=7, max_events=1_000_000, keep_unacked=False) == 4
    assert first.events() == []
    first.close()
    second = open_store()
    nxt = second.append(Event("door_locked"))
    assert (nxt.seq, nxt.prev_hash) == (last.seq + 1, last.hash)
    report = second.verify_chain()
    assert report.ok, report.problems


def test_prune_keep_unacked_never_deletes_unacked(store: Store, clock: MsClock) -> None:
    """With keep_unacked an event the central office has not acknowledged survives both
    retention and max_events."""
    append_n(store, 10)
    assert store.prune(retention_days=3650, max_events=1, keep_unacked=True) == 0
    assert store.mark_acked(3) == 3
    clock.advance_days(365)
    assert store.prune(retention_days=1, max_events=1, keep_unacked=True) == 3
    remaining = store.events()
    assert [e.seq for e in remaining] == list(range(4, 11))
    assert not any(e.acked for e in remaining)
    assert store.verify_chain().ok
    assert store.append(Event("door_locked")).seq == 11


# -- allowlist ------------------------------------------------------------------------------


def test_replace_allowlist_then_lookup_returns_the_fields(store: Store) -> None:
    """Every stored field comes back from lookup: doors as a frozenset, validity, schedule,
    and an entry without doors applies to every door (None)."""
    count = store.replace_allowlist([
        CredentialEntry(CRED_A, permit=PERMIT_P, valid_from=1_700_000_000,
                        valid_until=1_900_000_000, doors=("front", "back"), schedule="office"),
        CredentialEntry(CRED_B),
    ], version=3)
    assert count == 2
    a = store.lookup(CRED_A)
    assert a.error is None
    assert a.grant == Grant(1_700_000_000, 1_900_000_000, frozenset({"front", "back"}),
                            "office")
    assert isinstance(a.grant.doors, frozenset)
    assert (a.revoked, a.presence) == (False, None)
    assert store.lookup(CRED_B).grant == Grant(None, None, None, "always")
    unknown = store.lookup(CRED_C)
    assert (unknown.grant, unknown.revoked, unknown.error) == (None, False, None)
    [state] = store.sync_states()
    assert (state["stream"], state["version"]) == ("list", 3)


def test_replace_allowlist_replaces_the_whole_list(store: Store) -> None:
    """A new list drops every entry the old list had and the new one lacks."""
    store.replace_allowlist([CredentialEntry(CRED_A), CredentialEntry(CRED_B)], version=1)
    store.replace_allowlist(iter([CredentialEntry(CRED_C)]), version=2)
    assert store.lookup(CRED_A).grant is None
    assert store.lookup(CRED_B).grant is None
    assert store.lookup(CRED_C).grant is not None
    assert store.counts()["credentials"] == 1


def _raises_halfway() -> Iterator[CredentialEntry]:
    yield CredentialEntry(CRED_B)
    yield CredentialEntry(CRED_C)
    raise RuntimeError("allowlist stream broke off")


BAD_LISTS: dict[str, Callable[[], Iterator[CredentialEntry]]] = {
    "iterator_raises_halfway": _raises_halfway,
    "duplicate_credential": lambda: iter([CredentialEntry(CRED_B), CredentialEntry(CRED_B)]),
    "door_ids_not_strings": lambda: iter([
        CredentialEntry(CRED_B), CredentialEntry(CRED_C, doors=cast("tuple[str, ...]", (1,)))]),
    "row_not_an_entry": lambda: iter([
        CredentialEntry(CRED_B), cast("CredentialEntry", None)]),
}


@pytest.mark.parametrize("bad", sorted(BAD_LISTS))
def test_failed_replace_allowlist_changes_nothing(store: Store, bad: str) -> None:
    """A list that fails halfway (the stream raises or a row is bad) raises StoreError and
    leaves the previous list, its version and a writable store behind."""
    store.replace_allowlist([CredentialEntry(CRED_A, doors=("front",))], version=1)
    with pytest.raises(StoreError) as info:
        store.replace_allowlist(BAD_LISTS[bad](), version=2)
    assert "version 2" in str(info.value)
    assert store.lookup(CRED_A).grant == Grant(doors=frozenset({"front"}))
    assert store.lookup(CRED_B).grant is None
    assert store.lookup(CRED_C).grant is None
    assert [(s["stream"], s["version"]) for s in store.sync_states()] == [("list", 1)]
    # The next writes go through: the failed list left no transaction open behind it.
    assert store.append(Event("door_locked")).seq == 1
    assert store.replace_allowlist([CredentialEntry(CRED_C)], version=3) == 1
    assert store.lookup(CRED_A).grant is None
    assert store.lookup(CRED_C).grant is not None


def test_door_ids_come_back_exactly_or_are_refused(store: Store) -> None:
    """A door id the store cannot represent (one containing its ',' separator) is refused
    with StoreError, never read back as a grant for other doors."""
    try:
        store.replace_allowlist([CredentialEntry(CRED_A, doors=("front,back",))], version=1)
    except StoreError:
        assert store.lookup(CRED_A).grant is None
    else:
        grant = store.lookup(CRED_A).grant
        assert grant is not None
        assert grant.doors == frozenset({"front,back"}), \
            f"one door id read back as the doors {sorted(grant.doors or ())}"


# -- revocations and presence ---------------------------------------------------------------


def test_revoked_credential_is_revoked(store: Store) -> None:
    """Revoking a credential hash marks it revoked on lookup while its grant stays visible."""
    store.replace_allowlist([CredentialEntry(CRED_A), CredentialEntry(CRED_B)], version=1)
    assert store.revoke([(CRED_A, "credential")], version=4) == 1
    assert store.lookup(CRED_A).revoked
    assert store.lookup(CRED_A).grant is not None
    assert not store.lookup(CRED_B).revoked
    assert ("revocations", 4) in {(s["stream"], s["version"]) for s in store.sync_states()}


def test_revoked_permit_revokes_every_card_of_it(store: Store) -> None:
    """Revoking a permit hash revokes every credential that carries it, including one that
    a later allowlist adds, and no other."""
    store.replace_allowlist([
        CredentialEntry(CRED_A, permit=PERMIT_P),
        CredentialEntry(CRED_B, permit=PERMIT_P),
        CredentialEntry(CRED_C, permit=b"Q" * 32),
    ], version=1)
    store.revoke([(PERMIT_P, "permit")])
    assert store.lookup(CRED_A).revoked
    assert store.lookup(CRED_B).revoked
    assert not store.lookup(CRED_C).revoked
    store.replace_allowlist([CredentialEntry(CRED_C, permit=PERMIT_P)], version=2)
    assert store.lookup(CRED_C).revoked


def test_revoked_credential_outside_the_allowlist_is_revoked(store: Store) -> None:
    """A credential revoked while absent from the allowlist reads as revoked (and stays so
    when a list later includes it)."""
    store.revoke([(CRED_C, "credential")])
    lookup = store.lookup(CRED_C)
    assert (lookup.grant, lookup.revoked) == (None, True)
    store.replace_allowlist([CredentialEntry(CRED_C)], version=1)
    assert store.lookup(CRED_C).revoked


def test_presence_is_written_with_its_event(store: Store, clock: MsClock) -> None:
    """append(presence=...) records the credential's direction and time with the event."""
    ev = store.append(Event("access_granted", cred=log_prefix(CRED_A)),
                      presence=(CRED_A, Direction.ENTRY))
    assert store.lookup(CRED_A).presence == Presence(Direction.ENTRY, ev.ts_ms // 1000)
    clock.now_ms += 60_000
    store.append(Event("access_granted"), presence=(CRED_A, Direction.EXIT))
    assert store.lookup(CRED_A).presence == Presence(Direction.EXIT, clock.now_ms // 1000)


def test_presence_and_event_fail_together(store: Store, db_path: Path) -> None:
    """When the presence write fails, the event is not committed either and the chain head
    stays where it was."""
    before = store.append(Event("door_locked"))
    with raw(db_path) as conn:
        conn.execute("CREATE TRIGGER refuse_presence BEFORE INSERT ON presence "
                     "BEGIN SELECT RAISE(ABORT, 'presence refused'); END")
    with pytest.raises(StoreError, match="presence refused"):
        store.append(Event("access_granted"), presence=(CRED_A, Direction.ENTRY))
    assert store.events() == [before]
    assert store.lookup(CRED_A).presence is None
    with raw(db_path) as conn:
        conn.execute("DROP TRIGGER refuse_presence")
    nxt = store.append(Event("access_granted"), presence=(CRED_A, Direction.ENTRY))
    assert (nxt.seq, nxt.prev_hash) == (2, before.hash)
    assert store.verify_chain().ok


# -- failure paths ---------------------------------------------------------------------------


def test_lookup_on_a_closed_store_returns_an_error(store: Store) -> None:
    """lookup on a closed connection returns Lookup(error=...) instead of raising."""
    store.replace_allowlist([CredentialEntry(CRED_A)], version=1)
    assert store.lookup(CRED_A).grant is not None
    store.close()
    lookup = store.lookup(CRED_A)
    assert lookup.error is not None
    assert lookup.grant is None


def test_lookup_on_a_broken_schema_returns_an_error(store: Store, db_path: Path) -> None:
    """lookup on a database whose tables have gone returns Lookup(error=...) naming the
    problem instead of raising."""
    with raw(lists_path(db_path)) as conn:
        conn.execute("DROP TABLE credentials")
    lookup = store.lookup(CRED_A)
    assert lookup.error is not None
    assert "credentials" in lookup.error


def test_full_database_fails_append_without_breaking_the_chain(store: Store) -> None:
    """On 'database or disk is full' append raises StoreError, records neither the event nor
    its presence, leaves the chain head unchanged, and once space returns the next append
    continues the chain without a gap."""
    append_n(store, 3)
    last = head(store)
    pages = store._writer.execute("PRAGMA page_count").fetchone()[0]  # noqa: SLF001 - fault injection
    store._writer.execute(f"PRAGMA max_page_count = {int(pages)}")  # noqa: SLF001 - fault injection
    big = {"blob": "x" * 200_000}  # needs far more pages than the cap allows
    with pytest.raises(StoreError, match="full"):
        store.append(Event("door_forced", data=big), presence=(CRED_A, Direction.ENTRY))
    assert head(store) == last
    assert store.lookup(CRED_A).presence is None
    store._writer.execute("PRAGMA max_page_count = 1073741823")  # noqa: SLF001 - fault injection
    nxt = store.append(Event("door_forced", data=big))
    assert (nxt.seq, nxt.prev_hash) == (last.seq + 1, last.hash)
    report = store.verify_chain()
    assert report.ok, report.problems
    assert report.checked == 4


def test_no_raw_card_id_reaches_the_database_file(
        open_store: Callable[[], Store], tmp_path: Path) -> None:
    """After hashed credentials, revocations, presence and events are stored, neither the raw
    card id nor the permit number appears anywhere in the database files."""
    card_id, card_value, permit_no = "em4100:67003B51C6", "67003B51C6", "E12345678"
    hasher = CredentialHasher(b"k" * 32)
    cred, permit = hasher.credential(card_id), hasher.permit(permit_no)
    store = open_store()
    store.replace_allowlist([CredentialEntry(cred, permit=permit, doors=("front",))], 1)
    store.revoke([(hasher.credential("em4100:67003BA86C"), "credential")])
    for _ in range(3):
        store.append(Event("access_granted", door="front", reader="front-in",
                           direction="entry", reason="granted", cred=log_prefix(cred)),
                     presence=(cred, Direction.ENTRY))

    def assert_clean() -> None:
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert files
        for path in files:
            data = path.read_bytes()
            for secret in (card_id, card_value, card_value.lower(), permit_no):
                assert secret.encode() not in data, f"{secret!r} found in {path.name}"
                assert secret.encode("utf-16-le") not in data

    assert_clean()  # the main file and the WAL while the store is open
    store.close()
    assert_clean()  # after the last connection checkpoints the WAL into the main file


def test_background_checkpoint_keeps_commits_out_of_checkpointing(tmp_path: Path) -> None:
    """With background_checkpoint the writer never checkpoints inside a commit (the WAL
    keeps every frame), and checkpoint() then copies all of them into the database."""
    store = Store(tmp_path / "bg.db", background_checkpoint=True)
    try:
        for i in range(300):
            store.append(Event("filler", data={"i": i, "pad": "x" * 400}))
        wal = tmp_path / "bg.db-wal"
        frames = wal.stat().st_size // 4096
        assert frames > 1000  # the default autocheckpoint would have run at 1000 pages
        store.checkpoint()
        conn = sqlite3.connect(tmp_path / "bg.db")
        busy, log_frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        conn.close()
        assert busy == 0 and log_frames == done
    finally:
        store.close()


def test_prune_stops_at_the_first_recent_event(store: Store, clock: MsClock) -> None:
    """An event stamped by a clock stuck in 1970 among recent ones does not make prune
    delete the recent events before it: deletion stops at the first recent event."""
    append_n(store, 3)
    clock.advance_days(30)
    append_n(store, 2)
    real = clock.now_ms
    clock.now_ms = 1_000  # a board that booted without its clock
    append_n(store, 1)
    clock.now_ms = real
    append_n(store, 2)
    deleted = store.prune(retention_days=7, max_events=1_000_000, keep_unacked=False)
    assert deleted == 3
    assert [e.seq for e in store.events()] == [4, 5, 6, 7, 8]
    assert store.verify_chain().ok


def test_prune_in_batches_deletes_a_large_prefix(store: Store, clock: MsClock,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune of more events than one batch deletes them all, batch by batch, and the
    chain still verifies from the final anchor."""
    monkeypatch.setattr("agent.store.PRUNE_BATCH", 50)
    for _ in range(120):
        store.append(Event("filler"))
    with closing(sqlite3.connect(store.path)) as conn:
        conn.execute("UPDATE events SET ts_ms = 0")  # all of them old (chain not involved)
        conn.commit()
    clock.advance_days(1)
    store.append(Event("recent"))
    assert store.prune(retention_days=1, max_events=1_000_000, keep_unacked=False) == 120
    assert store.meta("chain_anchor_seq") == "120"
    assert [e.kind for e in store.events()] == ["recent"]


def test_prune_removes_old_presence(store: Store, clock: MsClock) -> None:
    """Presence rows older than presence_max_age_s are deleted, newer ones kept, so the
    last passage of a tenant is not kept for ever."""
    store.append(Event("access_granted"), presence=(CRED_A, Direction.ENTRY))
    clock.advance_days(2)
    store.append(Event("access_granted"), presence=(CRED_B, Direction.ENTRY))
    store.prune(retention_days=365, max_events=1_000_000, keep_unacked=False,
                presence_max_age_s=86_400)
    assert store.lookup(CRED_A).presence is None
    assert store.lookup(CRED_B).presence is not None
