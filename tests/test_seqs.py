"""Stream numbers that survive a restore of the office's database from a backup.

The office numbers every stream ``max(stored + 1, now_ms)`` (provisioning/db/seqs.py) on
both databases, raises its counters to what a gateway reports, and names the previous
seq in each revocation (``prev_seq``); the gateway (agent/sync_apply.py) sees a gap on
``rev`` and ``all`` only when ``prev_seq`` is above its own seq (without ``prev_seq``, the
old rule: any jump). The last test restores a real ``central.db`` from a copy while a
real gateway keeps what it was sent, against a real Mosquitto.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.decision import Reason
from protocol.messages import (
    MAX_INT,
    Command,
    Decided,
    Delta,
    EnrollmentDecision,
    Entry,
    Heartbeat,
    RefusedError,
    Revocation,
    Revoked,
    parse_central,
)
from protocol.signing import b64
from provisioning.central import DB_NAME, TRUSTED_KEYS_NAME, Central, keygen
from provisioning.db import EnrollmentRecord, EntryRecord, GatewayRecord, OfficeDatabase
from provisioning.db.seqs import next_seq, reported_counters
from provisioning.errors import CentralError
from tests.agentconf import KEY
from tests.broker import Broker
from tests.conftest import wait_for
from tests.test_central import FakeClock, GatewayPeer, Serving
from tests.test_sync import CARD_A, CARD_B, CARD_C, GW, Gateway
from tests.test_sync_apply import (
    Rig,
    cred,
    rig_fixture,  # noqa: F401 - the rig fixture
)

if TYPE_CHECKING:
    from tests.pg import OfficeDb

pytest_plugins = ("tests.pg",)  # office_db: the database tests run on SQLite and PostgreSQL

REPO = Path(__file__).resolve().parent.parent
T = 1_798_761_600_000
"""An office clock reading, Unix ms (2027-01-01)."""
HASH = bytes(range(32))


# -- the rule -------------------------------------------------------------------------


def test_the_next_number_is_the_clock_or_one_more_than_the_last() -> None:
    """``next_seq`` is the clock's ms when that is above the stored number, else the
    stored number plus one; past 2**53 it refuses."""
    assert next_seq(0, T) == T
    assert next_seq(T, T) == T + 1
    assert next_seq(T + 5, T) == T + 6
    assert next_seq(7, 0) == 8
    assert next_seq(MAX_INT - 1, 0) == MAX_INT
    with pytest.raises(CentralError, match=r"2\*\*53"):
        next_seq(MAX_INT, T)


def test_reported_versions_count_only_known_streams_and_sane_values() -> None:
    """A gateway's reported versions count for the office's counters only where the
    stream is one it keeps (``staging`` for the list), as integers from 0 to 2**53 and
    at most a day ahead of the office's clock."""
    reported = reported_counters({"list": 5, "staging": 9, "rev": 3, "cmd": True,
                                  "hb": -1, "enr": MAX_INT + 1, "mode": 99, "all": 7,
                                  "bogus": 99}, T)
    assert reported.gateway == {"list_version": 9, "rev_seq": 3, "cmd_seq": 0,
                                "hb_seq": 0, "enr_seq": 0}
    assert reported.all == 7
    assert reported_counters({}, T).gateway == dict.fromkeys(reported.gateway, 0)
    day = 86_400_000
    ahead = reported_counters({"rev": T + day, "cmd": T + day + 1, "all": MAX_INT}, T)
    assert (ahead.gateway["rev_seq"], ahead.gateway["cmd_seq"], ahead.all) == (T + day, 0, 0)


# -- the office's two databases ---------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path, office_db: OfficeDb) -> Iterator[OfficeDatabase]:
    """A new office database (SQLite, PostgreSQL) with gateways gw1 and gw2, and one card
    enrolled at gw1."""
    database = office_db.open(tmp_path)
    for gateway in ("gw1", "gw2"):
        assert database.add_gateway(gateway, "site-1", str(tmp_path / f"{gateway}.key"),
                                    0, 1)
    database.put_entries("gw1", [EntryRecord(HASH, None, None, None, None, None, 1, 1)])
    yield database
    database.close()


