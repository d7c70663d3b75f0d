"""Receiving: what gateways send the office, checked, stored and answered.

A message is accepted only from a registered gateway, not removed, on a well-formed topic
(``protocol.topics.parse_outbound``), up to ``MAX_GATEWAY_PAYLOAD``, valid against its
model (``protocol.messages.GATEWAY_MESSAGES``) and naming the topic's gateway; anything
else is counted as malformed and logged, and nothing of it is stored. Event batches are
stored once per seq with their chain checked (``protocol.chain``) and acknowledged only
after the commit; ``applied`` reports and statuses are kept per gateway; resync requests
are answered with a snapshot, at most one per gateway per ``RESYNC_INTERVAL_S`` (those
for ``behind_command`` with the latest commands sent again instead). The versions a status
or a resync request reports raise the office's stream counters where they are higher
(``OfficeDatabase.raise_counters``).

After a batch is stored, its tenant events (enrollments made at the gateway, move-outs,
lease ends) are acted on (``provisioning.tenants``) before the ack is published, but the
ack does not wait on them: it goes out whether they succeed or not, because they are
acted on from the stored events (with their attachments), at the next batch or the next
start of ``serve`` if not now.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from protocol import ids
from protocol.chain import GENESIS, contents_match
from protocol.messages import (
    BEHIND_COMMAND,
    GATEWAY_MESSAGES,
    Applied,
    EventBatch,
    GatewayBody,
    Rekey,
    ResyncRequest,
    Status,
    WireEvent,
)
from protocol.topics import parse_outbound
from provisioning.db import (
    AppliedRecord,
    Arrival,
    ChainProblemFound,
    EventRecord,
    OfficeDatabase,
)
from provisioning.errors import CentralError, CentralUsageError
from provisioning.publish import CHUNK_ENTRIES, Publisher
from provisioning.rotation import KEYS_SEQ_KEY
from provisioning.site_rotation import SiteKeyRotation
from provisioning.tenants import Tenants

log = structlog.get_logger()

RESYNC_INTERVAL_S = 10.0
"""At most one snapshot per gateway per 10 s in answer to resync requests: a gateway in a
request loop cannot make the office flood the broker with whole lists."""
MAX_GATEWAY_PAYLOAD = 8 * 1024 * 1024
"""Gateway messages larger than this are refused unread (an event batch is far smaller)."""
REMOVED_KEY = "gateway_removed:{gateway}"
"""The office setting (``OfficeDatabase.meta``) that marks a gateway removed
(``permitgate-central remove-gateway``): its messages are refused as an unknown gateway's
are, and counted with them."""


def removed_record(db: OfficeDatabase, gateway: str) -> dict[str, str] | None:
    """When and why ``gateway`` was removed, or None when it was not."""
    value = db.meta(REMOVED_KEY.format(gateway=gateway))
    if value is None:
        return None
    record = json.loads(value)
    return record if isinstance(record, dict) else {"reason": str(record)}


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What storing one event batch did."""

    received: int
    new: int
    acked_upto: int
    problems: tuple[str, ...]


def chain_problems(ev: WireEvent, arrival: Arrival,
                   anchor: tuple[int, str] | None = None) -> list[ChainProblemFound]:
    """The chain problems storing ``ev`` reveals: a seq received again with different
    contents; contents that do not match their hash; a first event that does not start
    the chain; a link that does not match a stored neighbour (each link is judged when
    the second of its two events arrives) or, with nothing stored before it, the chain
    ``anchor`` ``(seq, hash)`` its batch carries (the gateway pruned its predecessor)."""
    if not arrival.new:
        stored = arrival.stored_hash or ""
        if stored != ev.hash:
            return [(ev.seq, "received again with different contents "
                             f"(hash {ev.hash[:16]}…, stored {stored[:16]}…)")]
        return []
    problems: list[ChainProblemFound] = []
    if not contents_match(ev):
        problems.append((ev.seq, "contents do not match the event's hash"))
    if ev.seq == 1 and ev.prev_hash != GENESIS:
        problems.append((1, "the first event does not start the chain"))
    if arrival.before_hash is not None and arrival.before_hash != ev.prev_hash:
        problems.append((ev.seq, f"prev_hash does not match the hash of seq {ev.seq - 1}"))
    elif (arrival.before_hash is None and anchor is not None and anchor[0] == ev.seq - 1
          and anchor[1] != ev.prev_hash):
        problems.append((ev.seq, f"prev_hash does not match the chain anchor (seq "
                                 f"{anchor[0]}) the gateway sent"))
    if arrival.after_prev_hash is not None and arrival.after_prev_hash != ev.hash:
        problems.append((ev.seq + 1, f"prev_hash does not match the hash of seq {ev.seq}"))
    return problems


