"""Tenants a landlord enrolled on site: their records and the access they give meanwhile.

An enrollment is made at the gateway (the page or ``permitgate enroll``) and gives the
tenant's card **provisional** access at once, until the earlier of the provisional window
(``[enrollment] provisional_h``), the lease end, or the office's answer. The office
confirms (the card then comes in the office's own list at the version the answer names;
until the gateway's list reaches that version the confirmed record keeps granting up to
the lease end) or rejects (access ends at once). A move-out ends access at once with a
local revocation that no list from the office can undo, and the office is told.

These rows live in the list database beside the office's lists but outside the tables a
snapshot replaces, so an office list never wipes a pending enrollment. Like the rest of
the store this module speaks SQL and nothing else; the gateway keeps only the card's keyed
hash here, never a permit number (that travels sealed to the office: protocol.sealing).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent.decision import Grant
from common.sqlite import SqliteFile, StoreError, rollback

LIST_MIGRATION = """
CREATE TABLE enrollments (
    id TEXT PRIMARY KEY,
    cred BLOB NOT NULL,                 -- HMAC-SHA256(site key, card id)
    unit TEXT NOT NULL,
    lease_end INTEGER NOT NULL,         -- Unix s, exclusive
    provisional_until INTEGER NOT NULL, -- Unix s, exclusive
    state TEXT NOT NULL CHECK (state IN ('pending', 'confirmed', 'rejected', 'ended')),
    list_version INTEGER,               -- confirmed: the office list version holding it
    reason TEXT,                        -- rejected / ended: why
    account TEXT,                       -- who enrolled (web account or 'cli')
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX enrollments_cred ON enrollments(cred);
CREATE INDEX enrollments_unit ON enrollments(unit);
CREATE TABLE local_revocations (
    cred BLOB PRIMARY KEY,              -- a moved-out tenant's card
    at INTEGER NOT NULL,                -- Unix s
    enrollment TEXT
) WITHOUT ROWID;
"""
"""List-database migration 2 (``agent.store.LIST_MIGRATIONS``)."""


class TenantState(StrEnum):
    """Where an enrollment stands."""

    PENDING = "pending"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Enrollment:
    """One enrollment as stored."""

    id: str
    cred: bytes
    unit: str
    lease_end: int
    provisional_until: int
    state: TenantState
    list_version: int | None
    reason: str | None
    account: str | None
    created_ms: int
    updated_ms: int

    def grant(self, list_version: int) -> Grant | None:
        """The access this record gives while the office's list does not (or None)."""
        if self.state is TenantState.PENDING:
            # A provisional grant counts as confirmed when it was made: the landlord
            # vouched for the tenant then (the stale-list policy may admit it).
            return Grant(valid_until=min(self.provisional_until, self.lease_end),
                         confirmed_at=self.created_ms // 1000)
        if (self.state is TenantState.CONFIRMED and self.list_version is not None
                and list_version < self.list_version):
            return Grant(valid_until=self.lease_end, confirmed_at=self.updated_ms // 1000)
        return None


_COLUMNS = ("id, cred, unit, lease_end, provisional_until, state, list_version, reason, "
            "account, created_ms, updated_ms")


def _row(row: Any) -> Enrollment:
    return Enrollment(row[0], bytes(row[1]), row[2], int(row[3]), int(row[4]),
                      TenantState(row[5]), row[6], row[7], row[8], int(row[9]), int(row[10]))


class Tenants:
    """The enrollment tables of one list database."""

    def __init__(self, db: SqliteFile) -> None:
        self._db = db

    # -- the card path -----------------------------------------------------------------

    def lookup(self, conn: sqlite3.Connection, cred: bytes, list_version: int
               ) -> tuple[Grant | None, bool]:
        """(the provisional or not-yet-listed grant of ``cred``, whether it was moved out)
        read through the caller's connection."""
        revoked = conn.execute("SELECT 1 FROM local_revocations WHERE cred = ?",
                               (cred,)).fetchone() is not None
        grant = None
        for row in conn.execute(f"SELECT {_COLUMNS} FROM enrollments WHERE cred = ? AND "  # noqa: S608 - fixed columns
                                "state IN ('pending', 'confirmed') ORDER BY created_ms DESC",
                                (cred,)):
            grant = _row(row).grant(list_version)
            if grant is not None:
                break
        return grant, revoked

    # -- changes -----------------------------------------------------------------------

    def _write(self, what: str, work: Any) -> Any:
        with self._db.write_lock:
            conn = self._db.writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                result = work(conn)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                rollback(conn)
                raise StoreError(f"{self._db.path}: cannot {what}: {exc}") from exc
            except BaseException:
                rollback(conn)
                raise
            return result

    def rekey(self, pairs: Sequence[tuple[bytes, bytes]]) -> int:
        """Move the enrollments and local revocations of cards known under the previous
        site key to their hash under the current one (a change-over, agent/site_keys.py),
        so they still match once the previous key is dropped; returns the rows moved."""
        def run(conn: sqlite3.Connection) -> int:
            moved = 0
            for old, new in pairs:
                moved += conn.execute("UPDATE enrollments SET cred = ? WHERE cred = ?",
                                      (new, old)).rowcount
                moved += conn.execute("UPDATE OR REPLACE local_revocations SET cred = ? "
                                      "WHERE cred = ?", (new, old)).rowcount
            return moved
        return int(self._write("re-key enrollments", run))

    def add(self, enrollment: Enrollment) -> None:
        """Store a new pending enrollment; a moved-out card enrolled again is no longer
        locally revoked."""
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(f"INSERT INTO enrollments ({_COLUMNS}) VALUES "  # noqa: S608 - fixed columns
                         "(?,?,?,?,?,?,?,?,?,?,?)",
                         (enrollment.id, enrollment.cred, enrollment.unit,
                          enrollment.lease_end, enrollment.provisional_until,
                          enrollment.state.value, enrollment.list_version, enrollment.reason,
                          enrollment.account, enrollment.created_ms, enrollment.updated_ms))
            conn.execute("DELETE FROM local_revocations WHERE cred = ?", (enrollment.cred,))
        self._write("store the enrollment", run)

    def decide(self, enrollment_id: str, state: TenantState, *, now_ms: int,
               list_version: int | None = None, reason: str | None = None
               ) -> Enrollment | None:
        """Apply the office's answer to a pending (or already confirmed) enrollment;
        None when there is no such enrollment or it has ended meanwhile."""
        def run(conn: sqlite3.Connection) -> Enrollment | None:
            cur = conn.execute(
                "UPDATE enrollments SET state = ?, list_version = ?, reason = ?, "
                "updated_ms = ? WHERE id = ? AND state IN ('pending', 'confirmed')",
                (state.value, list_version, reason, now_ms, enrollment_id))
            if not cur.rowcount:
                return None
            row = conn.execute(f"SELECT {_COLUMNS} FROM enrollments WHERE id = ?",  # noqa: S608 - fixed columns
                               (enrollment_id,)).fetchone()
            return _row(row)
        result: Enrollment | None = self._write("apply the office's answer", run)
        return result

    def end(self, *, now_ms: int, reason: str, enrollment_id: str | None = None,
            unit: str | None = None) -> list[Enrollment]:
        """End the active enrollments of one tenant or of every tenant of a unit: their
        cards are locally revoked at once. Returns what was ended."""
        if (enrollment_id is None) == (unit is None):
            raise ValueError("end one enrollment or one unit")
        def run(conn: sqlite3.Connection) -> list[Enrollment]:
            key, value = ("id", enrollment_id) if enrollment_id is not None else ("unit", unit)
            rows = [_row(r) for r in conn.execute(
                f"SELECT {_COLUMNS} FROM enrollments WHERE {key} = ? AND "  # noqa: S608 - fixed columns
                "state IN ('pending', 'confirmed')", (value,))]
            for e in rows:
                conn.execute("UPDATE enrollments SET state = 'ended', reason = ?, "
                             "updated_ms = ? WHERE id = ?", (reason, now_ms, e.id))
                conn.execute("INSERT OR REPLACE INTO local_revocations VALUES (?,?,?)",
                             (e.cred, now_ms // 1000, e.id))
            return rows
        ended: list[Enrollment] = self._write("end the enrollment", run)
        return ended

    # -- reading -----------------------------------------------------------------------

    def get(self, enrollment_id: str) -> Enrollment | None:
        """One enrollment by id."""
        row = self._db.conn().execute(f"SELECT {_COLUMNS} FROM enrollments WHERE id = ?",  # noqa: S608 - fixed columns
                                      (enrollment_id,)).fetchone()
        return None if row is None else _row(row)

    def active_for(self, cred: bytes) -> Enrollment | None:
        """The pending or confirmed enrollment of a card, if any."""
        row = self._db.conn().execute(
            f"SELECT {_COLUMNS} FROM enrollments WHERE cred = ? AND state IN "  # noqa: S608 - fixed columns
            "('pending', 'confirmed') ORDER BY created_ms DESC LIMIT 1", (cred,)).fetchone()
        return None if row is None else _row(row)

    def locally_revoked(self, cred: bytes) -> bool:
        """Whether a move-out revoked this card here."""
        return self._db.conn().execute("SELECT 1 FROM local_revocations WHERE cred = ?",
                                       (cred,)).fetchone() is not None

    def all(self, *, unit: str | None = None, state: TenantState | None = None
            ) -> list[Enrollment]:
        """Enrollments, newest first, optionally of one unit or state."""
        clauses, args = [], []
        if unit is not None:
            clauses.append("unit = ?")
            args.append(unit)
        if state is not None:
            clauses.append("state = ?")
            args.append(state.value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return [_row(r) for r in self._db.conn().execute(
            f"SELECT {_COLUMNS} FROM enrollments {where} ORDER BY created_ms DESC",  # noqa: S608 - fixed columns, values bound
            args)]

    def expire(self, *, now_s: int, now_ms: int) -> list[Enrollment]:
        """Mark enrollments whose lease ended as ended (their grants already stopped at
        ``lease_end``; this makes the record say so). Returns them."""
        def run(conn: sqlite3.Connection) -> list[Enrollment]:
            rows = [_row(r) for r in conn.execute(
                f"SELECT {_COLUMNS} FROM enrollments WHERE state IN ('pending', "  # noqa: S608 - fixed columns
                "'confirmed') AND lease_end <= ?", (now_s,))]
            for e in rows:
                conn.execute("UPDATE enrollments SET state = 'ended', reason = 'lease_end', "
                             "updated_ms = ? WHERE id = ?", (now_ms, e.id))
            return rows
        ended: list[Enrollment] = self._write("end leases", run)
        return ended