def _decisions(db: OfficeDatabase, now_ms: int) -> int:
    """Make one decision due and number it."""
    if db.enrollment("gw1", "e1") is None:
        db.record_enrollment(EnrollmentRecord(
            gateway="gw1", id="e1", seq=1, unit=None, cred=None, permit=None,
            permit_hash=None, lease_end=None, provisional_until=None, account=None,
            received_ms=1, status="rejected", reason="officer"))
    db.resend_decision("gw1", "e1")
    allocated = db.allocate_decisions("gw1", 10, now_ms)
    assert allocated is not None
    return allocated[0]


def _delta(db: OfficeDatabase, now_ms: int) -> int:
    allocated = db.allocate_delta("gw1", [HASH], now_ms)
    assert allocated is not None
    return allocated[0].seq


ALLOCATE: dict[str, Callable[[OfficeDatabase, int], int]] = {
    "snapshot": lambda db, now: db.allocate_snapshot("gw1", now, resync=False).version,
    "delta": _delta,
    "rev": lambda db, now: db.allocate_revocation("gw1", [("credential", HASH)], now).seq,
    "all": lambda db, now: db.allocate_revocation("*", [("permit", HASH)], now).seq,
    "cmd": lambda db, now: db.allocate_command("gw1", now),
    "hb": lambda db, now: db.allocate_heartbeat("gw1", now).seq,
    "ack": lambda db, now: db.allocate_ack("gw1", now),
    "enr": _decisions,
}
"""Every allocation of the office, as ``(database, now_ms) -> the number it gave``."""

STORED: dict[str, Callable[[OfficeDatabase], int]] = {
    "snapshot": lambda db: _gw1(db).list_version, "delta": lambda db: _gw1(db).list_version,
    "rev": lambda db: _gw1(db).rev_seq, "all": lambda db: db.all_seq(),
    "cmd": lambda db: _gw1(db).cmd_seq, "hb": lambda db: _gw1(db).hb_seq,
    "ack": lambda db: _gw1(db).ack_seq, "enr": lambda db: _gw1(db).enr_seq,
}


def _gw1(db: OfficeDatabase) -> GatewayRecord:
    record = db.gateway("gw1")
    assert record is not None
    return record


@pytest.mark.parametrize("stream", list(ALLOCATE))
def test_every_stream_is_numbered_by_the_clock_and_never_goes_back(
        db: OfficeDatabase, stream: str) -> None:
    """Each allocation gives ``max(stored + 1, now_ms)`` and stores it: the clock's ms,
    one more within the same ms or with the clock set back, the clock again once it is
    ahead."""
    allocate = ALLOCATE[stream]
    assert [allocate(db, now) for now in (T, T, T - 60_000, T + 5_000)] == [
        T, T + 1, T + 2, T + 5_000]
    assert STORED[stream](db) == T + 5_000


def test_revocations_and_deltas_name_the_number_before_theirs(db: OfficeDatabase) -> None:
    """A revocation's allocation hands back the stream's previous seq (0 before the
    first; per gateway on ``rev``, one for all on ``all``), a delta's the list version it
    applies to."""
    first = db.allocate_revocation("gw1", [("credential", HASH)], T)
    second = db.allocate_revocation("gw1", [("credential", HASH[::-1])], T - 1)
    assert [(a.seq, a.prev) for a in (first, second)] == [(T, 0), (T + 1, T)]
    assert db.allocate_revocation("gw2", [("credential", HASH)], T).prev == 0
    broadcast = [db.allocate_revocation("*", [("permit", HASH)], now) for now in (T, T + 9)]
    assert [(a.seq, a.prev) for a in broadcast] == [(T, 0), (T + 9, T)]
    version = db.allocate_snapshot("gw1", T + 20, resync=False).version
    allocated = db.allocate_delta("gw1", [HASH], T + 10)
    assert allocated is not None
    assert (allocated[0].seq, allocated[0].prev) == (version + 1, version)


