"""Publishing: what the office sends a gateway, built, numbered and signed.

Every operation is a typed value (``PublishSnapshot``, ``PublishDelta``, ``Revoke``,
``SendCommand``, ``SendHeartbeat``, ``HeartbeatAll``) that ``Publisher.perform`` runs:
it allocates the sequence number (or list version) in the database, which commits it
before the message carrying it is handed to the broker, so a number is never used twice,
even across a crash; a message lost on the way is recovered by the protocol (a gateway
that sees a gap, or a heartbeat ahead of it, asks for a snapshot, or for the latest
commands: ``resend_commands``), not by paho's
in-memory queue, which a restart loses. Event acks are built here too (``Publisher.ack``)
for the receiving side, and the deltas and decisions of enrollments made at gateways
(``Publisher.send_delta``, ``Publisher.decisions``) for ``provisioning.tenants``, which
allocates their numbers itself.

``Publisher`` hands each finished message to a ``send(topic, payload)`` it is given; who
sends (the serve worker, a one-shot connection) is decided by ``provisioning.central``.
Operations must stay plain values: a one-shot command hands them to a running ``serve``
through the database (``provisioning.handoff``).

Snapshot chunks are paced (``Pacer``): each gateway is sent its chunks at most as fast as
a gateway applies them (``DEFAULT_CHUNK_RATE`` bytes a second, ``--chunk-rate``; 0:
unpaced). Sent faster, they only wait in the gateway's inbox while its network thread
takes them in and its card path waits for the CPU (docs/performance.md). The manifest and
the chunks within the allowance (``PACING_BURST_S``: a building's whole list) go out at
once from the caller's thread, as unpaced; the rest is handed to the broker client by
the pacer's thread. Nothing else waits for them: revocations, commands, acks, decisions
and key announcements, and every message to other gateways, go out at once. Only what
must reach the gateway after the chunks waits behind them in that gateway's lane: the
rest of its ``list`` stream (deltas) and its heartbeats (which vouch for the list version
being sent: arriving first, they would make the gateway ask for a snapshot again; the
gateway's own inbox keeps them behind list messages for the same reason, agent/inbox.py).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, assert_never, cast, get_args

import structlog

from protocol.messages import (
    AnnouncedKey,
    Chunk,
    Command,
    Decided,
    Delta,
    EnrollmentDecision,
    EventAck,
    Heartbeat,
    KeyAnnouncement,
    Revocation,
    Revoked,
    Snapshot,
    chunk_digest,
)
from protocol.signing import b64, unb64
from protocol.topics import Topics
from provisioning.db import EntryRecord, OfficeDatabase
from provisioning.db.seqs import next_seq
from provisioning.enrollment import known_gateway, wire_entry, wire_revoked
from provisioning.errors import CentralUsageError
from provisioning.keys import OfficeKeys
from provisioning.rotation import KEYS_SEQ_KEY, announced_set, check_retire, retire

log = structlog.get_logger()

DEFAULT_TTL_S = 86_400
"""Snapshots, deltas, revocations, commands and acks expire after a day: long enough for
a gateway that was offline overnight, short enough that an old message cannot be
replayed weeks later."""
DEFAULT_HEARTBEAT_TTL_S = 3_600
"""A heartbeat says 'your lists are current'; an hour bounds how long a gateway cut off
from the office keeps believing it."""
MAX_CHUNK_ENTRIES = 10_000
"""The most entries (and revocations) one chunk may be given (``--chunk-entries``)."""
CHUNK_ENTRIES = 1_000
"""Entries per chunk by default: a gateway stages a chunk in one short step (about 20 ms
on the reference hardware) and applies the revocations waiting between steps, so a
revocation is not held up behind a long chunk (bench/revocation.py). A million entries
are 1,000 chunks, a tenth of ``protocol.messages.MAX_CHUNKS``."""
REVOCATION_ITEMS = 1_000
"""Items per revocation message when the office revokes many at once (``Central.revoke``
splits larger sets): a gateway parses one in about a millisecond, where a message of
``MAX_ITEMS`` holds its interpreter lock for 100 ms and more (docs/performance.md)."""

DEFAULT_CHUNK_RATE = 4_000_000
"""Bytes of snapshot chunks a second sent to one gateway (``--chunk-rate``; 0: unpaced),
matched to what a Pi-class gateway applies. Derived: the build machine applies a
1,000,000-entry list in about 11 s (bench/decision.py ``apply_s`` 10.9 s), about 100,000
entries a second, and a million entries are 127 MB of chunks (127 bytes an entry, in
chunks of ``CHUNK_ENTRIES``): about 12.7 MB/s there. A Raspberry Pi 4's cores are taken
to be about a third as fast for this work (an assumption: not measured on one), which
gives about 4.2 MB/s, rounded down to 4 MB/s: about 31,000 entries a second, a
million-entry list sent in about 32 s, a building's few thousand entries at once
(``PACING_BURST_S``). Counted in bytes, not chunks, because a gateway's work (taking a
message in, parsing, hashing, staging) grows with its bytes, and chunks differ in size
(``--chunk-entries`` 1 to 10,000; entries with doors and schedules are longer)."""
PACING_BURST_S = 0.25
"""A gateway that has not been sent chunks lately may be sent this many seconds' worth at
once (1 MB at the default rate) with the manifest: a building's list goes out whole, in
its worker's unit of work as before pacing (provisioning/serve.py); only longer lists are
spread out."""

COMMAND_ACTIONS: tuple[str, ...] = get_args(Command.model_fields["action"].annotation)
MODE_ACTIONS = frozenset({"lockdown", "free_passage", "normal"})
"""The commands whose effect lasts (the gateway restores the latest across restarts)."""
LAST_COMMAND_KEY = "last_command:{gateway}"
LAST_MODE_COMMAND_KEY = "last_mode_command:{gateway}"
"""Database meta keys: the seq and action of the latest command, and of the latest mode
command, sent to a gateway (JSON), recorded before the command is handed to the broker.
The heartbeat names the first one's seq (``cmd_seq``); ``resend_commands`` sends both
again."""


@dataclass(frozen=True, slots=True)
class SentCommand:
    """A command as recorded for sending again: its seq and action."""

    seq: int
    action: str


# -- the operations -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishSnapshot:
    """Send ``gateway`` its whole allowlist as the next version, in chunks of at most
    ``chunk_entries`` entries (and revocations)."""

    gateway: str
    chunk_entries: int = CHUNK_ENTRIES


@dataclass(frozen=True, slots=True)
class PublishDelta:
    """Send the stored entries of the credential hashes ``upsert`` and the removal of
    ``remove`` as the next version."""

    gateway: str
    upsert: tuple[bytes, ...] = ()
    remove: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Revoke:
    """Revoke ``items`` at gateway ``target``, or at every gateway with ``"*"``."""

    target: str
    items: tuple[Revoked, ...]


@dataclass(frozen=True, slots=True)
class SendCommand:
    """Send an operational command (one of ``COMMAND_ACTIONS``)."""

    gateway: str
    action: str


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    """Send 'your lists are current as of these versions'."""

    gateway: str


@dataclass(frozen=True, slots=True)
class HeartbeatAll:
    """A heartbeat to every registered gateway."""


@dataclass(frozen=True, slots=True)
class AnnounceKeys:
    """Send every gateway the office's signing keys and their states (``keys``)."""


