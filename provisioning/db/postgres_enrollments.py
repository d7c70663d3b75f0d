"""The office's PostgreSQL database: the enrollments made at gateways (their tenant
events, the list changes they make, the decisions sent back).

``PostgresEnrollments`` is mixed into ``PostgresOfficeDatabase``
(provisioning/db/postgres.py): acting on a gateway's tenant events, and every list
version or ``enr`` seq allocated here, first takes the gateway's publishing turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

from psycopg.rows import dict_row

from provisioning.db.postgres_connection import Conn, PostgresConnection
from provisioning.db.postgres_gateways import ENTRY_UPSERT, allocate, next_version
from provisioning.db.records import EnrollmentRecord, EntryRecord, ListChange, TenantEvent
from provisioning.db.rows import enrollment_record, enrollment_row, entry_row, event_record

_INSERT_ENROLLMENT = (
    "INSERT INTO enrollments (gateway, id, seq, unit, cred, permit, permit_hash, lease_end, "
    "provisional_until, account, received_ms, status, reason, decided_ms, list_version, "
    "decision_seq, elsewhere, ended_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
    "%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING")


class PostgresEnrollments(PostgresConnection):
    """Tenant events and enrollments (mixed into ``PostgresOfficeDatabase``)."""

    # -- enrollments made at gateways --------------------------------------------------

    def _due_tenant_events(self, conn: Conn, gateway: str, limit: int) -> list[TenantEvent]:
        keys = conn.execute(
            "SELECT t.seq, t.ts_ms FROM gateways g JOIN tenant_event_keys t ON "
            "t.gateway = g.id WHERE g.id = %s AND t.seq > g.tenant_upto AND "
            "t.seq <= g.acked_upto ORDER BY t.seq LIMIT %s", (gateway, limit)).fetchall()
        if not keys:
            return []
        with conn.cursor(row_factory=dict_row) as cur:
            found = {(r["seq"], r["ts_ms"]): r for r in cur.execute(
                "SELECT e.*, EXISTS (SELECT 1 FROM chain_problems p WHERE p.gateway = "
                "e.gateway AND p.seq = e.seq) AS problem FROM events e WHERE "
                "e.gateway = %s AND e.seq = ANY(%s) AND e.ts_ms = ANY(%s)",
                (gateway, [k[0] for k in keys], sorted({k[1] for k in keys})))}
        return [TenantEvent(event_record(r), bool(r["problem"]))
                for key in keys if (r := found.get((key[0], key[1]))) is not None]

    def tenant_events(self, gateway: str, limit: int) -> list[TenantEvent]:
        """Tenant events above ``tenant_upto`` up to ``acked_upto``, with attachments.

        Acting on them is ordered: when some are due, the gateway's turn is taken first
        and they are read again (another instance may have acted on them meanwhile)."""
        with self._read() as conn:
            due = self._due_tenant_events(conn, gateway, limit)
        if due and getattr(self._local, "turns", None) is not None:
            self._turn(gateway)
            with self._read() as conn:
                due = self._due_tenant_events(conn, gateway, limit)
        return due

    @staticmethod
    def _advance(conn: Conn, gateway: str, upto: int) -> None:
        conn.execute("UPDATE gateways SET tenant_upto = greatest(tenant_upto, %s) "
                     "WHERE id = %s", (upto, gateway))

    def advance_tenant_cursor(self, gateway: str, upto: int) -> None:
        """Raise ``tenant_upto`` to ``upto`` (never lower it)."""
        with self._read() as conn:
            self._advance(conn, gateway, upto)

    def revoked(self, gateway: str, kind: str, digest: bytes) -> bool:
        """Whether ``digest`` is revoked (as ``kind``) at ``gateway`` or everywhere."""
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM revocations WHERE gateway IN (%s, '*') AND "
                                "kind = %s AND hash = %s", (gateway, kind, digest)
                                ).fetchone() is not None

    def permit_elsewhere(self, gateway: str, permit_hash: bytes, now_s: int) -> list[str]:
        """Other gateways that list this permit, or hold an open enrollment of it."""
        with self._read() as conn:
            return [r[0] for r in conn.execute(
                "SELECT gateway FROM entries WHERE permit = %s AND gateway != %s AND "
                "(valid_until IS NULL OR valid_until > %s) "
                "UNION SELECT gateway FROM enrollments WHERE permit_hash = %s AND "
                "gateway != %s AND status IN ('received', 'held', 'confirmed') ORDER BY 1",
                (permit_hash, gateway, now_s, permit_hash, gateway))]

    def record_enrollment(self, record: EnrollmentRecord) -> bool:
        """Store a new enrollment and move the cursor to its seq, together."""
        with self._tx() as conn:
            inserted = conn.execute(_INSERT_ENROLLMENT, enrollment_row(record)).rowcount
            self._advance(conn, record.gateway, record.seq)
        return bool(inserted)

    @staticmethod
    def _enrollment_in(conn: Conn, gateway: str, enrollment_id: str, *,
                       lock: bool = False) -> EnrollmentRecord | None:
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT * FROM enrollments WHERE gateway = %s AND id = %s FOR UPDATE" if lock
                else "SELECT * FROM enrollments WHERE gateway = %s AND id = %s",
                (gateway, enrollment_id)).fetchone()
        return enrollment_record(row) if row is not None else None

    def _unlist(self, conn: Conn, record: EnrollmentRecord, now_ms: int) -> ListChange | None:
        """A confirmed enrollment's card out of the list under a new version."""
        if record.status != "confirmed" or record.cred is None:
            return None
        if not conn.execute("DELETE FROM entries WHERE gateway = %s AND cred = %s",
                            (record.gateway, record.cred)).rowcount:
            return None  # removed meanwhile ('remove --card'): nothing to send
        version = next_version(conn, record.gateway, now_ms)
        return ListChange(version.seq, [], [record.cred], [record.id], version.prev)

    def end_enrollment(self, gateway: str, enrollment_id: str, seq: int, reason: str,
                       ended_ms: int) -> ListChange | None:
        """Mark an enrollment ended (its card out of the list) and move the cursor."""
        self._turn(gateway)
        with self._tx() as conn:
            self._advance(conn, gateway, seq)
            record = self._enrollment_in(conn, gateway, enrollment_id, lock=True)
            if record is None or record.status == "ended":
                return None
            change = self._unlist(conn, record, ended_ms)
            conn.execute("UPDATE enrollments SET status = 'ended', reason = %s, "
                         "ended_ms = %s, list_version = coalesce(%s, list_version) "
                         "WHERE gateway = %s AND id = %s",
                         (reason, ended_ms, None if change is None else change.version,
                          gateway, enrollment_id))
        return change

    def enrollment(self, gateway: str, enrollment_id: str) -> EnrollmentRecord | None:
        """One enrollment."""
        with self._read() as conn:
            return self._enrollment_in(conn, gateway, enrollment_id)

    def enrollments(self, gateway: str | None = None, status: str | None = None
                    ) -> list[EnrollmentRecord]:
        """Enrollments of one gateway or all, of one status or all."""
        with self._read() as conn, conn.cursor(row_factory=dict_row) as cur:
            return [enrollment_record(r) for r in cur.execute(
                "SELECT * FROM enrollments WHERE (%s::text IS NULL OR gateway = %s) AND "
                "(%s::text IS NULL OR status = %s) ORDER BY gateway, seq",
                (gateway, gateway, status, status))]

    def hold_enrollments(self, gateway: str, ids: Sequence[str], reason: str) -> None:
        """Received enrollments to ``held``."""
        with self._read() as conn:
            conn.execute("UPDATE enrollments SET status = 'held', reason = %s "
                         "WHERE gateway = %s AND id = ANY(%s) AND status = 'received'",
                         (reason, gateway, list(ids)))

    def confirm_enrollments(self, gateway: str, entries: Mapping[str, EntryRecord],
                            decided_ms: int) -> ListChange | None:
        """Entries in, enrollments confirmed, one new list version; None if none was."""
        self._turn(gateway)
        with self._tx() as conn:
            confirmed = [i for i in entries if conn.execute(
                "UPDATE enrollments SET status = 'confirmed', reason = NULL, "
                "decided_ms = %s, decision_seq = NULL WHERE gateway = %s AND id = %s AND "
                "status IN ('received', 'held')", (decided_ms, gateway, i)).rowcount]
            if not confirmed:
                return None  # nothing written: the version stays unspent
            upsert = [entries[i] for i in confirmed]
            with conn.cursor() as cur:
                cur.executemany(ENTRY_UPSERT, [entry_row(gateway, e) for e in upsert])
            version = next_version(conn, gateway, decided_ms)
            conn.execute("UPDATE enrollments SET list_version = %s WHERE gateway = %s AND "
                         "id = ANY(%s)", (version.seq, gateway, confirmed))
        return ListChange(version.seq, upsert, [], confirmed, version.prev)

    def reject_enrollment(self, gateway: str, enrollment_id: str, reason: str,
                          decided_ms: int) -> tuple[EnrollmentRecord, ListChange | None] | None:
        """Reject an open or confirmed enrollment; its decision becomes due."""
        self._turn(gateway)
        with self._tx() as conn:
            record = self._enrollment_in(conn, gateway, enrollment_id, lock=True)
            if record is None or record.status not in ("received", "held", "confirmed"):
                return None
            change = self._unlist(conn, record, decided_ms)
            conn.execute("UPDATE enrollments SET status = 'rejected', reason = %s, "
                         "decided_ms = %s, decision_seq = NULL, "
                         "list_version = coalesce(%s, list_version) "
                         "WHERE gateway = %s AND id = %s",
                         (reason, decided_ms, None if change is None else change.version,
                          gateway, enrollment_id))
            after = self._enrollment_in(conn, gateway, enrollment_id)
        assert after is not None
        return after, change

    def resend_decision(self, gateway: str, enrollment_id: str) -> bool:
        """Make a confirmed or rejected enrollment's decision due again."""
        with self._read() as conn:
            return bool(conn.execute(
                "UPDATE enrollments SET decision_seq = NULL WHERE gateway = %s AND id = %s "
                "AND status IN ('confirmed', 'rejected')", (gateway, enrollment_id)).rowcount)

    def allocate_decisions(self, gateway: str, limit: int, now_ms: int
                           ) -> tuple[int, list[EnrollmentRecord]] | None:
        """The next ``enr`` seq and the due decisions it carries (marked sent)."""
        due_sql = ("SELECT * FROM enrollments WHERE gateway = %s AND status IN "
                   "('confirmed', 'rejected') AND decision_seq IS NULL ORDER BY seq LIMIT %s")
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM enrollments WHERE gateway = %s AND status IN "
                            "('confirmed', 'rejected') AND decision_seq IS NULL LIMIT 1",
                            (gateway,)).fetchone() is None:
                return None  # the usual answer, without a turn or a transaction
        self._turn(gateway)
        with self._tx() as conn:
            with conn.cursor(row_factory=dict_row) as cur:
                rows = [enrollment_record(r) for r in cur.execute(
                    cast(Any, due_sql + " FOR UPDATE"), (gateway, limit))]
            if not rows:
                return None
            seq = allocate(conn, gateway, "enr_seq", now_ms).seq
            conn.execute("UPDATE enrollments SET decision_seq = %s WHERE gateway = %s AND "
                         "id = ANY(%s)", (seq, gateway, [r.id for r in rows]))
        return seq, [dataclasses.replace(r, decision_seq=seq) for r in rows]

    def enrollment_counts(self, gateway: str) -> dict[str, int]:
        """How many of the gateway's enrollments are in each status (those with any)."""
        with self._read() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(
                "SELECT status, count(*) FROM enrollments WHERE gateway = %s "
                "GROUP BY status ORDER BY status", (gateway,))}
