"""One person's movements, only for a case: a documented, logged query (docs/privacy.md).

No office command shows one person's entries and exits except these two, and neither
runs without a reason: ``permitgate-central case --permit N --reason TEXT`` (every card
the office knows for that permit, at every gateway) and ``permitgate-central events GW
--case TEXT`` (a gateway's events with their card prefixes). Each records who asked,
when, why, whose (the permit's hash) and how many events it showed in the ``case_audit``
table, committed before anything is shown; ``case --log`` lists that table.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

from protocol.hashing import log_prefix
from protocol.permits import PermitError, validate_permit
from provisioning.db import CaseRecord, OfficeDatabase
from provisioning.enrollment import known_gateway
from provisioning.errors import CentralUsageError
from provisioning.keys import OfficeKeys

MAX_REASON = 500
MIN_REASON = 8
"""Characters a reason needs at least: a case number or a sentence, not a letter."""
DEFAULT_LIMIT = 1000
"""Events shown at most per card (the newest)."""
PERSONAL_DATA_KEYS = ("unit", "account", "enrollment", "address", "ip", "client",
                      "remote_addr")
"""Keys of an event's ``data`` that point at a person; ``events`` without ``--case``
leaves them out, with the card prefix."""


def checked_reason(reason: str | None) -> str:
    """The reason as given, if it is one; ``CentralUsageError`` otherwise."""
    text = " ".join((reason or "").split())
    if len(text) < MIN_REASON:
        raise CentralUsageError(
            "--reason: a look at one person's movements needs the reason (a case number or "
            f"a sentence, at least {MIN_REASON} characters); it is recorded with your name")
    if len(text) > MAX_REASON:
        raise CentralUsageError(f"--reason: at most {MAX_REASON} characters")
    return text


def officer_name(given: str | None) -> str:
    """Who asks: ``--officer``, else the operating-system user."""
    name = (given or "").strip() or getpass.getuser()
    return name[:128]


@dataclass(frozen=True, slots=True)
class CaseResult:
    """What a case query found and recorded."""

    audit_id: int
    permit: str
    cards: list[dict[str, str]]
    """``{"gateway", "building", "card"}`` for each card of the permit."""
    events: list[dict[str, Any]]
    """Oldest first per card: gateway, card, seq, ts_ms, kind, door, reader, direction,
    reason."""


def redact(event: dict[str, Any]) -> dict[str, Any]:
    """An event as ``events`` shows it without ``--case``: no card prefix, and no field
    of ``data`` that points at a person."""
    data = {k: v for k, v in event.get("data", {}).items() if k not in PERSONAL_DATA_KEYS}
    return {**event, "cred": None, "data": data}


class Cases:
    """Logged queries for a case (see the module docstring)."""

    def __init__(self, db: OfficeDatabase, keys: OfficeKeys, *,
                 clock: Callable[[], float]) -> None:
        self._db = db
        self._keys = keys
        self._clock = clock

    def permit_events(self, permit_number: str, *, reason: str | None, officer: str | None,
                      since_ms: int = 0, limit: int = DEFAULT_LIMIT) -> CaseResult:
        """Every access event of every card of one permit, recorded in the audit first."""
        why = checked_reason(reason)
        try:
            permit = validate_permit(permit_number,
                                     today=date.fromtimestamp(self._clock())).number
        except PermitError as exc:
            raise CentralUsageError(f"--permit: {exc}") from None
        digest = self._keys.permit_hash(permit)
        sites = {g.id: g.site for g in self._db.gateways()}
        cards, events = [], []
        for gateway, cred in self._db.permit_cards(digest):
            prefix = log_prefix(cred)
            cards.append({"gateway": gateway, "building": sites.get(gateway, ""),
                          "card": prefix})
            events += [{"gateway": gateway, "card": prefix, "seq": s.event.seq,
                        "ts_ms": s.event.ts_ms, "kind": s.event.kind, "door": s.event.door,
                        "reader": s.event.reader, "direction": s.event.direction,
                        "reason": s.event.reason}
                       for s in self._db.card_events(gateway, prefix, since_ms, limit)]
        audit = self._db.record_case(CaseRecord(
            int(self._clock() * 1000), officer_name(officer), why, "permit", digest,
            len(events)))
        return CaseResult(audit, permit, cards, events)

    def gateway_events(self, gateway: str, events: list[dict[str, Any]], *,
                       reason: str | None, officer: str | None) -> int:
        """Record that a gateway's events are shown with their card prefixes (``events GW
        --case``); the audit record's id."""
        why = checked_reason(reason)
        known_gateway(self._db, gateway)
        return self._db.record_case(CaseRecord(
            int(self._clock() * 1000), officer_name(officer), why, f"events {gateway}", None,
            len(events)))

    def log(self, limit: int) -> list[dict[str, Any]]:
        """The newest audit records, newest first."""
        return [{"id": r.id, "at_ms": r.at_ms, "officer": r.officer, "reason": r.reason,
                 "scope": r.scope,
                 "permit_ref": None if r.permit_hash is None else log_prefix(r.permit_hash),
                 "shown": r.shown}
                for r in self._db.case_records(limit)]


def dumps(value: Any) -> str:
    """One JSON line."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