@dataclass(frozen=True, slots=True)
class RetireKey:
    """Stop signing with ``kid`` and announce it retired (``retiring`` for ``grace_s``)."""

    kid: str
    grace_s: int = 0


Operation = (PublishSnapshot | PublishDelta | Revoke | SendCommand | SendHeartbeat
             | HeartbeatAll | AnnounceKeys | RetireKey)
OpResult = int | dict[str, int]
"""What an operation returns: the seq or version used, or (``HeartbeatAll``) one per
gateway."""


# -- pacing ---------------------------------------------------------------------------

Send = Callable[[str, bytes], None]
LaneKind = Literal["chunk", "list", "hb"]


@dataclass(frozen=True, slots=True)
class _Queued:
    """A message waiting in a gateway's lane: a ``chunk`` (paced), or a ``list`` (delta)
    or ``hb`` (heartbeat) message that must not overtake the chunks before it."""

    topic: str
    payload: bytes
    kind: LaneKind


@dataclass(slots=True)
class _Lane:
    """What is still to go to one gateway behind its paced chunks."""

    items: deque[_Queued]
    version: int
    chunks: int
    """Chunks of this snapshot handed to the pacer (for the log)."""
    since: float


class Pacer:
    """Sends each gateway its snapshot chunks at most ``rate`` bytes a second (0:
    unpaced), every gateway on its own budget: several snapshots at once are each paced,
    none waits for another (the limit is each gateway's, not the office's or the
    broker's).

    A gateway's budget is a token bucket of ``PACING_BURST_S`` seconds: a chunk may go
    once the gateway's theoretical send time ``tat`` is at most that far ahead of now,
    and moves it on by ``len(chunk) / rate``. The caller's thread sends what is due at
    once; a thread of the pacer's own (started when a lane fills, ending when none is
    left) hands the rest to ``release``, which must be safe to call from that thread.
    Everything for one gateway is handed over under one lock, so its messages leave in
    the order they were given."""

    def __init__(self, rate: int, release: Send, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0:
            raise CentralUsageError(f"--chunk-rate {rate}: must be 0 (snapshots unpaced) "
                                    "or more bytes per second")
        self.rate = rate
        self._release = release
        self._clock = clock
        self._lanes: dict[str, _Lane] = {}
        self._tat: dict[str, float] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def pending(self, gateway: str | None = None) -> int:
        """Messages still waiting for ``gateway`` (for every gateway with None)."""
        with self._cond:
            lanes = (self._lanes.values() if gateway is None
                     else [lane for gw, lane in self._lanes.items() if gw == gateway])
            return sum(len(lane.items) for lane in lanes)

    def snapshot(self, gateway: str, topic: str, manifest: bytes, chunks: Sequence[bytes],
                 *, version: int, send: Send) -> int:
        """Send ``manifest`` now, then the ``chunks`` paced; returns how many were left
        for the pacer's thread. A snapshot still being paced to ``gateway`` is
        superseded: its chunks and the deltas queued behind it are dropped (the gateway
        discards an unfinished staging when a newer manifest comes, and the new snapshot
        holds everything they carried); the heartbeats queued go after the new chunks."""
        with self._cond:
            if not self.rate:
                send(topic, manifest)
                for chunk in chunks:
                    send(topic, chunk)
                return 0
            held: list[_Queued] = []
            old = self._lanes.pop(gateway, None)
            if old is not None:
                held = [q for q in old.items if q.kind == "hb"]
                log.info("snapshot_pacing_superseded", gateway=gateway, version=old.version,
                         by=version, chunks_dropped=sum(q.kind == "chunk" for q in old.items))
            send(topic, manifest)
            lane = _Lane(deque([*(_Queued(topic, c, "chunk") for c in chunks), *held]),
                         version, len(chunks), self._clock())
            self._drain_lane(gateway, lane, send)
            if not lane.items:
                return 0
            self._lanes[gateway] = lane
            self._start()
            return sum(q.kind == "chunk" for q in lane.items)

    def send(self, gateway: str, topic: str, payload: bytes, *, kind: LaneKind,
             send: Send) -> bool:
        """Send a ``list`` or ``hb`` message to ``gateway`` now, or, while chunks are
        being paced to it, queue it behind them; True when it was sent now."""
        with self._cond:
            lane = self._lanes.get(gateway)
            if lane is None:
                send(topic, payload)
                return True
            lane.items.append(_Queued(topic, payload, kind))
            return False

    def drain(self) -> None:
        """Wait until every lane is empty (a one-shot command, before it waits for the
        broker's acknowledgements). Bounded: the pacer's thread hands everything over
        at ``rate``, and handing over does not wait for the broker."""
        with self._cond:
            self._cond.wait_for(lambda: not self._lanes or self._thread is None)

    def stop(self) -> int:
        """Drop whatever is still waiting (``serve`` stops, the folder is closed); returns
        how many messages were dropped. A gateway left with part of a snapshot asks for
        one again (docs/protocol.md, snapshots)."""
        with self._cond:
            lanes, self._lanes = self._lanes, {}
            self._cond.notify_all()
        for gateway, lane in lanes.items():
            log.warning("snapshot_pacing_stopped", gateway=gateway, version=lane.version,
                        messages_dropped=len(lane.items))
        return sum(len(lane.items) for lane in lanes.values())

    def _due(self, gateway: str, now: float) -> float:
        """When ``gateway``'s next chunk may go."""
        return max(self._tat.get(gateway, now), now) - PACING_BURST_S

    def _drain_lane(self, gateway: str, lane: _Lane, send: Send) -> None:
        """Send (under the lock) what may go now from the head of ``lane``: chunks while
        the budget allows, the messages queued behind them as they come up."""
        while lane.items:
            item = lane.items[0]
            if item.kind == "chunk":
                now = self._clock()
                if self._due(gateway, now) > now:
                    return
                tat = max(self._tat.get(gateway, now), now)
                self._tat[gateway] = tat + len(item.payload) / self.rate
            lane.items.popleft()
            send(item.topic, item.payload)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chunk-pacer",
                                            daemon=True)
            self._thread.start()
        else:
            self._cond.notify_all()

    def _run(self) -> None:
        with self._cond:
            try:
                self._pace()
            finally:
                self._thread = None
                # Spent budgets are forgotten (a lane that starts later begins afresh).
                now = self._clock()
                self._tat = {gw: t for gw, t in self._tat.items() if t > now}
                self._cond.notify_all()

    def _pace(self) -> None:
        """The pacer's thread, under the lock (released while it waits): hand over what
        is due in every lane, sleep until the next is due or a lane is added."""
        while self._lanes:
            wake = math.inf
            for gateway, lane in list(self._lanes.items()):
                try:
                    self._drain_lane(gateway, lane, self._release)
                except Exception:  # this thread's one boundary: logged, lane dropped
                    # (not connected, say: the gateway asks for the snapshot again)
                    log.exception("snapshot_pacing_failed", gateway=gateway,
                                  version=lane.version, messages_dropped=len(lane.items))
                    lane.items.clear()
                else:
                    if lane.items:
                        wake = min(wake, self._due(gateway, self._clock()))
                        continue
                    log.info("snapshot_chunks_sent", gateway=gateway, version=lane.version,
                             chunks=lane.chunks, seconds=round(self._clock() - lane.since, 3))
                del self._lanes[gateway]
                self._cond.notify_all()
            if self._lanes:
                self._cond.wait(max(0.0, wake - self._clock()))


