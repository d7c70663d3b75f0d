"""``central.db``: events and their chains.

``SqliteEvents`` is mixed into ``SqliteOfficeDatabase`` (provisioning/db/sqlite.py): a
batch is stored in one write transaction, each seq once, its chain problems with it,
and ``acked_upto`` advanced over the contiguous seqs stored and the gaps a gateway
declared (``events_dropped``).
"""

from __future__ import annotations

from collections.abc import Sequence

from provisioning.db.records import (
    Arrival,
    ChainCheck,
    ChainProblem,
    ChainProblemFound,
    EventRecord,
    StoredBatch,
    StoredEvent,
)
from provisioning.db.rows import event_row, returned, stored_event
from provisioning.db.sqlite_connection import SqliteConnection

_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (gateway, seq, event_id, ts_ms, kind, door, reader, "
    "direction, reason, cred, data, prev_hash, hash, received_ms, attachment) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


class SqliteEvents(SqliteConnection):
    """Events, their chain problems and ``acked_upto`` (mixed into
    ``SqliteOfficeDatabase``)."""

    # -- receiving ---------------------------------------------------------------------

    def store_events(self, gateway: str, events: Sequence[EventRecord], received_ms: int,
                     check: ChainCheck) -> StoredBatch:
        """Store a batch once per seq, record its chain problems, advance ``acked_upto``."""
        problems: list[ChainProblemFound] = []
        new = 0
        with self._tx() as conn:
            for index, ev in enumerate(events):
                inserted = conn.execute(_INSERT_EVENT,
                                        event_row(gateway, ev, received_ms)).rowcount
                if not inserted:
                    stored = conn.execute("SELECT hash FROM events WHERE gateway = ? AND "
                                          "seq = ?", (gateway, ev.seq)).fetchone()[0]
                    problems.extend(check(Arrival(index, False, stored, None, None)))
                    continue
                new += 1
                before = conn.execute("SELECT hash FROM events WHERE gateway = ? AND seq = ?",
                                      (gateway, ev.seq - 1)).fetchone()
                after = conn.execute("SELECT prev_hash FROM events WHERE gateway = ? AND "
                                     "seq = ?", (gateway, ev.seq + 1)).fetchone()
                problems.extend(check(Arrival(
                    index, True, None, None if before is None else before[0],
                    None if after is None else after[0])))
            conn.executemany("INSERT OR IGNORE INTO chain_problems VALUES (?,?,?,?)",
                             [(gateway, s, p, received_ms) for s, p in problems])
            upto = returned(conn.execute("SELECT acked_upto FROM gateways WHERE id = ?",
                                          (gateway,)).fetchone(), gateway)[0]
            # A gap the gateway declared (``events_dropped``: its outbox passed its cap and
            # the oldest undelivered events were dropped) is acknowledged across, or the
            # gateway could never deliver anything after it.
            dropped = [(int(f), int(la)) for f, la in conn.execute(
                "SELECT json_extract(data, '$.first_seq'), json_extract(data, '$.last_seq') "
                "FROM events WHERE gateway = ? AND seq > ? AND kind = 'events_dropped'",
                (gateway, upto)) if f is not None and la is not None]
            for (seq,) in conn.execute("SELECT seq FROM events WHERE gateway = ? AND seq > ? "
                                       "ORDER BY seq", (gateway, upto)):
                if seq != upto + 1 and not any(f <= upto + 1 and la >= seq - 1
                                                for f, la in dropped):
                    break
                upto = seq
            conn.execute("UPDATE gateways SET acked_upto = ? WHERE id = ?", (upto, gateway))
        return StoredBatch(new, int(upto), tuple(problems))

    # -- reports -----------------------------------------------------------------------

    def chain_problems(self, gateway: str) -> list[ChainProblem]:
        """The chain problems found in the gateway's events, by seq and problem."""
        with self._read() as db:
            return [ChainProblem(r["seq"], r["problem"], r["found_ms"])
                    for r in db.query("SELECT * FROM chain_problems WHERE gateway = ? "
                                      "ORDER BY seq, problem", [gateway])]

    def events(self, gateway: str, *, after_seq: int, limit: int | None) -> list[StoredEvent]:
        """Stored events above ``after_seq`` in seq order (the newest ``limit``)."""
        with self._read() as db:
            rows = list(db.query(
                "SELECT * FROM events WHERE gateway = ? AND seq > ? ORDER BY seq DESC "
                "LIMIT ?", [gateway, after_seq, -1 if limit is None else limit]))
        rows.reverse()
        return [stored_event(r) for r in rows]