def _record(ev: WireEvent) -> EventRecord:
    data = json.dumps(ev.data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return EventRecord(ev.seq, ev.event_id, ev.ts_ms, ev.kind, ev.door, ev.reader,
                       ev.direction, ev.reason, ev.cred, data, ev.prev_hash, ev.hash,
                       ev.attachment)


class Receiver:
    """Handles gateway messages (on the serve worker, one at a time, in arrival order)."""

    def __init__(self, db: OfficeDatabase, publisher: Publisher, *,
                 clock: Callable[[], float],
                 resync_interval_s: float = RESYNC_INTERVAL_S,
                 tenants: Tenants | None = None,
                 site_keys: SiteKeyRotation | None = None) -> None:
        self._db = db
        self._site_keys = site_keys
        self._publisher = publisher
        self._tenants = tenants
        self._clock = clock
        self.resync_interval_s = resync_interval_s
        self._resync_due: dict[str, float] = {}
        self._commands_resent: dict[str, float] = {}
        self._keys_resent: dict[str, float] = {}
        self.malformed = 0
        """Malformed or unexpected gateway messages seen by this process."""

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def handle(self, topic: str, payload: bytes) -> None:
        """Check, store and answer one gateway message."""
        parsed = self.parse(topic, payload)
        if parsed is None:
            return
        gateway, body = parsed
        match body:
            case EventBatch():
                self._on_events(gateway, body)
            case Applied():
                self._on_applied(gateway, body)
            case Status():
                self._on_status(gateway, body)
            case ResyncRequest():
                self._on_resync(gateway, body)
            case Rekey():
                if self._site_keys is not None:
                    self._site_keys.on_rekey(gateway, body)

    def _malformed(self, gateway: str | None, kind: str, reason: str) -> None:
        self.malformed += 1
        log.warning("gateway_message_malformed", gateway=gateway, kind=kind, reason=reason)
        if gateway is not None:
            self._db.count_malformed(gateway)

    def parse(self, topic: str, payload: bytes) -> tuple[str, GatewayBody] | None:
        """The gateway and validated body of a message, or None (counted, logged)."""
        parsed = parse_outbound(topic)
        if parsed is None:
            self._malformed(None, "?", f"unexpected topic {topic[:200]!r}")
            return None
        gateway, kind = parsed
        known = bool(ids.IDENT_RE.match(gateway)) and self._db.gateway(gateway) is not None
        if not known:
            self._malformed(None, kind, f"message from unknown gateway {gateway[:64]!r}")
            self._db.count_unknown_gateway_message()
            return None
        if self._db.meta(REMOVED_KEY.format(gateway=gateway)) is not None:
            self._malformed(None, kind, f"message from removed gateway {gateway!r}")
            self._db.count_unknown_gateway_message()
            return None
        model = GATEWAY_MESSAGES.get(kind)
        problem = None
        body: GatewayBody | None = None
        if model is None:
            problem = "unknown message kind"
        elif kind == "status" and not payload:
            return None  # a cleared retained status
        elif len(payload) > MAX_GATEWAY_PAYLOAD:
            problem = f"oversized: {len(payload)} bytes"
        else:
            try:
                body = model.model_validate_json(payload)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "<message>"
                problem = f"{where}: {err['msg']}"
        if body is not None and body.gateway != gateway:
            problem = "gateway in the body differs from the topic"
        if problem is not None or body is None:
            self._malformed(gateway, kind, problem or "unreadable")
            return None
        return gateway, body

    def store_events(self, gateway: str, batch: EventBatch) -> StoreResult:
        """Store a batch once (dedupe by seq), check its links, advance ``acked_upto``.

        A seq received again with different contents, a link that does not match its
        neighbour and contents that do not match their hash are each recorded as a chain
        problem; the events are stored as received either way.
        """
        events = batch.events
        anchor = (None if batch.anchor_seq is None or batch.anchor_hash is None
                  else (batch.anchor_seq, batch.anchor_hash))
        stored = self._db.store_events(
            gateway, [_record(ev) for ev in events], self._now_ms(),
            lambda arrival: chain_problems(events[arrival.index], arrival,
                                           anchor if arrival.index == 0 else None))
        for seq, problem in stored.problems:
            log.warning("chain_problem", gateway=gateway, seq=seq, problem=problem)
        return StoreResult(len(events), stored.new, stored.acked_upto,
                           tuple(f"seq {s}: {p}" for s, p in stored.problems))

    def _on_events(self, gateway: str, batch: EventBatch) -> None:
        result = self.store_events(gateway, batch)
        log.info("events_stored", gateway=gateway, received=result.received, new=result.new,
                 acked_upto=result.acked_upto, problems=len(result.problems))
        try:
            self._act_on_tenant_events(gateway)
        finally:
            # The ack goes out only after the commit above (the gateway may then forget
            # the events and their attachments), and whatever acting on them did.
            self._publisher.ack(gateway, result.acked_upto)

    def _act_on_tenant_events(self, gateway: str) -> None:
        if self._tenants is None:
            return
        try:
            self._tenants.process(gateway)
        except (CentralError, CentralUsageError) as exc:
            # The office's own trouble (its database, a missing seal key), not the
            # gateway's: the events stay stored and unacted on until it is mended.
            log.error("tenant_events_not_processed", gateway=gateway, error=str(exc))

    def _on_applied(self, gateway: str, msg: Applied) -> None:
        self._db.record_applied(gateway, AppliedRecord(
            msg.stream, msg.seq, msg.status, msg.reason, msg.list_version, msg.ts_ms,
            self._now_ms()))
        event = "gateway_applied" if msg.status == "applied" else "gateway_refused"
        log.info(event, gateway=gateway, stream=msg.stream, seq=msg.seq, reason=msg.reason,
                 list_version=msg.list_version)

    def _on_status(self, gateway: str, msg: Status) -> None:
        self._db.record_status(gateway, msg.model_dump_json(), msg.versions.get("list"),
                               self._now_ms())
        # What the gateway stored is never above the office's counters, unless the office
        # lost some (restored from a backup): then it continues above (provisioning.db.seqs).
        self._db.raise_counters(gateway, msg.versions, self._now_ms())
        log.info("gateway_status", gateway=gateway, state=msg.state)
        if msg.state == "online":
            self._catch_up_keys(gateway, msg.versions)

    def _catch_up_keys(self, gateway: str, versions: Mapping[str, int]) -> None:
        """A gateway whose status shows it missed the latest ``keys`` announcement or
        ``site_key`` message gets it again (at most once per ``resync_interval_s``)."""
        if self._site_keys is not None:
            self._site_keys.on_status(gateway, versions)
        announced = int(self._db.meta(KEYS_SEQ_KEY) or 0)
        if not announced or versions.get("keys", 0) >= announced:
            return
        now = self._clock()
        if now < self._keys_resent.get(gateway, -math.inf) + self.resync_interval_s:
            return
        self._keys_resent[gateway] = now
        self._publisher.resend_keys(gateway)

    def _on_resync(self, gateway: str, msg: ResyncRequest) -> None:
        self._db.raise_counters(gateway, {"list": msg.list_version, "rev": msg.rev_seq,
                                          "all": msg.all_seq}, self._now_ms())
        if msg.reason == BEHIND_COMMAND:
            self._resend_commands(gateway)
            return
        reason = msg.reason[:200]  # the gateway's words, kept short
        answered = self._db.record_resync_request(gateway, reason, self._now_ms())
        due = 0.0 if answered is None else answered / 1000 + self.resync_interval_s
        if self._clock() >= due:
            self._resync_due.pop(gateway, None)
            self._publisher.snapshot(gateway, CHUNK_ENTRIES, resync=True)
            log.info("resync_answered", gateway=gateway, reason=reason,
                     gateway_list_version=msg.list_version)
        elif gateway not in self._resync_due:
            self._resync_due[gateway] = due
            log.info("resync_deferred", gateway=gateway, reason=reason,
                     due_in_s=round(due - self._clock(), 1))

    def _resend_commands(self, gateway: str) -> None:
        """A gateway below a heartbeat's ``cmd_seq``: its latest commands again (at most
        once per gateway per ``resync_interval_s``; the gateway asks again at the next
        heartbeat that finds it behind), skipping what its last status says it applied."""
        now = self._clock()
        if now < self._commands_resent.get(gateway, -math.inf) + self.resync_interval_s:
            log.info("command_resend_deferred", gateway=gateway)
            return
        self._commands_resent[gateway] = now
        record = self._db.gateway(gateway)
        reported = None
        if record is not None and record.status is not None:
            cmd = json.loads(record.status).get("versions", {}).get("cmd")
            reported = cmd if isinstance(cmd, int) else None
        self._publisher.resend_commands(gateway, reported)

    def answer_due_resyncs(self) -> None:
        """Answer the deferred resync requests whose interval has passed."""
        now = self._clock()
        for gateway, due in list(self._resync_due.items()):
            if now >= due:
                del self._resync_due[gateway]
                self._publisher.snapshot(gateway, CHUNK_ENTRIES, resync=True)
                log.info("resync_answered", gateway=gateway, deferred=True)
