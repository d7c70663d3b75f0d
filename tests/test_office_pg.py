"""The office's PostgreSQL database (provisioning/db/postgres.py) on its own: the schema
and its migrations, events partitioned by day and stored once per ``(gateway, seq)``
whatever their time, the same answers as ``central.db`` for any sequence of batches,
batches of one gateway stored from several connections at once, publishing turns, and
the ``database`` setting of an office folder.

The office as a whole runs on PostgreSQL in tests/test_central.py,
tests/test_office_rooms.py and tests/test_office_enrollments.py (``office_db``), and as
several instances in tests/test_office_shared.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.chain import GENESIS, Event, event_hash
from provisioning.central import Central, CentralUsageError, keygen
from provisioning.central_cli import main
from provisioning.db import (
    Arrival,
    CaseRecord,
    ChainCheck,
    EnrollmentRecord,
    EntryRecord,
    EventRecord,
    OfficeDatabase,
    ReconcileParams,
    RegistryRow,
)
from provisioning.db.backend import DATABASE_SETTING, database_url, set_database
from provisioning.db.postgres import PostgresOfficeDatabase
from provisioning.db.postgres_schema import MIGRATIONS
from provisioning.db.sqlite import SqliteOfficeDatabase
from tests.conftest import wait_for

pytest_plugins = ("tests.pg",)  # pg_url: a PostgreSQL database of the test's own

MIGRATION_SHA256 = (
    "7cc6ce66c492fc3523b38feab62c459a33d615e5bdacd6d3bf74cf35c4f38017",
    "6a82ef0a221ee0b171cfd57b3a5e47683271e0126518035009d59182dd314a9a",
)
"""Of each entry of ``MIGRATIONS`` as the databases made so far were made by it."""
DAY_MS = 86_400_000
T0 = 1_798_761_600_000  # 2027-01-01T00:00Z
_gateway_numbers = itertools.count(1)


@pytest.fixture
def pg(pg_url: str) -> Iterator[PostgresOfficeDatabase]:
    """A new office database on PostgreSQL."""
    db = PostgresOfficeDatabase(pg_url)
    yield db
    db.close()


def _event(seq: int, *, ts_ms: int | None = None, kind: str = "access_granted",
           data: dict[str, int] | None = None, prev: str = GENESIS,
           salt: str = "") -> EventRecord:
    """An event whose hash covers its fields (``salt`` makes other contents)."""
    ts = T0 + seq * 1000 if ts_ms is None else ts_ms
    fields = Event(kind, door="front", reason=salt or None, data=data or {})
    event_id = f"{seq:08d}-0000-7000-8000-{hashlib.sha256(salt.encode()).hexdigest()[:12]}"
    digest = event_hash(prev, seq, event_id, ts, fields)
    return EventRecord(seq, event_id, ts, kind, "front", None, None, salt or None, None,
                       json.dumps(data or {}, sort_keys=True, separators=(",", ":")),
                       prev, digest)


def _chain(count: int) -> list[EventRecord]:
    """``count`` chained events from seq 1."""
    events: list[EventRecord] = []
    prev = GENESIS
    for seq in range(1, count + 1):
        ev = _event(seq, prev=prev)
        events.append(ev)
        prev = ev.hash
    return events


def _arrivals(found: list[tuple[int, str]]) -> ChainCheck:
    """A chain check that records what each arrival saw, as a problem per event."""
    def check(arrival: Arrival) -> list[tuple[int, str]]:
        found.append((arrival.index, repr(arrival)))
        return [(arrival.index + 1, f"seen new={arrival.new} stored={arrival.stored_hash}")]
    return check


# -- the schema ---------------------------------------------------------------------------


def test_a_migration_is_never_edited(pg: PostgresOfficeDatabase) -> None:
    """The migrations databases were made by stay byte for byte the same, and a new
    database records the schema version it was made to."""
    assert tuple(hashlib.sha256(m.encode()).hexdigest()
                 for m in MIGRATIONS[:len(MIGRATION_SHA256)]) == MIGRATION_SHA256
    assert pg.meta("schema_version") == str(len(MIGRATIONS))


def test_offices_opening_a_new_database_at_once_make_its_schema_once(pg_url: str) -> None:
    """Several instances starting together on an empty database: one makes the schema
    (under an advisory lock), the others find it made; none fails."""
    errors: list[BaseException] = []
    opened: list[PostgresOfficeDatabase] = []

    def start() -> None:
        try:
            opened.append(PostgresOfficeDatabase(pg_url))
        except BaseException as exc:  # noqa: BLE001 - reported in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert [db.meta("schema_version") for db in opened] == [str(len(MIGRATIONS))] * 4
    for db in opened:
        db.close()


def test_a_database_newer_than_the_program_is_refused(pg: PostgresOfficeDatabase,
                                                      pg_url: str) -> None:
    """A database whose schema version is above what this program knows is not opened."""
    pg.set_meta("schema_version", str(len(MIGRATIONS) + 1))
    with pytest.raises(Exception, match="newer than this program"):
        PostgresOfficeDatabase(pg_url)


# -- events by day ------------------------------------------------------------------------


def _partitions(url: str) -> dict[int, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT seq, tableoid::regclass::text FROM events"
                                 ).fetchall())


def test_events_are_stored_in_the_partition_of_their_day(pg: PostgresOfficeDatabase,
                                                        pg_url: str) -> None:
    """Each event lands in the partition of its own UTC day, made when the first event of
    that day comes; times before 2020 or from 2100 on land in the two catch-alls."""
    assert pg.add_gateway("gw1", "s", "/k", 0, 1)
    times = [T0, T0 + DAY_MS + 5, 1_000, 4_200_000_000_000]
    events = []
    prev = GENESIS
    for seq, ts in enumerate(times, start=1):
        events.append(_event(seq, ts_ms=ts, prev=prev))
        prev = events[-1].hash
    stored = pg.store_events("gw1", events, 7, lambda _a: [])
    assert (stored.new, stored.acked_upto, stored.problems) == (4, 4, ())
    day = T0 // DAY_MS
    assert _partitions(pg_url) == {1: f"events_{day:06d}", 2: f"events_{day + 1:06d}",
                                   3: "events_before", 4: "events_after"}


def test_a_seq_is_stored_once_whatever_time_its_copy_carries(pg: PostgresOfficeDatabase,
                                                            pg_url: str) -> None:
    """A resent event is dropped by its key; a copy of a stored seq with other contents
    and a time on another day (another partition) is not stored either, and is recorded
    as received again with different contents, as ``central.db`` does."""
    pg.add_gateway("gw1", "s", "/k", 0, 1)
    chain = _chain(3)
    pg.store_events("gw1", chain, 1, lambda _a: [])
    again = pg.store_events("gw1", chain[1:], 2, lambda _a: [])
    assert (again.new, again.acked_upto) == (0, 3)
    other = _event(2, ts_ms=T0 + 40 * DAY_MS, prev=chain[0].hash, salt="replaced")
    seen: list[Arrival] = []

    def check(arrival: Arrival) -> list[tuple[int, str]]:
        seen.append(arrival)
        return [(2, "different")] if arrival.stored_hash != other.hash else []

    result = pg.store_events("gw1", [other], 3, check)
    assert result.new == 0 and result.problems == ((2, "different"),)
    assert seen == [Arrival(0, False, chain[1].hash, None, None)]
    assert sorted(_partitions(pg_url)) == [1, 2, 3]
    assert [s.event for s in pg.events("gw1", after_seq=0, limit=None)] == chain
    assert pg.counts("gw1").events == 3


# -- the same answers as central.db --------------------------------------------------------

_batch = st.tuples(st.integers(1, 14), st.integers(1, 6), st.sampled_from(["true", "alt"]),
                   st.booleans())


@st.composite
def _scenario(draw: st.DrawFn) -> tuple[int, list[EventRecord], list[EventRecord],
                                        list[list[EventRecord]]]:
    """A gateway's chain (some events ``events_dropped`` declaring earlier gaps, some
    tenant events, times over a few days), another chain with other contents and times,
    and batches of runs of either, some with a seq left out."""
    count = 14
    kinds = draw(st.lists(st.sampled_from(["access_granted", "events_dropped",
                                           "tenant_moved_out"]),
                          min_size=count, max_size=count))
    true: list[EventRecord] = []
    alt: list[EventRecord] = []
    prev = alt_prev = GENESIS
    for seq, kind in enumerate(kinds, start=1):
        data: dict[str, int] = {}
        if kind == "events_dropped":
            first = draw(st.integers(1, seq))
            data = {"first_seq": first, "last_seq": draw(st.integers(first, seq + 1))}
        ts = T0 + draw(st.integers(0, 3)) * DAY_MS + seq
        true.append(_event(seq, ts_ms=ts, kind=kind, data=data, prev=prev))
        prev = true[-1].hash
        alt.append(_event(seq, ts_ms=T0 + draw(st.integers(0, 5)) * DAY_MS + seq,
                          prev=alt_prev, salt="alt"))
        alt_prev = alt[-1].hash
    batches = []
    for start, length, which, hole in draw(st.lists(_batch, min_size=1, max_size=8)):
        source = true if which == "true" else alt
        run = source[start - 1:start - 1 + length]
        if hole and len(run) > 2:
            run = run[:1] + run[2:]
        batches.append(run)
    return draw(st.sampled_from([0, 0, 2])), true, alt, batches


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(scenario=_scenario())
def test_any_sequence_of_batches_is_stored_as_central_db_stores_it(
        scenario: tuple[int, list[EventRecord], list[EventRecord], list[list[EventRecord]]],
        pg: PostgresOfficeDatabase, tmp_path: Path) -> None:
    """Batches resent, overlapping, out of order, with holes, with other contents under a
    stored seq, with declared gaps: every arrival sees the same stored neighbours, and
    the stored events, chain problems, ``acked_upto``, counts and tenant events due are
    the same on PostgreSQL as in ``central.db``."""
    acked_from, _true, _alt, batches = scenario
    gateway = f"gw{next(_gateway_numbers)}"
    sqlite = SqliteOfficeDatabase(tmp_path / "central.db")
    try:
        databases: list[OfficeDatabase] = [sqlite, pg]
        for db in databases:
            db.add_gateway(gateway, "s", "/k", acked_from, 1)
        for number, run in enumerate(batches):
            answers = []
            for db in databases:
                seen: list[tuple[int, str]] = []
                stored = db.store_events(gateway, run, number, _arrivals(seen))
                answers.append((stored, seen))
            assert answers[0] == answers[1], f"batch {number}: {[e.seq for e in run]}"
        states = []
        for db in databases:
            gw = db.gateway(gateway)
            assert gw is not None
            states.append((db.events(gateway, after_seq=0, limit=None),
                           [(p.seq, p.problem) for p in db.chain_problems(gateway)],
                           gw.acked_upto, db.counts(gateway),
                           [(t.event.seq, t.chain_problem)
                            for t in db.tenant_events(gateway, 100)]))
        assert states[0] == states[1]
    finally:
        sqlite.close()


def test_batches_of_one_gateway_stored_at_once_keep_each_seq_once(
        pg: PostgresOfficeDatabase, pg_url: str) -> None:
    """Four connections (as four instances) store overlapping batches of one gateway at
    the same time: every seq is stored once and ``acked_upto`` reaches the last."""
    pg.add_gateway("gw1", "s", "/k", 0, 1)
    chain = _chain(200)
    errors: list[BaseException] = []

    def instance(offset: int) -> None:
        db = PostgresOfficeDatabase(pg_url)
        try:
            for start in range(offset, 200, 7):
                db.store_events("gw1", chain[start:start + 15], 1, lambda _a: [])
        except BaseException as exc:  # noqa: BLE001 - reported in the test thread
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=instance, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT seq) FROM events").fetchone() \
            == (200, 200)
    gw = pg.gateway("gw1")
    assert gw is not None and gw.acked_upto == 200
    assert pg.chain_problems("gw1") == []


# -- publishing turns ----------------------------------------------------------------------


def test_a_gateway_turn_is_given_back_only_after_the_flush(pg: PostgresOfficeDatabase,
                                                          pg_url: str) -> None:
    """While one instance holds a gateway's turn (a version allocated, its messages not
    yet with the broker), another instance's allocation for that gateway waits; it gets
    the next version only after the first has flushed; another gateway does not wait."""
    pg.add_gateway("gw1", "s", "/k", 0, 1)
    pg.add_gateway("gw2", "s", "/k", 0, 1)
    order: list[str] = []
    other = PostgresOfficeDatabase(pg_url)
    try:
        pg.begin_turns(lambda: order.append("first flushed"))
        assert pg.allocate_snapshot("gw1", 1, resync=False).version == 1
        results: list[int] = []

        def second() -> None:
            other.begin_turns(lambda: order.append("second flushed"))
            results.append(other.allocate_snapshot("gw1", 2, resync=False).version)
            order.append("second allocated")
            other.end_turns()

        thread = threading.Thread(target=second)
        thread.start()
        with psycopg.connect(pg_url) as watcher:
            wait_for(lambda: watcher.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ).fetchone() == (1,), "the second instance to wait for the turn")
        other_gateway = PostgresOfficeDatabase(pg_url)
        other_gateway.begin_turns(lambda: None)
        assert other_gateway.allocate_command("gw2", 1) == 1  # another gateway's turn is free
        other_gateway.end_turns()
        other_gateway.close()
        pg.end_turns()
        thread.join(30)
        assert results == [2]
        assert order == ["first flushed", "second allocated", "second flushed"]
    finally:
        other.close()


def test_acks_and_reads_take_no_turn(pg: PostgresOfficeDatabase, pg_url: str) -> None:
    """An ack, or a look at tenant events with none due, never waits for a gateway's
    turn: storing and acknowledging events goes on while another instance publishes."""
    pg.add_gateway("gw1", "s", "/k", 0, 1)
    pg.begin_turns(lambda: None)
    pg.allocate_command("gw1", 1)  # holds gw1's turn
    other = PostgresOfficeDatabase(pg_url)
    try:
        other.begin_turns(lambda: None)
        assert other.store_events("gw1", _chain(2), 1, lambda _a: []).acked_upto == 2
        assert other.allocate_ack("gw1", 1) == 1
        assert other.tenant_events("gw1", 10) == []
        assert other.allocate_decisions("gw1", 10, 1) is None
        other.end_turns()
    finally:
        pg.end_turns()
        other.close()


# -- the folder's database setting ------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``main()`` configures structlog for the process; put the test session's back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_an_office_folder_names_its_database(restore_logging: None, tmp_path: Path,
                                            pg_url: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``database URL`` makes the schema and writes ``database.url`` (mode 0600); every
    command on the folder then uses PostgreSQL; a folder whose central.db holds gateways,
    or a URL that is not PostgreSQL's, is refused with exit 2."""
    folder = tmp_path / "office"
    keygen(folder)
    assert main(["--dir", str(folder), "database"]) == 0
    assert "(SQLite)" in capsys.readouterr().out
    assert main(["--dir", str(folder), "database", "mysql://x/y"]) == 2
    assert "postgresql://" in capsys.readouterr().err
    assert main(["--dir", str(folder), "database", pg_url]) == 0
    assert "schema ready" in capsys.readouterr().out
    assert (folder / DATABASE_SETTING).stat().st_mode & 0o777 == 0o600
    assert database_url(folder) == pg_url
    with Central(folder) as central:
        central.add_gateway("gw1", "s1", bytes(32))
    assert not (folder / "central.db").exists()
    assert main(["--dir", str(folder), "database"]) == 0
    assert "(PostgreSQL" in capsys.readouterr().out
    district = tmp_path / "district"
    keygen(district)
    with Central(district) as central:
        central.add_gateway("gw1", "s1", bytes(32))
    with pytest.raises(CentralUsageError, match="holds 1 gateway"):
        set_database(district, pg_url)
    (folder / DATABASE_SETTING).write_text("sqlite:///nowhere\n")
    with pytest.raises(CentralUsageError, match=DATABASE_SETTING):
        database_url(folder)