# -- the publisher --------------------------------------------------------------------


class Publisher:
    """Builds, numbers, signs and hands over the office's messages (one thread at a time:
    the serve worker, or a one-shot caller)."""

    def __init__(self, db: OfficeDatabase, keys: OfficeKeys,
                 send: Callable[[str, bytes], None], *, clock: Callable[[], float],
                 ttl_s: int = DEFAULT_TTL_S,
                 heartbeat_ttl_s: int = DEFAULT_HEARTBEAT_TTL_S,
                 pacer: Pacer | None = None) -> None:
        self._db = db
        self._keys = keys
        self._send = send
        self._clock = clock
        self.ttl_s, self.heartbeat_ttl_s = ttl_s, heartbeat_ttl_s
        self._pacer = pacer
        """Paces snapshot chunks (None: everything is sent at once, in order)."""

    def check(self, op: Operation) -> None:
        """Refuse an operation that cannot be performed (``CentralUsageError`` naming the
        argument), before anything is allocated or handed to a running ``serve``."""
        match op:
            case PublishSnapshot(gateway, chunk_entries):
                if not 1 <= chunk_entries <= MAX_CHUNK_ENTRIES:
                    raise CentralUsageError(f"--chunk-entries: 1 to {MAX_CHUNK_ENTRIES}")
                known_gateway(self._db, gateway)
            case PublishDelta(_gateway, upsert, remove):
                if not upsert and not remove:
                    raise CentralUsageError("delta: nothing to upsert or remove")
            case Revoke(target, items):
                self._check_revoke(target, items)
            case SendCommand(gateway, action):
                if action not in COMMAND_ACTIONS:
                    raise CentralUsageError(f"action {action!r}: one of "
                                            f"{', '.join(COMMAND_ACTIONS)}")
                known_gateway(self._db, gateway)
            case SendHeartbeat(gateway):
                known_gateway(self._db, gateway)
            case HeartbeatAll() | AnnounceKeys():
                pass
            case RetireKey(kid, _grace):
                check_retire(self._keys.folder, kid)
            case _:
                assert_never(op)

    def _check_revoke(self, target: str, items: tuple[Revoked, ...]) -> None:
        if not items:
            raise CentralUsageError("revoke: nothing to revoke")
        if target == "*":
            if any(i.kind != "permit" for i in items):
                raise CentralUsageError("--all: only permits can be revoked everywhere (a "
                                        "credential hash depends on the building's site key)")
        else:
            known_gateway(self._db, target)

    def perform(self, op: Operation) -> OpResult:  # noqa: PLR0911 - one return per operation
        """Run one operation; returns the seq (or version) it used."""
        match op:
            case PublishSnapshot(gateway, chunk_entries):
                return self.snapshot(gateway, chunk_entries)
            case PublishDelta(gateway, upsert, remove):
                return self.delta(gateway, upsert, remove)
            case Revoke(target, items):
                return self.revoke(target, items)
            case SendCommand(gateway, action):
                return self.command(gateway, action)
            case SendHeartbeat(gateway):
                return self.heartbeat(gateway)
            case HeartbeatAll():
                return self.heartbeat_all()
            case AnnounceKeys():
                return self.announce_keys()
            case RetireKey(kid, grace_s):
                return self.retire_key(kid, grace_s)
            case _:
                assert_never(op)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _times(self, ttl: int) -> tuple[int, int]:
        now = int(self._clock())
        return now, now + ttl

    def _signed(self, topic: str, body: Snapshot | Delta | Revocation | Command | Heartbeat
                | EventAck | EnrollmentDecision | KeyAnnouncement) -> None:
        self._send(topic, self._keys.sign(topic, body))

    def _behind_chunks(self, gateway: str, topic: str, body: Delta | Heartbeat,
                       kind: LaneKind) -> None:
        """Send a delta or heartbeat, behind the chunks still being paced to ``gateway``."""
        payload = self._keys.sign(topic, body)
        if self._pacer is None:
            self._send(topic, payload)
        else:
            self._pacer.send(gateway, topic, payload, kind=kind, send=self._send)

    def snapshot(self, gateway: str, chunk_entries: int = CHUNK_ENTRIES, *,
                 resync: bool = False) -> int:
        """Send the whole allowlist of ``gateway`` as a new version; returns it."""
        contents = self._db.allocate_snapshot(gateway, self._now_ms(), resync=resync)
        version = contents.version
        entries = [wire_entry(e) for e in contents.entries]
        revoked = [wire_revoked(r) for r in contents.revoked]
        count = max(1, -(-len(entries) // chunk_entries), -(-len(revoked) // chunk_entries))
        payloads = [Chunk(
            type="chunk", version=version, index=i,
            entries=entries[i * chunk_entries:(i + 1) * chunk_entries],
            revoked=revoked[i * chunk_entries:(i + 1) * chunk_entries],
        ).model_dump_json().encode() for i in range(count)]
        issued, expires = self._times(self.ttl_s)
        manifest = Snapshot(
            type="snapshot", gateway=gateway, seq=version, issued_at=issued,
            expires_at=expires, entries=len(entries), revoked=len(revoked),
            chunk_sha256=[chunk_digest(p) for p in payloads], rev_seq=contents.rev_seq,
            all_seq=contents.all_seq)
        topic = Topics(gateway).inbound("list")
        signed = self._keys.sign(topic, manifest)
        paced = 0
        if self._pacer is None:
            self._send(topic, signed)
            for payload in payloads:
                self._send(topic, payload)
        else:
            paced = self._pacer.snapshot(gateway, topic, signed, payloads, version=version,
                                         send=self._send)
        log.info("snapshot_published", gateway=gateway, version=version,
                 entries=len(entries), revoked=len(revoked), chunks=count, resync=resync,
                 paced_chunks=paced)
        return version

    def delta(self, gateway: str, upsert: tuple[bytes, ...], remove: tuple[bytes, ...]
              ) -> int:
        """Send the stored entries of ``upsert`` and the removal of ``remove`` (credential
        hashes) as the next version on the current one; returns the new version."""
        allocated = self._db.allocate_delta(gateway, upsert, self._now_ms())
        if allocated is None:
            raise CentralUsageError(f"delta: a card to upsert is not enrolled at "
                                    f"gateway {gateway}")
        version, records = allocated
        self.send_delta(gateway, version.seq, records, remove, base=version.prev)
        return version.seq

    def send_delta(self, gateway: str, version: int, upsert: Sequence[EntryRecord],
                   remove: Sequence[bytes], *, base: int) -> None:
        """Send list version ``version`` (allocated, and committed, by the caller) as a
        delta on version ``base``, the one before it."""
        rows = [wire_entry(r) for r in upsert]
        issued, expires = self._times(self.ttl_s)
        self._behind_chunks(gateway, Topics(gateway).inbound("list"), Delta(
            type="delta", gateway=gateway, seq=version, issued_at=issued, expires_at=expires,
            base=base, upsert=rows, remove=[b64(c) for c in remove]), "list")
        log.info("delta_published", gateway=gateway, version=version, upserts=len(rows),
                 removals=len(remove))

    def decisions(self, gateway: str, seq: int, items: Sequence[Decided]) -> None:
        """Send answers to enrollments as ``enr`` seq ``seq`` (allocated, and committed,
        by the caller)."""
        issued, expires = self._times(self.ttl_s)
        self._signed(Topics(gateway).inbound("enr"), EnrollmentDecision(
            type="enrollment_decision", gateway=gateway, seq=seq, issued_at=issued,
            expires_at=expires, items=list(items)))
        log.info("enrollment_decision_published", gateway=gateway, seq=seq, items=len(items))

    def revoke(self, target: str, items: tuple[Revoked, ...]) -> int:
        """Revoke ``items`` at ``target`` (or everywhere with ``"*"``); returns the seq."""
        allocated = self._db.allocate_revocation(
            target, [(i.kind, unb64(i.hash)) for i in items], self._now_ms())
        seq = allocated.seq
        issued, expires = self._times(self.ttl_s)
        topic = (Topics("*").broadcast_revocations if target == "*"
                 else Topics(target).inbound("rev"))
        self._signed(topic, Revocation(
            type="revocation", gateway=target, seq=seq, issued_at=issued, expires_at=expires,
            items=list(items), prev_seq=allocated.prev))
        log.info("revocation_published", gateway=target, seq=seq, items=len(items))
        return seq

    def command(self, gateway: str, action: str) -> int:
        """Send an operational command; returns its seq."""
        seq = self._db.allocate_command(gateway, self._now_ms())
        # Recorded before it is handed over: a heartbeat then names it, and a gateway that
        # never got it (lost on the way, expired in a queue, or never sent because this
        # process died here) asks for it again.
        record = json.dumps({"seq": seq, "action": action})
        if action in MODE_ACTIONS:
            self._db.set_meta(LAST_MODE_COMMAND_KEY.format(gateway=gateway), record)
        self._db.set_meta(LAST_COMMAND_KEY.format(gateway=gateway), record)
        self._send_command(gateway, SentCommand(seq, action))
        log.info("command_published", gateway=gateway, seq=seq, action=action)
        return seq

    def _send_command(self, gateway: str, command: SentCommand) -> None:
        issued, expires = self._times(self.ttl_s)
        self._signed(Topics(gateway).inbound("cmd"), Command(
            type="command", gateway=gateway, seq=command.seq, issued_at=issued,
            expires_at=expires, action=cast(Any, command.action)))

    def sent_command(self, gateway: str, *, mode: bool = False) -> SentCommand | None:
        """The latest command (``mode``: mode command) sent to ``gateway``, if recorded."""
        key = LAST_MODE_COMMAND_KEY if mode else LAST_COMMAND_KEY
        text = self._db.meta(key.format(gateway=gateway))
        if text is None:
            return None
        record = json.loads(text)
        return SentCommand(int(record["seq"]), str(record["action"]))

    def resend_commands(self, gateway: str, reported: int | None = None) -> list[int]:
        """Send the latest mode command and the latest command again, in that order, each
        under its own seq and action, signed anew with a fresh expiry; skip what the
        gateway reported applied (``reported``: its ``cmd`` version, when known). Returns
        the seqs sent.

        Replay protection holds: a seq is only ever sent with the action it was allocated
        for, and the gateway applies a seq only above the one it stored, so however many
        copies travel (these, the original, a replay of either) each command is applied at
        most once, and none after a later one. The mode command goes first so that a
        gateway that missed both gets the mode that lasts, not only a later ``status`` or
        ``resync``."""
        latest = self.sent_command(gateway)
        if latest is None:
            return []
        mode = self.sent_command(gateway, mode=True)
        due = [c for c in (mode, latest) if c is not None
               and (reported is None or c.seq > reported)]
        sent: list[int] = []
        for command in sorted({c.seq: c for c in due}.values(), key=lambda c: c.seq):
            self._send_command(gateway, command)
            sent.append(command.seq)
        log.info("commands_resent", gateway=gateway, seqs=sent, reported=reported)
        return sent

    def heartbeat(self, gateway: str) -> int:
        """Send 'your lists are current as of these versions'; returns its seq."""
        state = self._db.allocate_heartbeat(gateway, self._now_ms())
        latest = self.sent_command(gateway)
        issued, expires = self._times(self.heartbeat_ttl_s)
        self._behind_chunks(gateway, Topics(gateway).inbound("hb"), Heartbeat(
            type="heartbeat", gateway=gateway, seq=state.seq, issued_at=issued,
            expires_at=expires, list_version=state.list_version, rev_seq=state.rev_seq,
            all_seq=state.all_seq, cmd_seq=None if latest is None else latest.seq), "hb")
        log.debug("heartbeat_published", gateway=gateway, seq=state.seq,
                  list_version=state.list_version)
        return state.seq

    def heartbeat_all(self) -> dict[str, int]:
        """A heartbeat to every gateway; returns the seq sent to each."""
        return {gw: self.heartbeat(gw) for gw in self._db.gateway_ids()}

    def announce_keys(self) -> int:
        """Send every gateway the signing keys and their states, under one new ``keys``
        seq (committed first); returns it."""
        seq = next_seq(int(self._db.meta(KEYS_SEQ_KEY) or 0), self._now_ms())
        self._db.set_meta(KEYS_SEQ_KEY, str(seq))
        keys = self._announce(self._db.gateway_ids(), seq)
        log.info("keys_announced", seq=seq, signer=self._keys.signing()[0],
                 keys={k.kid: k.state for k in keys})
        return seq

    def resend_keys(self, gateway: str) -> int | None:
        """Send ``gateway`` the latest ``keys`` announcement again: its own seq, the keys
        as they stand now, signed anew with a fresh expiry. None when the office never
        announced its keys."""
        seq = int(self._db.meta(KEYS_SEQ_KEY) or 0)
        if not seq:
            return None
        self._announce([gateway], seq)
        log.info("keys_resent", gateway=gateway, seq=seq)
        return seq

    def _announce(self, gateways: Sequence[str], seq: int) -> list[AnnouncedKey]:
        issued, expires = self._times(self.ttl_s)
        keys = announced_set(self._keys.folder, issued)
        for gateway in gateways:
            self._signed(Topics(gateway).inbound("keys"), KeyAnnouncement(
                type="keys", gateway=gateway, seq=seq, issued_at=issued, expires_at=expires,
                keys=keys))
        return keys

    def retire_key(self, kid: str, grace_s: int) -> int:
        """Stop signing with ``kid`` (the next listed key signs from now on) and announce
        it retired, or ``retiring`` for ``grace_s``; returns the announcement's seq."""
        retire(self._keys.folder, kid, int(self._clock()) + grace_s)
        self._keys.reload()
        log.warning("signing_key_retired", kid=kid, grace_s=grace_s)
        return self.announce_keys()

    def ack(self, gateway: str, upto: int) -> int:
        """Acknowledge every event of ``gateway`` up to ``upto`` (call it only once they
        are committed: the gateway may then forget them); returns the ack's seq."""
        seq = self._db.allocate_ack(gateway, self._now_ms())
        issued, expires = self._times(self.ttl_s)
        self._signed(Topics(gateway).inbound("ack"), EventAck(
            type="event_ack", gateway=gateway, seq=seq, issued_at=issued,
            expires_at=expires, upto=upto))
        return seq
