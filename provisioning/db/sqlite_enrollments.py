"""``central.db``: the enrollments made at gateways (their tenant events, the list
changes they make, the decisions sent back).

``SqliteEnrollments`` is mixed into ``SqliteOfficeDatabase`` (provisioning/db/sqlite.py).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Mapping, Sequence

import sqlite_utils

from provisioning.db.records import EnrollmentRecord, EntryRecord, ListChange, TenantEvent
from provisioning.db.rows import enrollment_record, enrollment_row, entry_row, event_record
from provisioning.db.sqlite_connection import SqliteConnection
from provisioning.db.sqlite_gateways import allocate, next_version

_INSERT_ENROLLMENT = (
    "INSERT OR IGNORE INTO enrollments (gateway, id, seq, unit, cred, permit, permit_hash, "
    "lease_end, provisional_until, account, received_ms, status, reason, decided_ms, "
    "list_version, decision_seq, elsewhere, ended_ms) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


class SqliteEnrollments(SqliteConnection):
    """Tenant events and enrollments (mixed into ``SqliteOfficeDatabase``)."""

    # -- enrollments made at gateways --------------------------------------------------

    def tenant_events(self, gateway: str, limit: int) -> list[TenantEvent]:
        """Tenant events above ``tenant_upto`` up to ``acked_upto``, with attachments."""
        # The kinds are spelled out as in the partial index events_tenant, so that SQLite
        # uses it: the cost is that of the tenant events, whatever else was stored.
        with self._read() as db:
            return [TenantEvent(event_record(r), bool(r["problem"])) for r in db.query(
                "SELECT e.*, EXISTS (SELECT 1 FROM chain_problems p WHERE p.gateway = "
                "e.gateway AND p.seq = e.seq) AS problem FROM gateways g JOIN events e "
                "ON e.gateway = g.id WHERE g.id = ? AND e.kind IN ('tenant_enrolled', "
                "'tenant_moved_out', 'tenant_lease_ended') AND e.seq > g.tenant_upto "
                "AND e.seq <= g.acked_upto ORDER BY e.seq LIMIT ?", [gateway, limit])]

    @staticmethod
    def _advance(conn: sqlite3.Connection, gateway: str, upto: int) -> None:
        conn.execute("UPDATE gateways SET tenant_upto = max(tenant_upto, ?) WHERE id = ?",
                     (upto, gateway))

    def advance_tenant_cursor(self, gateway: str, upto: int) -> None:
        """Raise ``tenant_upto`` to ``upto`` (never lower it)."""
        with self._tx() as conn:
            self._advance(conn, gateway, upto)

    def revoked(self, gateway: str, kind: str, digest: bytes) -> bool:
        """Whether ``digest`` is revoked (as ``kind``) at ``gateway`` or everywhere."""
        with self._read() as db:
            return db.execute("SELECT 1 FROM revocations WHERE gateway IN (?, '*') AND "
                              "kind = ? AND hash = ?", [gateway, kind, digest]
                              ).fetchone() is not None

    def permit_elsewhere(self, gateway: str, permit_hash: bytes, now_s: int) -> list[str]:
        """Other gateways that list this permit, or hold an open enrollment of it."""
        with self._read() as db:
            return [r[0] for r in db.execute(
                "SELECT gateway FROM entries WHERE permit = ? AND gateway != ? AND "
                "(valid_until IS NULL OR valid_until > ?) "
                "UNION SELECT gateway FROM enrollments WHERE permit_hash = ? AND "
                "gateway != ? AND status IN ('received', 'held', 'confirmed') ORDER BY 1",
                [permit_hash, gateway, now_s, permit_hash, gateway]).fetchall()]

    def record_enrollment(self, record: EnrollmentRecord) -> bool:
        """Store a new enrollment and move the cursor to its seq, together."""
        with self._tx() as conn:
            inserted = conn.execute(_INSERT_ENROLLMENT, enrollment_row(record)).rowcount
            self._advance(conn, record.gateway, record.seq)
        return bool(inserted)

    @staticmethod
    def _enrollment_in(conn: sqlite3.Connection, gateway: str, enrollment_id: str
                       ) -> EnrollmentRecord | None:
        rows = list(sqlite_utils.Database(conn).query(
            "SELECT * FROM enrollments WHERE gateway = ? AND id = ?", [gateway, enrollment_id]))
        return enrollment_record(rows[0]) if rows else None

    def _unlist(self, conn: sqlite3.Connection, record: EnrollmentRecord, now_ms: int
                ) -> ListChange | None:
        """A confirmed enrollment's card out of the list under a new version."""
        if record.status != "confirmed" or record.cred is None:
            return None
        if not conn.execute("DELETE FROM entries WHERE gateway = ? AND cred = ?",
                            (record.gateway, record.cred)).rowcount:
            return None  # removed meanwhile ('remove --card'): nothing to send
        version = next_version(conn, record.gateway, now_ms)
        return ListChange(version.seq, [], [record.cred], [record.id], version.prev)

    def end_enrollment(self, gateway: str, enrollment_id: str, seq: int, reason: str,
                       ended_ms: int) -> ListChange | None:
        """Mark an enrollment ended (its card out of the list) and move the cursor."""
        with self._tx() as conn:
            self._advance(conn, gateway, seq)
            record = self._enrollment_in(conn, gateway, enrollment_id)
            if record is None or record.status == "ended":
                return None
            change = self._unlist(conn, record, ended_ms)
            conn.execute("UPDATE enrollments SET status = 'ended', reason = ?, ended_ms = ?, "
                         "list_version = coalesce(?, list_version) WHERE gateway = ? AND id = ?",
                         (reason, ended_ms, None if change is None else change.version,
                          gateway, enrollment_id))
        return change

    def enrollment(self, gateway: str, enrollment_id: str) -> EnrollmentRecord | None:
        """One enrollment."""
        with self._read() as db:
            return self._enrollment_in(db.conn, gateway, enrollment_id)

    def enrollments(self, gateway: str | None = None, status: str | None = None
                    ) -> list[EnrollmentRecord]:
        """Enrollments of one gateway or all, of one status or all."""
        with self._read() as db:
            return [enrollment_record(r) for r in db.query(
                "SELECT * FROM enrollments WHERE (? IS NULL OR gateway = ?) AND "
                "(? IS NULL OR status = ?) ORDER BY gateway, seq",
                [gateway, gateway, status, status])]

    def hold_enrollments(self, gateway: str, ids: Sequence[str], reason: str) -> None:
        """Received enrollments to ``held``."""
        with self._tx() as conn:
            conn.executemany("UPDATE enrollments SET status = 'held', reason = ? "
                             "WHERE gateway = ? AND id = ? AND status = 'received'",
                             [(reason, gateway, i) for i in ids])

    def confirm_enrollments(self, gateway: str, entries: Mapping[str, EntryRecord],
                            decided_ms: int) -> ListChange | None:
        """Entries in, enrollments confirmed, one new list version; None if none was."""
        with self._tx() as conn:
            confirmed = [i for i in entries if conn.execute(
                "UPDATE enrollments SET status = 'confirmed', reason = NULL, decided_ms = ?, "
                "decision_seq = NULL WHERE gateway = ? AND id = ? AND "
                "status IN ('received', 'held')", (decided_ms, gateway, i)).rowcount]
            if not confirmed:
                return None  # nothing written: the version stays unspent
            upsert = [entries[i] for i in confirmed]
            conn.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?)",
                             [entry_row(gateway, e) for e in upsert])
            version = next_version(conn, gateway, decided_ms)
            conn.executemany("UPDATE enrollments SET list_version = ? WHERE gateway = ? AND "
                             "id = ?", [(version.seq, gateway, i) for i in confirmed])
        return ListChange(version.seq, upsert, [], confirmed, version.prev)

    def reject_enrollment(self, gateway: str, enrollment_id: str, reason: str,
                          decided_ms: int) -> tuple[EnrollmentRecord, ListChange | None] | None:
        """Reject an open or confirmed enrollment; its decision becomes due."""
        with self._tx() as conn:
            record = self._enrollment_in(conn, gateway, enrollment_id)
            if record is None or record.status not in ("received", "held", "confirmed"):
                return None
            change = self._unlist(conn, record, decided_ms)
            conn.execute("UPDATE enrollments SET status = 'rejected', reason = ?, "
                         "decided_ms = ?, decision_seq = NULL, "
                         "list_version = coalesce(?, list_version) WHERE gateway = ? AND id = ?",
                         (reason, decided_ms, None if change is None else change.version,
                          gateway, enrollment_id))
            after = self._enrollment_in(conn, gateway, enrollment_id)
        assert after is not None
        return after, change

    def resend_decision(self, gateway: str, enrollment_id: str) -> bool:
        """Make a confirmed or rejected enrollment's decision due again."""
        with self._tx() as conn:
            return bool(conn.execute(
                "UPDATE enrollments SET decision_seq = NULL WHERE gateway = ? AND id = ? AND "
                "status IN ('confirmed', 'rejected')", (gateway, enrollment_id)).rowcount)

    def allocate_decisions(self, gateway: str, limit: int, now_ms: int
                           ) -> tuple[int, list[EnrollmentRecord]] | None:
        """The next ``enr`` seq and the due decisions it carries (marked sent)."""
        with self._tx() as conn:
            rows = [enrollment_record(r) for r in sqlite_utils.Database(conn).query(
                "SELECT * FROM enrollments WHERE gateway = ? AND status IN ('confirmed', "
                "'rejected') AND decision_seq IS NULL ORDER BY seq LIMIT ?", [gateway, limit])]
            if not rows:
                return None
            seq = allocate(conn, gateway, "enr_seq", now_ms).seq
            conn.executemany("UPDATE enrollments SET decision_seq = ? WHERE gateway = ? AND "
                             "id = ?", [(seq, gateway, r.id) for r in rows])
        return seq, [dataclasses.replace(r, decision_seq=seq) for r in rows]

    def enrollment_counts(self, gateway: str) -> dict[str, int]:
        """How many of the gateway's enrollments are in each status (those with any)."""
        with self._read() as db:
            return {r["status"]: r["n"] for r in db.query(
                "SELECT status, count(*) AS n FROM enrollments WHERE gateway = ? "
                "GROUP BY status ORDER BY status", [gateway])}
