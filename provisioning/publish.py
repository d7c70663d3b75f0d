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
The operations are plain values (``provisioning.operations``): a one-shot command hands
them to a running ``serve`` through the database (``provisioning.handoff``).

Snapshot chunks are paced (``provisioning.pacing.Pacer``): each gateway is sent its chunks
at most as fast as a gateway applies them, and only its deltas and heartbeats wait behind
them; everything else goes out at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, assert_never, cast

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
from provisioning.operations import (
    CHUNK_ENTRIES,
    COMMAND_ACTIONS,
    MAX_CHUNK_ENTRIES,
    REVOCATION_ITEMS,
    AnnounceKeys,
    HeartbeatAll,
    Operation,
    OpResult,
    PublishDelta,
    PublishSnapshot,
    RetireKey,
    Revoke,
    SendCommand,
    SendHeartbeat,
)
from provisioning.pacing import DEFAULT_CHUNK_RATE, PACING_BURST_S, LaneKind, Pacer
from provisioning.rotation import KEYS_SEQ_KEY, announced_set, check_retire, retire

__all__ = [  # the operations and the pacer are imported from here too
    "CHUNK_ENTRIES",
    "COMMAND_ACTIONS",
    "DEFAULT_CHUNK_RATE",
    "DEFAULT_HEARTBEAT_TTL_S",
    "DEFAULT_TTL_S",
    "LAST_COMMAND_KEY",
    "LAST_MODE_COMMAND_KEY",
    "MAX_CHUNK_ENTRIES",
    "MODE_ACTIONS",
    "PACING_BURST_S",
    "REVOCATION_ITEMS",
    "AnnounceKeys",
    "HeartbeatAll",
    "OpResult",
    "Operation",
    "Pacer",
    "PublishDelta",
    "PublishSnapshot",
    "Publisher",
    "RetireKey",
    "Revoke",
    "SendCommand",
    "SendHeartbeat",
    "SentCommand",
]

log = structlog.get_logger()

DEFAULT_TTL_S = 86_400
"""Snapshots, deltas, revocations, commands and acks expire after a day: long enough for
a gateway that was offline overnight, short enough that an old message cannot be
replayed weeks later."""
DEFAULT_HEARTBEAT_TTL_S = 3_600
"""A heartbeat says 'your lists are current'; an hour bounds how long a gateway cut off
from the office keeps believing it."""
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