def test_reported_versions_raise_the_counters_and_never_lower_them(
        db: OfficeDatabase) -> None:
    """What a gateway reports having stored raises the office's counters (its list by
    ``staging`` too; ``all`` to the highest any gateway reports); lower values, unknown
    keys, an empty report and values far ahead of the office's clock change nothing; the
    next numbers come above, whatever the clock says."""
    db.allocate_command("gw1", T)
    db.raise_counters("gw1", {"list": T + 5, "staging": T + 9, "rev": T + 3, "cmd": T - 100,
                              "hb": T + 2, "enr": T + 4, "all": T + 7, "mode": T + 99}, T)
    raised = _gw1(db)
    assert (raised.list_version, raised.rev_seq, raised.cmd_seq, raised.hb_seq,
            raised.enr_seq, raised.ack_seq) == (T + 9, T + 3, T, T + 2, T + 4, 0)
    assert db.all_seq() == T + 7
    db.raise_counters("gw2", {"all": T + 6, "list": 1}, T)
    other = db.gateway("gw2")
    assert other is not None and (other.list_version, other.rev_seq) == (1, 0)
    assert db.all_seq() == T + 7
    db.raise_counters("gw1", {}, T)
    db.raise_counters("gw2", {"all": MAX_INT, "cmd": MAX_INT}, T)  # not a day ahead of T
    assert _gw1(db) == raised and db.all_seq() == T + 7
    rev = db.allocate_revocation("gw1", [("credential", HASH)], 5)
    assert (rev.seq, rev.prev) == (T + 4, T + 3)
    assert db.allocate_revocation("*", [("permit", HASH)], 5).prev == T + 7
    assert db.allocate_snapshot("gw1", 5, resync=False).version == T + 10


def test_a_stream_at_the_largest_integer_allocates_nothing(db: OfficeDatabase) -> None:
    """A counter at 2**53 refuses the next allocation (``CentralError``) and stays as it
    was: a number is never wrapped or reused."""
    db.raise_counters("gw1", {"cmd": MAX_INT}, MAX_INT)
    with pytest.raises(CentralError, match=r"2\*\*53"):
        db.allocate_command("gw1", T)
    assert _gw1(db).cmd_seq == MAX_INT


# -- the gateway's rule, on a real store ------------------------------------------------


def _revocation(rig: Rig, seq: int, card: str, prev: int | None, *,
                stream: str = "rev") -> Revocation:
    return Revocation(type="revocation", items=[Revoked(kind="credential",
                                                        hash=b64(cred(card)))],
                      prev_seq=prev, **rig.header(seq, gateway="*" if stream == "all"
                                                  else rig.applier.gateway))


@pytest.mark.parametrize("stream", ["rev", "all"])
def test_with_prev_seq_a_jump_is_no_gap_but_a_missed_message_is(rig: Rig,
                                                               stream: str) -> None:
    """With ``prev_seq`` a revocation whose seq jumps is applied without a resync as long
    as ``prev_seq`` is at or below the stored seq (below: an office restored from a
    backup); one whose ``prev_seq`` is above it is applied and asks for a resync
    (``gap``)."""
    rig.send(stream, _revocation(rig, T, CARD_A, 0, stream=stream))
    rig.send(stream, _revocation(rig, T + 1_000, CARD_B, T, stream=stream))
    rig.send(stream, _revocation(rig, T + 9_000, CARD_B, T - 50, stream=stream))
    assert rig.sent.resyncs == []
    rig.send(stream, _revocation(rig, T + 20_000, CARD_C, T + 15_000, stream=stream))
    assert [(a.seq, a.status) for a in rig.sent.applied] == [
        (T, "applied"), (T + 1_000, "applied"), (T + 9_000, "applied"),
        (T + 20_000, "applied")]
    assert rig.sent.resyncs == [("gap", False)]
    assert all(rig.store.lookup(cred(c)).revoked for c in (CARD_A, CARD_B, CARD_C))
    assert rig.applier.versions()[stream] == T + 20_000


@pytest.mark.parametrize("stream", ["rev", "all"])
def test_without_prev_seq_any_jump_is_a_gap(rig: Rig, stream: str) -> None:
    """From an office that sends no ``prev_seq``, a revocation one above the stored seq
    is no gap, and one that skips a seq is applied and asks for a resync."""
    rig.send(stream, _revocation(rig, 1, CARD_A, None, stream=stream))
    assert rig.sent.resyncs == []
    rig.send(stream, _revocation(rig, 3, CARD_B, None, stream=stream))
    assert rig.sent.resyncs == [("gap", False)]
    assert rig.store.lookup(cred(CARD_B)).revoked


def test_a_delta_may_jump_versions_when_its_base_is_the_current_one(rig: Rig) -> None:
    """A delta whose seq is far above its base applies when the base is the gateway's
    list version, with no resync; one on another base is refused as ``gap``."""
    rig.snapshot(T, [[CARD_A]])
    rig.send("list", Delta(type="delta", base=T, upsert=[Entry(cred=b64(cred(CARD_B)))],
                           **rig.header(T + 777_000)))
    assert (rig.last().seq, rig.last().status) == (T + 777_000, "applied")
    assert rig.applier.versions()["list"] == T + 777_000
    assert rig.store.lookup(cred(CARD_B)).grant is not None
    assert rig.sent.resyncs == []
    rig.send("list", Delta(type="delta", base=T + 777_001, remove=[b64(cred(CARD_A))],
                           **rig.header(T + 900_000)))
    assert (rig.last().status, rig.last().reason) == ("refused", "gap")


