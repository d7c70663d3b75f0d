"""The office's PostgreSQL database: events and their chains.

``PostgresEvents`` is mixed into ``PostgresOfficeDatabase`` (provisioning/db/postgres.py,
whose docstring tells how a batch is stored): ``events`` partitioned by day of their own
time and written by COPY (binary), each seq stored once under the gateway's row lock,
the row knowing which seqs are stored (``_Known``) so that a batch that continues the
chain looks nothing up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from provisioning.db.postgres_connection import LOCK_NS, PARTITION_KEY, Conn, PostgresConnection
from provisioning.db.postgres_schema import END_DAY_MS, FIRST_DAY_MS
from provisioning.db.records import (
    TENANT_KINDS,
    Arrival,
    ChainCheck,
    ChainProblem,
    ChainProblemFound,
    EventRecord,
    StoredBatch,
    StoredEvent,
)
from provisioning.db.rows import EVENT_COLUMNS, event_row, returned, stored_event

DAY_MS = 86_400_000
_EVENT_TYPES = ("text", "int8", "text", "int8", "text", "text", "text", "text", "text",
                "text", "text", "text", "text", "int8", "text")


def _day(ts_ms: int) -> int | None:
    """The UTC day (days since 1970) of a time, or None outside the day partitions."""
    if ts_ms < FIRST_DAY_MS or ts_ms >= END_DAY_MS:
        return None
    return ts_ms // DAY_MS


def _partition(ts_ms: int) -> str:
    """The partition of ``events`` that holds an event of this time."""
    day = _day(ts_ms)
    if day is not None:
        return f"events_{day:06d}"
    return "events_before" if ts_ms < FIRST_DAY_MS else "events_after"


def _declared(data: str) -> tuple[int, int] | None:
    """``(first_seq, last_seq)`` of an ``events_dropped`` event's data, if it names both
    as numbers."""
    try:
        value = json.loads(data)
        first, last = value.get("first_seq"), value.get("last_seq")
        if first is None or last is None:
            return None
        return int(first), int(last)
    except (ValueError, TypeError, AttributeError):
        return None


# -- what a gateway row knows about the stored seqs --------------------------------------


@dataclass(slots=True)
class _Known:
    """The stored seqs of one gateway, as its row records them (see the docstring of
    provisioning/db/postgres.py): every seq up to ``upto`` may be stored; above it,
    exactly the ``runs``."""

    upto: int
    runs: list[tuple[int, int]]
    gaps: list[tuple[int, int, int]]
    """``(first_seq, last_seq, seq)`` of each ``events_dropped`` stored above ``upto``."""
    head_hash: str | None
    head_ts: int | None
    count: int
    highest: int | None

    @classmethod
    def of(cls, row: Sequence[Any]) -> _Known:
        upto, above, gaps, head_hash, head_ts, count, highest = row
        return cls(int(upto), [(above[i], above[i + 1]) for i in range(0, len(above), 2)],
                   [(gaps[i], gaps[i + 1], gaps[i + 2]) for i in range(0, len(gaps), 3)],
                   head_hash, head_ts, int(count), highest)

    def may_be_stored(self, seq: int) -> bool:
        if seq < 1 or self.count == 0:
            return False
        return seq <= self.upto or any(a <= seq <= b for a, b in self.runs)

    def surely_stored(self, seq: int) -> bool:
        return seq > self.upto and any(a <= seq <= b for a, b in self.runs)

    def advance(self, new_seqs: Sequence[int], hashes: Mapping[int, tuple[str, int]]) -> None:
        """Take in newly stored seqs and move ``upto`` over the contiguous ones and the
        declared gaps, as ``SqliteOfficeDatabase.store_events`` walks the stored rows."""
        runs = sorted([*self.runs, *((s, s) for s in set(new_seqs) if s > self.upto)])
        merged: list[tuple[int, int]] = []
        for a, b in runs:
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        upto = self.upto
        while merged:
            a, b = merged[0]
            if a != upto + 1 and not any(f <= upto + 1 and la >= a - 1
                                         for f, la, _ in self.gaps):
                break
            upto = b
            merged.pop(0)
        if upto != self.upto:
            head = hashes.get(upto)
            self.head_hash, self.head_ts = (None, None) if head is None else head
        self.upto = upto
        self.runs = merged
        self.gaps = [g for g in self.gaps if g[2] > upto]

    def columns(self) -> tuple[Any, ...]:
        return (self.upto, [s for run in self.runs for s in run],
                [s for gap in self.gaps for s in gap], self.head_hash, self.head_ts,
                self.count, self.highest)


class PostgresEvents(PostgresConnection):
    """Events, their chain problems and ``acked_upto`` (mixed into
    ``PostgresOfficeDatabase``)."""

    # -- receiving ---------------------------------------------------------------------

    def _ensure_partitions(self, days: set[int]) -> None:
        """The day partitions of ``days``, made now where missing (each in a short
        transaction of its own, under an advisory lock, before the batch's)."""
        missing = days - self._days
        if not missing:
            return
        with self._read() as conn:
            for day in sorted(missing):
                name = _partition(day * DAY_MS)
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                                 (LOCK_NS, PARTITION_KEY))
                    if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,):
                        # LIKE + ATTACH: attaching locks the parent only against other
                        # DDL, where CREATE … PARTITION OF would stop every insert.
                        conn.execute(sql.SQL(
                            "CREATE TABLE {} (LIKE events INCLUDING DEFAULTS "
                            "INCLUDING CONSTRAINTS)").format(sql.Identifier(name)))
                        conn.execute(sql.SQL(
                            "ALTER TABLE events ATTACH PARTITION {} FOR VALUES FROM ({}) "
                            "TO ({})").format(sql.Identifier(name), sql.Literal(day * DAY_MS),
                                              sql.Literal((day + 1) * DAY_MS)))
                self._days.add(day)

    @staticmethod
    def _lookup(conn: Conn, gateway: str, seqs: set[int], days: set[int]
                ) -> dict[int, tuple[str, str, int]]:
        """``seq -> (hash, prev_hash, ts_ms)`` of the stored ``seqs``: first in the
        partitions of ``days``, then the rest in all of them."""
        found: dict[int, tuple[str, str, int]] = {}
        wanted = sorted(seqs)
        if days:
            lo, hi = min(days) * DAY_MS, (max(days) + 1) * DAY_MS
            for seq, hash_, prev, ts in conn.execute(
                    "SELECT seq, hash, prev_hash, ts_ms FROM events WHERE gateway = %s AND "
                    "seq = ANY(%s) AND ts_ms >= %s AND ts_ms < %s",
                    (gateway, wanted, lo, hi)):
                found[seq] = (hash_, prev, ts)
        rest = [s for s in wanted if s not in found]
        if rest:
            for seq, hash_, prev, ts in conn.execute(
                    "SELECT seq, hash, prev_hash, ts_ms FROM events WHERE gateway = %s AND "
                    "seq = ANY(%s)", (gateway, rest)):
                found[seq] = (hash_, prev, ts)
        return found

    def store_events(self, gateway: str, events: Sequence[EventRecord], received_ms: int,
                     check: ChainCheck) -> StoredBatch:
        """Store a batch once per seq, record its chain problems, advance ``acked_upto``."""
        self._ensure_partitions({d for ev in events if (d := _day(ev.ts_ms)) is not None})
        problems: list[ChainProblemFound] = []
        with self._batch_tx() as conn:
            with conn.pipeline():
                conn.execute("BEGIN")
                known = _Known.of(returned(conn.execute(
                    "SELECT acked_upto, stored_above, declared_gaps, head_hash, head_ts_ms, "
                    "event_count, highest_seq FROM gateways WHERE id = %s FOR UPDATE",
                    (gateway,)).fetchone(), gateway))
            batch_seqs = {ev.seq for ev in events}
            wanted = {s for ev in events for s in (ev.seq - 1, ev.seq, ev.seq + 1)
                      if known.may_be_stored(s)}
            head_only = (known.head_hash is not None and known.upto in wanted
                         and known.upto not in batch_seqs and known.upto - 1 not in batch_seqs)
            if head_only:
                wanted.discard(known.upto)
            days = {d for ev in events if (d := _day(ev.ts_ms)) is not None}
            if known.head_ts is not None and (d := _day(known.head_ts)) is not None:
                days.add(d)
            rows = self._lookup(conn, gateway, wanted, days) if wanted else {}
            # The link of the batch's first event to the one before it comes from the row
            # when that one is the event at acked_upto.
            before_of = {known.upto: known.head_hash} if head_only else {}
            new: list[EventRecord] = []
            for index, ev in enumerate(events):
                stored = rows.get(ev.seq)
                if stored is not None:
                    problems.extend(check(Arrival(index, False, stored[0], None, None)))
                    continue
                new.append(ev)
                rows[ev.seq] = (ev.hash, ev.prev_hash, ev.ts_ms)
                before = rows.get(ev.seq - 1)
                after = rows.get(ev.seq + 1)
                problems.extend(check(Arrival(
                    index, True, None,
                    before[0] if before is not None else before_of.get(ev.seq - 1),
                    None if after is None else after[1])))
            self._copy(conn, gateway, new, received_ms)
            for ev in new:
                if ev.kind == "events_dropped" and ev.seq > known.upto:
                    declared = _declared(ev.data)
                    if declared is not None:
                        known.gaps.append((*declared, ev.seq))
            known.count += len(new)
            if new:
                top = max(ev.seq for ev in new)
                known.highest = top if known.highest is None else max(known.highest, top)
            known.advance([ev.seq for ev in new], {s: (r[0], r[2]) for s, r in rows.items()})
            tenant = [(gateway, ev.seq, ev.ts_ms) for ev in new if ev.kind in TENANT_KINDS]
            with conn.pipeline(), conn.cursor() as cur:
                if problems:
                    cur.executemany("INSERT INTO chain_problems VALUES (%s, %s, %s, %s) "
                                    "ON CONFLICT DO NOTHING",
                                    [(gateway, s, p, received_ms) for s, p in problems])
                if tenant:
                    cur.executemany("INSERT INTO tenant_event_keys VALUES (%s, %s, %s)",
                                    tenant)
                cur.execute("UPDATE gateways SET (acked_upto, stored_above, declared_gaps, "
                            "head_hash, head_ts_ms, event_count, highest_seq) = "
                            "(%s, %s, %s, %s, %s, %s, %s) WHERE id = %s",
                            (*known.columns(), gateway))
                cur.execute("COMMIT")
        return StoredBatch(len(new), known.upto, tuple(problems))

    @staticmethod
    def _copy(conn: Conn, gateway: str, new: Sequence[EventRecord], received_ms: int) -> None:
        """COPY (binary) the new events straight into their day partitions (the parent
        would route each row, which costs more than the copy itself for a batch)."""
        by_partition: dict[str, list[EventRecord]] = {}
        for ev in new:
            by_partition.setdefault(_partition(ev.ts_ms), []).append(ev)
        for name, rows in by_partition.items():
            statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, EVENT_COLUMNS)))
            with conn.cursor() as cur, cur.copy(statement) as copy:
                copy.set_types(_EVENT_TYPES)
                for ev in rows:
                    copy.write_row(event_row(gateway, ev, received_ms))

    @staticmethod
    def _forget_events(conn: Conn, gateway: str, end: int, deleted: int) -> None:
        """After retention deleted the gateway's events up to ``end`` (never past
        ``acked_upto``): its count, its highest seq once none is left, and the event at
        ``acked_upto`` if it was one of them (a batch then finds no stored neighbour
        there, as in ``central.db``). Its tenant events there were acted on already."""
        conn.execute("UPDATE gateways SET event_count = event_count - %s, "
                     "highest_seq = CASE WHEN event_count - %s > 0 THEN highest_seq END, "
                     "head_hash = CASE WHEN acked_upto > %s THEN head_hash END, "
                     "head_ts_ms = CASE WHEN acked_upto > %s THEN head_ts_ms END "
                     "WHERE id = %s", (deleted, deleted, end, end, gateway))
        conn.execute("DELETE FROM tenant_event_keys WHERE gateway = %s AND seq <= %s",
                     (gateway, end))

    # -- reports -----------------------------------------------------------------------

    def chain_problems(self, gateway: str) -> list[ChainProblem]:
        """The chain problems found in the gateway's events, by seq and problem."""
        with self._read() as conn:
            return [ChainProblem(*r) for r in conn.execute(
                "SELECT seq, problem, found_ms FROM chain_problems WHERE gateway = %s "
                "ORDER BY seq, problem", (gateway,))]

    def events(self, gateway: str, *, after_seq: int, limit: int | None) -> list[StoredEvent]:
        """Stored events above ``after_seq`` in seq order (the newest ``limit``)."""
        with self._read() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = list(cur.execute(
                "SELECT * FROM events WHERE gateway = %s AND seq > %s ORDER BY seq DESC "
                "LIMIT %s", (gateway, after_seq, limit)))
        rows.reverse()
        return [stored_event(r) for r in rows]
