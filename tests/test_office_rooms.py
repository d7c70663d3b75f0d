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

import pytest

from protocol.messages import Revoked
from protocol.signing import b64
from provisioning.db import Arrival, EntryRecord, EventRecord, OfficeDatabase
from provisioning.db.sqlite import SqliteOfficeDatabase
from provisioning.db.sqlite_schema import MIGRATIONS
from provisioning.handoff import decode, decode_result, encode
from provisioning.publish import (
    HeartbeatAll,
    Operation,
    PublishDelta,
    PublishSnapshot,
    Revoke,
    SendCommand,
    SendHeartbeat,
)

REPO = Path(__file__).resolve().parent.parent
OFFICE = REPO / "provisioning"
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER)\s")
FIRST_MIGRATION_SHA256 = "64dd19363738079a883063518415d708740bf10dee31f0789320280b1a8315af"
"""Of ``MIGRATIONS[0]`` as every ``central.db`` so far was made by it."""
HASH = bytes(range(32))


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


def test_the_first_migration_is_never_edited() -> None:
    """The schema every existing ``central.db`` was made by stays byte for byte the same:
    a schema change is a new migration, so an existing folder still opens."""
    assert hashlib.sha256(MIGRATIONS[0].encode()).hexdigest() == FIRST_MIGRATION_SHA256


OPERATIONS: list[tuple[Operation, str, dict[str, object]]] = [
    (PublishSnapshot("gw1", 500), "snapshot", {"gateway": "gw1", "chunk_entries": 500}),
    (PublishDelta("gw1", (HASH,), (HASH[::-1],)), "delta",
     {"gateway": "gw1", "upsert": [b64(HASH)], "remove": [b64(HASH[::-1])]}),
    (Revoke("*", (Revoked(kind="permit", hash=b64(HASH)),)), "revoke",
     {"target": "*", "items": [{"kind": "permit", "hash": b64(HASH)}]}),
    (SendCommand("gw1", "lockdown"), "command", {"gateway": "gw1", "action": "lockdown"}),
    (SendHeartbeat("gw2"), "heartbeat", {"gateway": "gw2"}),
    (HeartbeatAll(), "heartbeat_all", {}),
]


@pytest.mark.parametrize(("op", "name", "args"), OPERATIONS,
                         ids=[name for _, name, _ in OPERATIONS])
def test_every_operation_travels_to_serve_in_the_documented_format(
        op: Operation, name: str, args: dict[str, object]) -> None:
    """Each typed operation is queued for a running serve as its documented name and JSON
    arguments (hashes only), and comes back out as the same operation."""
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
def db(tmp_path: Path) -> Iterator[OfficeDatabase]:
    """A new SQLite office database with gateway gw1 registered."""
    database: OfficeDatabase = SqliteOfficeDatabase(tmp_path / "central.db")
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
    the next list version is still 1."""
    db.put_entries("gw1", [EntryRecord(HASH, None, None, None, ("front",), None, 1, 1_000)])
    assert db.allocate_delta("gw1", [HASH, HASH[::-1]], 2_000) is None
    contents = db.allocate_snapshot("gw1", 3_000, resync=False)
    assert contents.version == 1
    assert [e.doors for e in contents.entries] == [("front",)]