def test_commands_decisions_and_heartbeats_ignore_jumps(rig: Rig) -> None:
    """Commands, enrollment decisions and heartbeats whose seqs jump are applied, and no
    jump asks for a resync."""
    rig.snapshot(1, [[]])  # a gateway with a list (one without asks for it on a heartbeat)
    rig.sent.applied.clear()
    for seq in (T, T + 5_000):
        rig.send("cmd", Command(type="command", action="status", **rig.header(seq)))
        rig.send("enr", EnrollmentDecision(type="enrollment_decision", items=[Decided(
            enrollment=str(uuid.uuid4()), status="rejected", reason="officer")],
            **rig.header(seq)))
        rig.send("hb", Heartbeat(type="heartbeat", list_version=0, rev_seq=0, all_seq=0,
                                 **rig.header(seq)))
    assert [(a.stream, a.seq, a.status) for a in rig.sent.applied] == [
        ("cmd", T, "applied"), ("enr", T, "applied"),
        ("cmd", T + 5_000, "applied"), ("enr", T + 5_000, "applied")]
    assert {k: rig.applier.versions()[k] for k in ("cmd", "enr", "hb")} == dict.fromkeys(
        ("cmd", "enr", "hb"), T + 5_000)
    assert rig.sent.resyncs == []


def test_prev_seq_is_absent_unless_said_and_below_the_seq(rig: Rig) -> None:
    """``prev_seq`` stays off the wire when not given (a gateway older than it refuses
    unknown keys); a body whose ``prev_seq`` is not below its seq is malformed."""
    assert "prev_seq" not in json.loads(_revocation(rig, 5, CARD_A, None).model_dump_json())
    assert json.loads(_revocation(rig, 5, CARD_A, 4).model_dump_json())["prev_seq"] == 4
    body = json.loads(_revocation(rig, 5, CARD_A, 4).model_dump_json())
    with pytest.raises(RefusedError, match="malformed"):
        parse_central(json.dumps({**body, "prev_seq": 5}))


def test_the_revocation_examples_of_the_protocol_document_do_what_it_says(
        tmp_path: Path) -> None:
    """Every body in docs/protocol.md's ``revocation`` section is a valid revocation; the
    one with ``prev_seq``, signed and applied, asks for nothing at a gateway whose seq is
    its ``prev_seq`` and for a snapshot (``gap``) at one whose seq is lower."""
    doc = (REPO / "docs" / "protocol.md").read_text("utf-8")
    section = doc.split("\n### `revocation`\n", 1)[1].split("\n### ", 1)[0]
    bodies = [parse_central(b) for b in re.findall(r"```json\n(.*?)```", section, re.S)]
    assert bodies and all(isinstance(b, Revocation) for b in bodies)
    (example,) = [b for b in bodies if isinstance(b, Revocation) and b.prev_seq is not None]
    assert example.prev_seq is not None
    resyncs = []
    for stored in (example.prev_seq, example.prev_seq - 1):
        (tmp_path / str(stored)).mkdir()
        rig = Rig(tmp_path / str(stored))
        try:
            rig.store.set_stream("rev", stored)
            rig.send("rev", example.model_copy(update={"gateway": rig.applier.gateway}))
            assert (rig.last().seq, rig.last().status) == (example.seq, "applied")
            resyncs.append(rig.sent.resyncs)
        finally:
            rig.store.close()
    assert resyncs == [[], [("gap", False)]]


# -- the office taking in what gateways report --------------------------------------------


