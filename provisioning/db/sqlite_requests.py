"""``central.db``: the requests one-shot commands leave for a running ``serve``
(provisioning/handoff.py).

``SqliteRequests`` is mixed into ``SqliteOfficeDatabase`` (provisioning/db/sqlite.py).
"""

from __future__ import annotations

from provisioning.db.records import PendingRequest, RequestOutcome
from provisioning.db.sqlite_connection import SqliteConnection


class SqliteRequests(SqliteConnection):
    """The request queue (mixed into ``SqliteOfficeDatabase``)."""

    def queue_request(self, op: str, args: str, requested_ms: int) -> int:
        """Queue a request; returns its id."""
        with self._tx() as conn:
            return int(conn.execute(
                "INSERT INTO requests (op, args, requested_ms) VALUES (?,?,?) RETURNING id",
                (op, args, requested_ms)).fetchone()[0])

    def request_outcome(self, request: int) -> RequestOutcome | None:
        """How the request ended, or None while it is open."""
        with self._read() as db:
            done, result, kind, error = db.execute(
                "SELECT done_ms, result, error_kind, error FROM requests WHERE id = ?",
                [request]).fetchone()
        return None if done is None else RequestOutcome(result, kind, error)

    def withdraw_request(self, request: int, now_ms: int) -> bool:
        """Close a request as ``expired`` unless ``serve`` has taken it."""
        with self._tx() as conn:
            return bool(conn.execute(
                "UPDATE requests SET done_ms = ?, error_kind = 'expired' "
                "WHERE id = ? AND taken_ms IS NULL", (now_ms, request)).rowcount)

    def open_requests(self) -> list[PendingRequest]:
        """Requests neither taken nor done, oldest first."""
        with self._read() as db:
            return [PendingRequest(*row) for row in db.execute(
                "SELECT id, op, args, requested_ms FROM requests WHERE done_ms IS NULL "
                "AND taken_ms IS NULL ORDER BY id").fetchall()]

    def take_request(self, request: int, now_ms: int) -> bool:
        """Claim an open request; False when it was withdrawn meanwhile."""
        with self._tx() as conn:
            return bool(conn.execute(
                "UPDATE requests SET taken_ms = ? WHERE id = ? AND taken_ms IS NULL AND "
                "done_ms IS NULL", (now_ms, request)).rowcount)

    def finish_request(self, request: int, now_ms: int, outcome: RequestOutcome) -> None:
        """Record a request's outcome (once)."""
        with self._tx() as conn:
            conn.execute("UPDATE requests SET done_ms = ?, result = ?, error_kind = ?, "
                         "error = ? WHERE id = ? AND done_ms IS NULL",
                         (now_ms, outcome.result, outcome.error_kind, outcome.error, request))

    def reset_requests(self, now_ms: int, keep_ms: int) -> None:
        """Forget old finished requests; close those a stopped ``serve`` had taken."""
        with self._tx() as conn:
            conn.execute("DELETE FROM requests WHERE done_ms IS NOT NULL AND done_ms < ?",
                         (now_ms - keep_ms,))
            # Claimed by a serve that stopped before finishing: whether it was sent is
            # unknown, so it is closed, not redone (the protocol recovers a lost message).
            conn.execute("UPDATE requests SET done_ms = ?, error_kind = 'failure', "
                         "error = 'serve stopped while performing it' "
                         "WHERE taken_ms IS NOT NULL AND done_ms IS NULL", (now_ms,))
