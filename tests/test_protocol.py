"""The protocol package: the contract both sides import, and nothing else."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from protocol.chain import GENESIS, Event, contents_match, event_hash
from protocol.ids import check_ident, normalise_card_id
from protocol.messages import Chunk, Entry, EventBatch, WireEvent
from protocol.schemas import MODELS, schema_of
from protocol.topics import Topics, parse_outbound, stream_of

REPO = Path(__file__).resolve().parent.parent
HASH = "A" * 43 + "="


def _imports(folder: Path) -> set[str]:
    """Every top-level package imported by the modules under ``folder``."""
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_protocol_imports_neither_side() -> None:
    """The protocol package imports neither the agent nor the office (nor the shared plumbing)."""
    assert not _imports(REPO / "protocol") & {"agent", "provisioning", "drivers", "common"}


def test_office_imports_no_agent_module() -> None:
    """No module of the office imports ``agent.*``: what both sides share is protocol."""
    assert "agent" not in _imports(REPO / "provisioning")
    assert "drivers" not in _imports(REPO / "provisioning")


def test_common_imports_neither_side() -> None:
    """The shared plumbing (SQLite files, logging) imports neither the agent nor the office."""
    assert not _imports(REPO / "common") & {"agent", "provisioning", "drivers"}


def test_sync_does_not_import_runtime() -> None:
    """The sync worker sees the agent through a narrow interface, not ``agent.runtime``."""
    tree = ast.parse((REPO / "agent" / "sync.py").read_text("utf-8"))
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "agent.runtime" not in modules


@pytest.mark.parametrize(("name", "model"), MODELS)
def test_published_schemas_match_the_models(name: str, model: object) -> None:
    """docs/schemas holds exactly the schema each model exports (re-export after a change
    with ``python -m protocol.schemas docs/schemas``)."""
    published = json.loads((REPO / "docs" / "schemas" / f"{name}.schema.json").read_text())
    assert published == json.loads(json.dumps(schema_of(name, model)))


def test_entry_travels_as_a_seven_element_array() -> None:
    """An allowlist entry is a model in code and a positional 7-element array on the wire."""
    entry = Entry(cred=HASH, valid_until=10, doors=("front", "back"))
    assert json.loads(entry.model_dump_json()) == [HASH, None, None, 10, ["front", "back"],
                                                   None, None]
    chunk = Chunk.model_validate_json(json.dumps(
        {"type": "chunk", "version": 1, "index": 0, "entries": [json.loads(
            entry.model_dump_json())]}))
    assert chunk.entries == [entry]


@pytest.mark.parametrize("bad", [
    {"cred": HASH},                                   # an object, not an array
    [HASH, None, None, None, None, None],             # six elements
    [HASH, None, "1", None, None, None, None],        # a string where seconds go
    [HASH, None, True, None, None, None, None],       # a boolean where seconds go
    [HASH, None, None, None, ["Front"], None, None],  # a door id in upper case
    ["short", None, None, None, None, None, None],    # not a 32-byte base64 hash
])
def test_entry_refuses_malformed_arrays(bad: object) -> None:
    """A chunk entry that is not exactly the documented array of strict types is refused."""
    with pytest.raises(ValidationError):
        Chunk.model_validate_json(json.dumps(
            {"type": "chunk", "version": 1, "index": 0, "entries": [bad]}))


def test_event_hash_is_the_documented_canonical_form() -> None:
    """The event hash covers sorted, compact, unescaped JSON; an edit changes it."""
    event = Event("access_granted", door="front", reason="granted", data={"n": "三"})
    digest = event_hash(GENESIS, 1, "0" * 36, 1000, event)
    wire = WireEvent(seq=1, event_id="0" * 36, ts_ms=1000, kind="access_granted",
                     door="front", reader=None, direction=None, reason="granted", cred=None,
                     data={"n": "三"}, prev_hash=GENESIS, hash=digest)
    assert contents_match(wire)
    assert not contents_match(wire.model_copy(update={"door": "back"}))
    assert EventBatch(type="events", gateway="gw-1", events=[wire]).events[0].hash == digest


def test_topics_round_trip() -> None:
    """A gateway's topics parse back to their stream or (gateway, kind); others do not."""
    topics = Topics("gw-1")
    assert stream_of(topics.inbound("rev"), "gw-1") == "rev"
    assert stream_of(topics.broadcast_revocations, "gw-1") == "all"
    assert stream_of(Topics("gw-2").inbound("rev"), "gw-1") is None
    assert parse_outbound(topics.outbound("events")) == ("gw-1", "events")
    assert parse_outbound("pg/v1/gw/gw-1/in/rev") is None
    assert parse_outbound("pg/v1/gw/gw-1/out/events/extra") is None


def test_ids_and_cards() -> None:
    """Ids follow the documented pattern; EM4100 card ids normalise to upper-case hex."""
    assert check_ident("bldg-0001", "site") == "bldg-0001"
    with pytest.raises(ValueError, match="site 'Bldg'"):
        check_ident("Bldg", "site")
    assert normalise_card_id(" em4100:67003b51c6 ") == "em4100:67003B51C6"
    with pytest.raises(ValueError, match="10 hex digits"):
        normalise_card_id("em4100:123")
