"""The sync part of ``permitgate status`` (docs/protocol.md, "On the gateway: status --json").

``status`` runs in its own process and reads the store only: the stream versions and the
newest heartbeat come from the list database, and the link state, the staleness flag and
the refusal counts from the row the sync worker records (agent/sync.py, ``SYNC_STATE``),
as the running agent last saw them. The counts start again from zero with the agent.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config import SyncConfig
    from agent.store import Store


def sync_report(config: SyncConfig, store: Store, recorded: dict[str, Any] | None,
                now: float | None = None) -> dict[str, Any]:
    """The ``sync`` object of ``status --json``; ``recorded`` is the worker's device-state
    row (with its ``since_ms``), or None when no sync worker ever ran."""
    now = time.time() if now is None else now
    heartbeat = store.stream_detail("hb")
    issued = heartbeat.get("issued_at") if heartbeat else None
    recorded = recorded or {}
    return {
        "enabled": config.enabled,
        "link": recorded.get("state"),
        "stale": recorded.get("stale"),
        "heartbeat_issued_at": issued,
        "heartbeat_age_s": None if not isinstance(issued, int) else int(now - issued),
        "heartbeat_max_age_s": config.heartbeat_max_age_s,
        "refused": dict(recorded.get("refused") or {}),
        "versions": store.versions(),
        "recorded_ms": recorded.get("since_ms"),
    }
