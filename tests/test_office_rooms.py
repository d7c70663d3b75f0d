"""The office's rooms (``provisioning/``): where SQL may live, the schema that existing
``central.db`` files were made by, the request format between a one-shot command and
``serve``, and the database operations whose atomicity the rest relies on.

The office's behaviour end to end, against a real broker, is tests/test_central.py;
that no office module imports the agent is tests/test_protocol.py.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from protocol.messages import Revoked
from protocol.signing import b64
from provisioning.db import (
    Arrival,
    EnrollmentRecord,
    EntryRecord,
    EventRecord,
    OfficeDatabase,
)
from provisioning.db.sqlite_schema import MIGRATIONS
from provisioning.handoff import Request, decode, decode_result, encode
from provisioning.publish import (
    HeartbeatAll,
    PublishDelta,
    PublishSnapshot,
    Revoke,
    SendCommand,
    SendHeartbeat,
)
from provisioning.tenants import ConfirmEnrollment, RejectEnrollment

if TYPE_CHECKING:
    from tests.pg import OfficeDb

pytest_plugins = ("tests.pg",)  # office_db: every database test runs on SQLite and PostgreSQL

REPO = Path(__file__).resolve().parent.parent
OFFICE = REPO / "provisioning"
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER)\s")
MIGRATION_SHA256 = (
    "64dd19363738079a883063518415d708740bf10dee31f0789320280b1a8315af",
    "fc338cd80a61cc7334392379e80d3bd930968eacf91561ece16348ad132a7a52",
)
"""Of each entry of ``MIGRATIONS`` as the ``central.db`` files made so far were made (or
upgraded) by it."""
HASH = bytes(range(32))
ENROLLMENT = "5b0c7f0e-3c2a-4d8e-9a61-2f4b8d7e1c90"


def _sql_strings(path: Path) -> list[str]:
    """The string literals of a module that read as SQL statements."""
    tree = ast.parse(path.read_text("utf-8"))
    return [node.value[:60] for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and SQL.search(node.value)]


def _backend(path: Path) -> bool:
    """A database backend: a module of ``provisioning/db/`` other than the interface."""
    return path.parent == OFFICE / "db" and path.name != "__init__.py"


def test_only_the_database_backends_speak_sql() -> None:
    """No office module outside the backends of ``provisioning/db/`` holds an SQL
    statement, and the SQLite backend does (so the scan finds what it looks for)."""
    modules = sorted(OFFICE.rglob("*.py"))
    outside = {str(p.relative_to(REPO)): found for p in modules if not _backend(p)
               if (found := _sql_strings(p))}
    assert outside == {}
    assert _sql_strings(OFFICE / "db" / "sqlite.py")
    assert _sql_strings(OFFICE / "db" / "sqlite_schema.py")
    assert _sql_strings(OFFICE / "db" / "postgres.py")
    assert _sql_strings(OFFICE / "db" / "postgres_schema.py")


def test_a_migration_is_never_edited() -> None:
    """The migrations existing ``central.db`` files were made and upgraded by stay byte
    for byte the same: a schema change is a new migration, so an existing folder still
    opens."""
    assert tuple(hashlib.sha256(m.encode()).hexdigest()
                 for m in MIGRATIONS[:len(MIGRATION_SHA256)]) == MIGRATION_SHA256


OPERATIONS: list[tuple[Request, str, dict[str, object]]] = [
    (PublishSnapshot("gw1", 500), "snapshot", {"gateway": "gw1", "chunk_entries": 500}),
    (PublishDelta("gw1", (HASH,), (HASH[::-1],)), "delta",
     {"gateway": "gw1", "upsert": [b64(HASH)], "remove": [b64(HASH[::-1])]}),
    (Revoke("*", (Revoked(kind="permit", hash=b64(HASH)),)), "revoke",
     {"target": "*", "items": [{"kind": "permit", "hash": b64(HASH)}]}),
    (SendCommand("gw1", "lockdown"), "command", {"gateway": "gw1", "action": "lockdown"}),
    (SendHeartbeat("gw2"), "heartbeat", {"gateway": "gw2"}),
    (HeartbeatAll(), "heartbeat_all", {}),
    (ConfirmEnrollment("gw1", ENROLLMENT), "confirm_enrollment",
     {"gateway": "gw1", "enrollment": ENROLLMENT}),
    (RejectEnrollment("gw1", ENROLLMENT, "officer"), "reject_enrollment",
     {"gateway": "gw1", "enrollment": ENROLLMENT, "reason": "officer"}),
]


@pytest.mark.parametrize(("op", "name", "args"), OPERATIONS,
                         ids=[name for _, name, _ in OPERATIONS])
def test_every_operation_travels_to_serve_in_the_documented_format(
        op: Request, name: str, args: dict[str, object]) -> None:
    """Each typed operation is queued for a running serve as its documented name and JSON
    arguments (hashes and ids only), and comes back out as the same operation."""
    encoded = encode(op)
    assert (encoded[0], json.loads(encoded[1])) == (name, args)
    assert decode(*encoded) == op


def test_a_request_result_is_a_seq_or_seqs_by_gateway() -> None:
    """A request's result decodes to the seq it used, or (heartbeat_all) to a seq per
    gateway, and an unknown operation name is refused."""
    assert decode_result("7") == 7
    assert decode_result('{"gw1": 3, "gw2": 1}') == {"gw1": 3, "gw2": 1}
    with pytest.raises(ValueError, match="unknown operation"):
        decode("reboot", "{}")


@pytest.fixture
def db(tmp_path: Path, office_db: OfficeDb) -> Iterator[OfficeDatabase]:
    """A new office database (SQLite, PostgreSQL) with gateway gw1 registered."""
    database = office_db.open(tmp_path)
    assert database.add_gateway("gw1", "site-1", str(tmp_path / "gw1.key"), 0, 1)
    yield database
    database.close()


def _event(seq: int) -> EventRecord:
    return EventRecord(seq, f"{seq:036d}", 1_000 + seq, "access_granted", "front", None,
                       "entry", "granted", None, "{}", "0" * 64, f"{seq:064x}")


def test_a_failing_chain_check_stores_none_of_the_batch(db: OfficeDatabase) -> None:
    """Events and the chain problems found in them commit together: when the check fails
    midway, no event of the batch is stored and nothing is acknowledged."""

    def check(arrival: Arrival) -> list[tuple[int, str]]:
        if arrival.index == 1:
            raise RuntimeError("check failed")
        return []

    with pytest.raises(RuntimeError, match="check failed"):
        db.store_events("gw1", [_event(1), _event(2)], 5, check)
    assert db.events("gw1", after_seq=0, limit=None) == []
    stored = db.store_events("gw1", [_event(1), _event(2)], 6, lambda _a: [])
    assert (stored.new, stored.acked_upto) == (2, 2)


def test_a_delta_naming_an_unenrolled_card_spends_no_version(db: OfficeDatabase) -> None:
    """A delta that cannot be built (a card to upsert is not enrolled) allocates nothing:
    a snapshot after it, at an earlier time, still gets the version its own time gives."""
    db.put_entries("gw1", [EntryRecord(HASH, None, None, None, ("front",), None, 1, 1_000)])
    assert db.allocate_delta("gw1", [HASH, HASH[::-1]], 2_000) is None
    contents = db.allocate_snapshot("gw1", 1_000, resync=False)
    assert contents.version == 1_000
    assert [e.doors for e in contents.entries] == [("front",)]


def _enrollment(enrollment_id: str = ENROLLMENT, seq: int = 3, *,
                status: str = "received") -> EnrollmentRecord:
    return EnrollmentRecord(gateway="gw1", id=enrollment_id, seq=seq, unit="101",
                            cred=HASH, permit="11010519491231002X", permit_hash=HASH[::-1],
                            lease_end=2_000_000_000, provisional_until=1_900_000_000,
                            account="landlord", received_ms=1, status=status, reason=None)


def _entry() -> EntryRecord:
    return EntryRecord(HASH, HASH[::-1], None, 2_000_000_000, None, None, 1, 1_000)


def test_an_enrollment_is_recorded_once_together_with_the_cursor(db: OfficeDatabase) -> None:
    """Recording an enrollment moves the gateway's tenant cursor in the same transaction;
    the same enrollment id again changes nothing but the cursor (the first record
    stays)."""
    assert db.record_enrollment(_enrollment(seq=3))
    assert not db.record_enrollment(_enrollment(seq=7, status="rejected"))
    (record,) = db.enrollments("gw1")
    assert (record.seq, record.status, record.permit) == (3, "received", "11010519491231002X")
    gateway = db.gateway("gw1")
    assert gateway is not None and gateway.tenant_upto == 7


def test_deciding_spends_a_number_only_when_something_changes(db: OfficeDatabase) -> None:
    """Confirming what is no longer open, or numbering decisions when none is due,
    allocates no list version and no enr seq; a confirmation spends one of each."""
    assert db.allocate_decisions("gw1", 10, 1) is None
    db.record_enrollment(_enrollment(status="rejected"))
    assert db.confirm_enrollments("gw1", {ENROLLMENT: _entry()}, 5) is None
    gateway = db.gateway("gw1")
    assert gateway is not None and (gateway.list_version, gateway.enr_seq) == (0, 0)
    other = "8e41d2a0-6b7c-4f19-a3d5-0c9e2b7f5a16"
    db.record_enrollment(_enrollment(other, 4, status="held"))
    change = db.confirm_enrollments("gw1", {other: _entry()}, 6)
    assert change is not None and (change.version, change.base, change.enrollments) == (
        6, 0, [other])
    allocated = db.allocate_decisions("gw1", 10, 1)
    assert allocated is not None
    seq, due = allocated
    assert (seq, [(r.id, r.status, r.decision_seq) for r in due]) == (
        1, [(ENROLLMENT, "rejected", 1), (other, "confirmed", 1)])
    assert db.allocate_decisions("gw1", 10, 1) is None


def test_the_end_of_a_confirmed_enrollment_unlists_its_card_once(db: OfficeDatabase) -> None:
    """Ending a confirmed enrollment deletes its entry under a new list version, in one
    transaction with the cursor; ending it again changes nothing."""
    db.record_enrollment(_enrollment())
    db.confirm_enrollments("gw1", {ENROLLMENT: _entry()}, 5)
    change = db.end_enrollment("gw1", ENROLLMENT, 9, "moved_out", 6)
    assert change is not None and (change.version, change.base, change.remove) == (
        6, 5, [HASH])
    assert db.entries("gw1") == []
    assert db.end_enrollment("gw1", ENROLLMENT, 10, "moved_out", 7) is None
    record = db.enrollment("gw1", ENROLLMENT)
    assert record is not None and (record.status, record.reason) == ("ended", "moved_out")
    gateway = db.gateway("gw1")
    assert gateway is not None and (gateway.list_version, gateway.tenant_upto) == (6, 10)
