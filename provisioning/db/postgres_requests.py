"""The office's PostgreSQL database: the requests one-shot commands leave for a running
``serve`` (provisioning/handoff.py).

``PostgresRequests`` is mixed into ``PostgresOfficeDatabase``
(provisioning/db/postgres.py). A request is taken by one instance (``UPDATE … WHERE
taken_ms IS NULL``), which records its serve lock's server pid; one taken by a ``serve``
whose server session has ended is closed as failed by whoever looks at it next.
"""

from __future__ import annotations

from provisioning.db.postgres_connection import PostgresConnection
from provisioning.db.records import PendingRequest, RequestOutcome
from provisioning.errors import CentralError


class PostgresRequests(PostgresConnection):
    """The request queue (mixed into ``PostgresOfficeDatabase``)."""

    def queue_request(self, op: str, args: str, requested_ms: int) -> int:
        """Queue a request; returns its id."""
        with self._read() as conn:
            row = conn.execute("INSERT INTO requests (op, args, requested_ms) VALUES "
                               "(%s, %s, %s) RETURNING id", (op, args, requested_ms)
                               ).fetchone()
        assert row is not None
        return int(row[0])

    def request_outcome(self, request: int) -> RequestOutcome | None:
        """How the request ended, or None while it is open. One taken by a ``serve``
        whose server session has ended is closed now as failed (whether it was sent is
        unknown, as when a stopped serve is found at the next start)."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT done_ms, result, error_kind, error, taken_ms IS NOT NULL AND "
                "(taken_by IS NULL OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
                "WHERE a.pid = requests.taken_by)) FROM requests WHERE id = %s",
                (request,)).fetchone()
            if row is None:
                raise CentralError(f"{self.where}: request {request} is not in the queue")
            done, result, kind, error, orphaned = row
            if done is None and orphaned:
                conn.execute("UPDATE requests SET done_ms = (extract(epoch FROM now()) * "
                             "1000)::bigint, error_kind = 'failure', error = 'serve stopped "
                             "while performing it' WHERE id = %s AND done_ms IS NULL",
                             (request,))
                return self.request_outcome(request)
        return None if done is None else RequestOutcome(result, kind, error)

    def withdraw_request(self, request: int, now_ms: int) -> bool:
        """Close a request as ``expired`` unless ``serve`` has taken it."""
        with self._read() as conn:
            return bool(conn.execute(
                "UPDATE requests SET done_ms = %s, error_kind = 'expired' "
                "WHERE id = %s AND taken_ms IS NULL", (now_ms, request)).rowcount)

    def open_requests(self) -> list[PendingRequest]:
        """Requests neither taken nor done, oldest first."""
        with self._read() as conn:
            return [PendingRequest(*row) for row in conn.execute(
                "SELECT id, op, args, requested_ms FROM requests WHERE done_ms IS NULL "
                "AND taken_ms IS NULL ORDER BY id")]

    def take_request(self, request: int, now_ms: int) -> bool:
        """Claim an open request; False when it was withdrawn (or taken by another
        instance) meanwhile."""
        with self._read() as conn:
            return bool(conn.execute(
                "UPDATE requests SET taken_ms = %s, taken_by = coalesce(%s, "
                "pg_backend_pid()) WHERE id = %s AND taken_ms IS NULL AND done_ms IS NULL",
                (now_ms, self.taker_pid, request)).rowcount)

    def finish_request(self, request: int, now_ms: int, outcome: RequestOutcome) -> None:
        """Record a request's outcome (once)."""
        with self._read() as conn:
            conn.execute("UPDATE requests SET done_ms = %s, result = %s, error_kind = %s, "
                         "error = %s WHERE id = %s AND done_ms IS NULL",
                         (now_ms, outcome.result, outcome.error_kind, outcome.error, request))

    def reset_requests(self, now_ms: int, keep_ms: int) -> None:
        """Forget old finished requests; close those a stopped ``serve`` had taken (not
        those another running instance is performing)."""
        with self._tx() as conn:
            conn.execute("DELETE FROM requests WHERE done_ms IS NOT NULL AND done_ms < %s",
                         (now_ms - keep_ms,))
            conn.execute("UPDATE requests SET done_ms = %s, error_kind = 'failure', "
                         "error = 'serve stopped while performing it' "
                         "WHERE taken_ms IS NOT NULL AND done_ms IS NULL AND "
                         "(taken_by IS NULL OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
                         "WHERE a.pid = requests.taken_by))", (now_ms,))
