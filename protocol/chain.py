"""The event chain: the canonical hash of an event and the rules that link events.

Every event a gateway records carries ``prev_hash`` (its predecessor's ``hash``, or
``GENESIS`` for seq 1) and ``hash`` = SHA-256 over the canonical JSON of its fields and
``prev_hash``. Sequence numbers run 1, 2, 3, … without gaps, so both the gateway
(``permitgate events verify``) and the office can tell a missing or edited event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

GENESIS = "0" * 64
"""The ``prev_hash`` of event 1."""


@dataclass(frozen=True, slots=True)
class Event:
    """What happened, where and why: the fields of an event that its hash covers, besides
    its place in the chain (seq, id, time, predecessor)."""

    kind: str
    door: str | None = None
    reader: str | None = None
    direction: str | None = None
    reason: str | None = None
    cred: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


def event_hash(prev_hash: str, seq: int, event_id: str, ts_ms: int, event: Event) -> str:
    """SHA-256 (hex) over the canonical JSON of an event and its predecessor's hash:
    keys sorted, no spaces, UTF-8 unescaped (docs/protocol.md, "Event chain")."""
    body = {
        "prev_hash": prev_hash, "seq": seq, "event_id": event_id, "ts_ms": ts_ms,
        "kind": event.kind, "door": event.door, "reader": event.reader,
        "direction": event.direction, "reason": event.reason, "cred": event.cred,
        "data": dict(event.data),
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ChainedEvent(Protocol):
    """An event with its place in the chain, as stored or as sent (``WireEvent``)."""

    @property
    def seq(self) -> int: ...
    @property
    def event_id(self) -> str: ...
    @property
    def ts_ms(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def door(self) -> str | None: ...
    @property
    def reader(self) -> str | None: ...
    @property
    def direction(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def cred(self) -> str | None: ...
    @property
    def data(self) -> Mapping[str, Any]: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def hash(self) -> str: ...


def contents_match(ev: ChainedEvent) -> bool:
    """Whether an event's ``hash`` is the hash of its own contents and link."""
    return ev.hash == event_hash(ev.prev_hash, ev.seq, ev.event_id, ev.ts_ms, Event(
        ev.kind, ev.door, ev.reader, ev.direction, ev.reason, ev.cred, ev.data))