def test_a_serving_office_raises_its_counters_to_what_a_gateway_reports(
        broker: Broker, tmp_path: Path) -> None:
    """A status naming versions above the office's counters, and a resync request naming
    ``rev`` and ``all`` seqs above them, raise the counters: the next command, revocation
    and broadcast revocation come above what the gateway reported, though the office's
    clock is behind it."""
    folder = tmp_path / "central"
    keygen(folder)
    with Central(folder, broker.host, broker.port) as central:
        central.add_gateway("gw1", "site-1", os.urandom(32))
    clock = FakeClock()
    ahead = int(clock.now * 1000) + 3_600_000  # an hour past the office's clock
    peer = GatewayPeer(broker, "gw1")
    serving = Serving(Central(folder, broker.host, broker.port, clock=clock,
                              resync_interval_s=3600))
    try:
        central = serving.central
        peer.send("status", {"type": "status", "gateway": "gw1", "state": "online",
                             "versions": {"list": ahead, "cmd": ahead + 1, "hb": ahead}})
        wait_for(lambda: central.gateway_report("gw1")["streams"]["cmd"] == ahead + 1,
                 "the status taken in")
        peer.send("request", {"type": "resync", "gateway": "gw1", "reason": "gap",
                              "list_version": ahead, "rev_seq": ahead + 2,
                              "all_seq": ahead + 3, "ts_ms": 0})
        wait_for(lambda: central.gateway_report("gw1")["streams"]["rev"] == ahead + 2,
                 "the request taken in")
        assert central.command("gw1", "status") == ahead + 2
        assert central.revoke_permit("P-1", "gw1") == ahead + 3
        assert central.revoke_permit("P-2") == ahead + 4
    finally:
        serving.stop()
        peer.close()


# -- a restore, end to end --------------------------------------------------------------


def _backup(database: Path, copy: Path) -> None:
    """A consistent copy of a live SQLite database (the online backup API)."""
    source, target = sqlite3.connect(database), sqlite3.connect(copy)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def _restore(copy: Path, database: Path) -> None:
    """Put ``copy`` back in place of ``database`` (its WAL and shared memory gone)."""
    for suffix in ("-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(copy, database)


def test_an_office_restored_from_a_backup_is_still_heard(broker: Broker,
                                                         tmp_path: Path) -> None:
    """After the office's ``central.db`` is restored from an older copy, its next
    revocations (own and broadcast) and command carry seqs above what the gateway stored:
    the gateway applies them (the revoked card is denied) and refuses nothing."""
    folder = tmp_path / "central"
    keygen(folder)

    def office() -> Central:
        return Central(folder, broker.host, broker.port)

    with office() as central:
        central.add_gateway(GW, "b-1", KEY)
        for card, permit in ((CARD_A, "P-301"), (CARD_B, "P-302"), (CARD_C, "P-303")):
            central.enroll(GW, card, permit)
    (tmp_path / "gw").mkdir()
    gateway = Gateway(tmp_path / "gw", broker, folder / TRUSTED_KEYS_NAME)
    serving = Serving(Central(folder, broker.host, broker.port, resync_interval_s=0.5))
    served = True
    gateway.agent.start()
    try:
        wait_for(lambda: gateway.versions().get("list"), "the first list applied")
        served = False
        serving.stop()  # from here on one-shot commands: nothing the gateway reports
        # reaches the office, so only the numbering itself can keep it above the gateway

        def applied(**seqs: int) -> dict[str, int]:
            wait_for(lambda: all(gateway.versions().get(s, 0) == v for s, v in seqs.items()),
                     lambda: f"{seqs} applied; the gateway holds {gateway.versions()}")
            return seqs

        with office() as central:
            applied(rev=central.revoke_card(GW, "em4100:0000000001"),
                    all=central.revoke_permit("P-901"), cmd=central.command(GW, "status"))
        _backup(folder / DB_NAME, tmp_path / "backup.db")
        with office() as central:
            applied(rev=central.revoke_card(GW, "em4100:0000000002"),
                    all=central.revoke_permit("P-902"), cmd=central.command(GW, "normal"))
        assert gateway.tap(CARD_A).reason is Reason.GRANTED
        assert gateway.tap(CARD_B).reason is Reason.GRANTED

        _restore(tmp_path / "backup.db", folder / DB_NAME)
        held = gateway.versions()
        with office() as central:
            sent = applied(rev=central.revoke_card(GW, CARD_A),
                           all=central.revoke_permit("P-302"),
                           cmd=central.command(GW, "status"))
        assert all(seq > held[stream] for stream, seq in sent.items()), (sent, held)
        assert gateway.tap(CARD_A).reason is Reason.REVOKED
        assert gateway.tap(CARD_B).reason is Reason.REVOKED
        assert gateway.tap(CARD_C).reason is Reason.GRANTED
        assert gateway.agent.sync is not None
        assert dict(gateway.agent.sync.counters.refused) == {}
        assert "sync_refused" not in gateway.kinds()
    finally:
        gateway.agent.stop()
        if served:
            serving.stop()
