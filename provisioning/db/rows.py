"""Records to database rows and back: the logic both backends share (no SQL here).

``SqliteOfficeDatabase`` (sqlite.py and its mixins) and ``PostgresOfficeDatabase``
(postgres.py and its mixins) store the same records in tables of the same columns; only
their statements differ. What turns a record into the values of a statement, and a
fetched row (a mapping of column to value, as ``sqlite_utils`` and psycopg's
``dict_row`` give it) back into a record, is here once. Binary columns are read back as
``bytes`` whichever type the driver hands out.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from provisioning.db.records import (
    CaseRecord,
    EnrollmentRecord,
    EntryRecord,
    EventRecord,
    ReconcileParams,
    RegistryRow,
    StoredEvent,
)
from provisioning.errors import CentralError

Row = Mapping[str, Any]
"""A fetched row by column name."""

ENROLLMENT_COLUMNS = tuple(f.name for f in dataclasses.fields(EnrollmentRecord))
"""The columns of ``enrollments``, in the order of the backends' insert statements."""
EVENT_COLUMNS = ("gateway", "seq", "event_id", "ts_ms", "kind", "door", "reader",
                 "direction", "reason", "cred", "data", "prev_hash", "hash",
                 "received_ms", "attachment")
"""The columns of ``events``, in the order of ``event_row``."""


def blob(value: Any) -> bytes | None:
    """A binary column's value as ``bytes`` (None stays None)."""
    return None if value is None else bytes(value)


def returned(row: Any, gateway: str) -> Any:
    """The row a statement on ``gateways`` gave (``UPDATE … RETURNING``, a ``SELECT`` of
    its id); an unknown gateway is an error (callers check first: a gateway is never
    deleted)."""
    if row is None:
        raise CentralError(f"gateway {gateway!r}: not in the database")
    return row


# -- entries -----------------------------------------------------------------------------


def entry_record(row: Row) -> EntryRecord:
    """An ``entries`` row as its record."""
    return EntryRecord(cred=bytes(row["cred"]), permit=blob(row["permit"]),
                       valid_from=row["valid_from"], valid_until=row["valid_until"],
                       doors=None if row["doors"] is None else tuple(json.loads(row["doors"])),
                       schedule=row["schedule"], confirmed_at=row["confirmed_at"],
                       updated_ms=row["updated_ms"])


def entry_row(gateway: str, entry: EntryRecord) -> tuple[Any, ...]:
    """The values of an ``entries`` row, in column order."""
    doors = None if entry.doors is None else json.dumps(list(entry.doors))
    return (gateway, entry.cred, entry.permit, entry.valid_from, entry.valid_until, doors,
            entry.schedule, entry.confirmed_at, entry.updated_ms)


# -- enrollments -------------------------------------------------------------------------


def enrollment_record(row: Row) -> EnrollmentRecord:
    """An ``enrollments`` row as its record."""
    fields = {k: row[k] for k in ENROLLMENT_COLUMNS}
    for name in ("cred", "permit_hash"):
        fields[name] = blob(fields[name])
    fields["elsewhere"] = tuple(json.loads(row["elsewhere"] or "[]"))
    return EnrollmentRecord(**fields)


def enrollment_row(record: EnrollmentRecord) -> tuple[Any, ...]:
    """The values of an ``enrollments`` row, in ``ENROLLMENT_COLUMNS`` order."""
    values = {k: getattr(record, k) for k in ENROLLMENT_COLUMNS}
    values["elsewhere"] = json.dumps(list(record.elsewhere)) if record.elsewhere else None
    return tuple(values[k] for k in ENROLLMENT_COLUMNS)


# -- events ------------------------------------------------------------------------------


def event_record(row: Row) -> EventRecord:
    """An ``events`` row as the event the gateway sent."""
    return EventRecord(row["seq"], row["event_id"], row["ts_ms"], row["kind"], row["door"],
                       row["reader"], row["direction"], row["reason"], row["cred"],
                       row["data"], row["prev_hash"], row["hash"], row["attachment"])


def stored_event(row: Row) -> StoredEvent:
    """An ``events`` row as the event and when the office received it."""
    return StoredEvent(event_record(row), row["received_ms"])


def event_row(gateway: str, ev: EventRecord, received_ms: int) -> tuple[Any, ...]:
    """The values of an ``events`` row, in ``EVENT_COLUMNS`` order."""
    return (gateway, ev.seq, ev.event_id, ev.ts_ms, ev.kind, ev.door, ev.reader,
            ev.direction, ev.reason, ev.cred, ev.data, ev.prev_hash, ev.hash, received_ms,
            ev.attachment)


# -- the registry comparison and cases ---------------------------------------------------


def registry_row(row: RegistryRow) -> tuple[Any, ...]:
    """The values of a staged registry row (``rc_registry`` without its id)."""
    return (row.line, row.permit, row.permit_hash, row.building, row.unit, row.status,
            row.registered_day, row.valid_until_day)


def find_values(params: ReconcileParams) -> dict[str, int]:
    """The named parameters of the comparison's statements (``find``)."""
    return {"now_s": params.now_ms // 1000, "today": params.today,
            "quiet_since_ms": params.quiet_since_ms,
            "silent_before_ms": params.silent_before_ms,
            "stale_before_ms": params.stale_before_ms}


def case_record(row: Row) -> CaseRecord:
    """A ``case_audit`` row as its record."""
    return CaseRecord(row["at_ms"], row["officer"], row["reason"], row["scope"],
                      blob(row["permit_hash"]), row["shown"], row["id"])