# -- the registry comparison, cases and retention ------------------------------------------

_NOW_MS = T0 + 30 * DAY_MS
_NOW_S = _NOW_MS // 1000


def _office_state(db: OfficeDatabase) -> None:
    """Gateways, cards, enrollments, revocations, a status and events for the comparison:
    a listed card of a registered tenant, one whose registration lapsed, a permit listed
    in two buildings, a provisional enrollment, a confirmed one whose lease ended, a
    revoked card, a silent gateway, a stale list."""
    def h(text: str) -> bytes:
        return hashlib.sha256(text.encode()).digest()

    db.add_gateway("gw1", "s1", "/k1", 0, T0)
    db.add_gateway("gw2", "s2", "/k2", 0, T0)
    db.add_gateway("gw3", "s3", "/k3", 0, 1)
    listed = [("gw1", "c1", "p1", None), ("gw1", "c2", "p2", None),
              ("gw2", "c3", "p2", None), ("gw2", "c4", "p4", _NOW_S - 10),
              ("gw1", "c5", "p5", None)]
    for gw, card, permit, until in listed:
        db.put_entries(gw, [EntryRecord(h(card), h(permit), None, until, None, None, None,
                                        T0)])
    db.allocate_revocation("gw1", [("credential", h("c5"))], T0)
    db.allocate_snapshot("gw2", T0, resync=False)
    db.record_status("gw1", json.dumps({"state": "online", "ts_ms": _NOW_MS,
                                        "versions": {"rev": 0, "all": 0}}), 0, _NOW_MS)
    for number, (status, lease_end) in enumerate(
            [("received", _NOW_S + 999), ("confirmed", _NOW_S - 5), ("rejected", 1)]):
        db.record_enrollment(EnrollmentRecord(
            gateway="gw1", id=f"e{number}", seq=number + 1, unit=f"10{number}",
            cred=h(f"en{number}"), permit=f"P{number}", permit_hash=h(f"pe{number}"),
            lease_end=lease_end, provisional_until=_NOW_S + 999, account="landlord",
            received_ms=T0, status=status, reason=None, decided_ms=T0))
        if status == "confirmed":
            db.put_entries("gw1", [EntryRecord(h(f"en{number}"), h(f"pe{number}"), None,
                                               None, None, None, T0 // 1000, T0)])
    events = []
    prev = GENESIS
    for seq in range(1, 41):
        kind = "access_granted" if seq % 3 else "access_denied"
        ts = T0 + seq * DAY_MS // 2
        fields = Event(kind, door="front", direction="entry" if seq % 2 else "exit",
                       cred=h("c1")[:5].hex())
        digest = event_hash(prev, seq, f"{seq:036d}", ts, fields)
        events.append(EventRecord(seq, f"{seq:036d}", ts, kind, "front", None,
                                  fields.direction, None, fields.cred, "{}", prev, digest))
        prev = digest
    db.store_events("gw1", events, _NOW_MS, lambda _a: [])


def _registry() -> list[RegistryRow]:
    def h(text: str) -> bytes:
        return hashlib.sha256(text.encode()).digest()
    today = _NOW_MS // DAY_MS
    return [RegistryRow(1, "P1", h("p1"), "s1", "1", "active", today - 50, None),
            RegistryRow(2, "P2", h("p2"), "s1", "2", "lapsed", today - 50, today - 1),
            RegistryRow(3, "P2", h("p2"), "s1", "2b", "active", today - 60, None),
            RegistryRow(4, "P7", h("p7"), "s2", "7", "active", today - 5, None),
            RegistryRow(5, "P8", h("p8"), "s9", "8", "active", today - 5, None),
            RegistryRow(6, "P0", h("pe0"), "s1", "100", "active", None, today - 3)]


def _findings(db: OfficeDatabase) -> tuple[object, ...]:
    with db.reconcile_session() as session:
        session.stage_registry(_registry())
        counts = session.registry_counts()
        total = session.find(ReconcileParams(
            now_ms=_NOW_MS, today=_NOW_MS // DAY_MS, quiet_since_ms=_NOW_MS - 5 * DAY_MS,
            silent_before_ms=_NOW_MS - DAY_MS, stale_before_ms=_NOW_MS - 60_000))
        pages = session.findings(0, 3) + session.findings(3, 1000)
        by_building = session.building_findings()
    found = sorted((f.kind, f.building, f.gateway or "", f.cred or b"", f.permit or "",
                    f.unit or "", f.line or 0, f.enrollment or "",
                    json.dumps({k: sorted(v) if isinstance(v, list) and k != "list"
                                and k not in ("rev", "all") else v
                                for k, v in json.loads(f.detail).items()}, sort_keys=True))
                   for f in pages)
    order = [(f.position, f.building, f.kind) for f in pages]
    return counts, total, found, [(p, b, k) for p, b, k in order], by_building


def test_the_registry_comparison_finds_what_central_db_finds(
        pg: PostgresOfficeDatabase, tmp_path: Path) -> None:
    """The same office and registry give the same findings (kind, building, card, permit,
    unit, line, enrollment, detail), in the same report order by building and kind, the
    same counts and the same entries per day on PostgreSQL as in ``central.db``."""
    sqlite = SqliteOfficeDatabase(tmp_path / "central.db")
    try:
        results = []
        totals = []
        for db in (sqlite, pg):
            _office_state(db)
            found = _findings(db)
            totals.append(found[1])
            results.append((found,
                            db.daily_entries(T0 // DAY_MS, 3600),
                            db.daily_entries(T0 // DAY_MS, 0, ["gw1", "gw2"]),
                            db.entries_by_gateway(T0 // DAY_MS + 3, 0)))
        assert results[0] == results[1]
        assert totals[0] == totals[1] and isinstance(totals[1], int) and totals[1] > 5
    finally:
        sqlite.close()


def test_retention_and_cases_do_what_they_do_in_central_db(
        pg: PostgresOfficeDatabase, tmp_path: Path) -> None:
    """Folding old events into daily counts step by step, recording and listing cases,
    a card's events, a permit's cards and erasing ended permits give the same answers on
    PostgreSQL as in ``central.db``; a batch sent again after its events were folded is
    stored and acknowledged there as here."""
    sqlite = SqliteOfficeDatabase(tmp_path / "central.db")
    try:
        results = []
        for db in (sqlite, pg):
            _office_state(db)
            steps = [db.fold_events("gw1", T0 + 10 * DAY_MS, 3600, 7) for _ in range(4)]
            prefix = hashlib.sha256(b"c1").digest()[:5].hex()
            case = db.record_case(CaseRecord(_NOW_MS, "officer", "why", "permit",
                                             b"x" * 32, 3))
            again = db.store_events("gw1", _chain(3), _NOW_MS, lambda _a: [])
            gw = db.gateway("gw1")
            assert gw is not None
            results.append((steps, db.daily_entries(T0 // DAY_MS, 3600), case,
                            db.case_records(5), db.card_events("gw1", prefix, T0, 5),
                            db.permit_cards(hashlib.sha256(b"p2").digest()),
                            db.erase_ended_permits(_NOW_MS), db.enrollments("gw1"),
                            again, gw.acked_upto, db.counts("gw1")))
        assert results[0] == results[1]
        assert sum(step.folded for step in results[1][0]) > 0
    finally:
        sqlite.close()
