"""The JSON Schema of every message: ``python -m protocol.schemas docs/schemas``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from protocol import PROTOCOL
from protocol.messages import (
    Applied,
    Chunk,
    Command,
    Delta,
    EnrollmentAttachment,
    EnrollmentDecision,
    EventAck,
    EventBatch,
    Heartbeat,
    KeyAnnouncement,
    Rekey,
    ResyncRequest,
    Revocation,
    SiteKey,
    Snapshot,
    Status,
)
from protocol.signing import Envelope

MODELS: Sequence[tuple[str, Any]] = (
    ("envelope", Envelope), ("snapshot", Snapshot), ("chunk", Chunk), ("delta", Delta),
    ("revocation", Revocation), ("command", Command), ("heartbeat", Heartbeat),
    ("event_ack", EventAck), ("events", EventBatch), ("applied", Applied),
    ("resync", ResyncRequest), ("status", Status),
    ("enrollment_decision", EnrollmentDecision), ("enrollment_attachment", EnrollmentAttachment),
    ("keys", KeyAnnouncement), ("site_key", SiteKey), ("rekey", Rekey),
)
"""Schema file name → model."""


def schema_of(name: str, model: Any) -> dict[str, Any]:
    """The JSON Schema of one message model, with its ``$id``."""
    schema: dict[str, Any] = TypeAdapter(model).json_schema()
    schema["$id"] = f"https://permitgate.invalid/schemas/{PROTOCOL}/{name}.schema.json"
    return schema


def export_schemas(folder: Path) -> list[Path]:
    """Write the JSON Schema of every wire message into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in MODELS:
        path = folder / f"{name}.schema.json"
        path.write_text(json.dumps(schema_of(name, model), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def main(argv: Sequence[str]) -> int:
    """``python -m protocol.schemas FOLDER``."""
    if len(argv) != 1:
        sys.stderr.write("usage: python -m protocol.schemas FOLDER\n")
        return 2
    for path in export_schemas(Path(argv[0])):
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
