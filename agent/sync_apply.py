"""What the gateway does with each central message (docs/protocol.md), with no MQTT in it.

``Applier`` takes the store, the agent (through ``SyncHost``), the trusted keys, the
gateway id, the sync settings and a clock. It consumes ``(topic, payload)`` pairs and
verifies, checks and applies them: envelopes and signatures, header, target, expiry and
seq, snapshot staging and chunks, deltas, revocations, commands, heartbeats and
staleness, acks, the office's key announcements (kept by agent/trust.py). Everything it
has to say to the office goes out through ``Outbound`` (``Applied`` reports, resync
requests, a status on request, acknowledged events), which the MQTT worker (agent/sync.py)
implements and a test can implement with a list.

Refusals are counted, logged and recorded here: the counters and the event rate limit
live in memory and start again from zero with the agent.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import SyncConfig
from agent.decision import Mode
from agent.site_keys import SITE_STREAM, SiteKeys
from agent.store import CredentialEntry
from agent.trust import Trust
from common.sqlite import StoreError
from protocol.chain import Event
from protocol.messages import (
    BEHIND_COMMAND,
    MAX_CLOCK_SKEW_S,
    STREAM_TYPES,
    Applied,
    CentralBody,
    Command,
    Decided,
    Delta,
    EnrollmentDecision,
    Entry,
    EventAck,
    Heartbeat,
    KeyAnnouncement,
    RefusedError,
    ResyncRequest,
    Revocation,
    SiteKey,
    Snapshot,
    chunk_digest,
    is_chunk,
    parse_central,
    parse_chunk,
)
from protocol.signing import unb64
from protocol.topics import stream_of

if TYPE_CHECKING:
    from agent.store import Store

log = structlog.get_logger()

REFUSAL_EVENT_EVERY_S = 60.0
"""Refusals are logged one by one but recorded as events at most once a minute per reason,
so a flood of forged messages cannot fill the event log."""
DETAIL_CHARS = 200
"""A refusal's detail is cut to this many characters in its event."""
STAGE_ROWS = 1000
"""Rows of a snapshot chunk staged per transaction: about 20 ms of work here, the longest
a revocation arriving meanwhile waits for the list database (bench/revocation.py)."""
STAGING = "staging"
"""The pseudo-stream recording the list version of the last snapshot whose staging began;
above the applied list version after a restart, it means the staging was cut short."""
MODE = "mode"
"""The pseudo-stream recording the seq and action of the last mode command: the mode a
restart restores (agent/runtime.py), whatever commands came after it."""
MODE_ACTIONS = frozenset({"lockdown", "free_passage", "normal"})


class SyncHost(Protocol):
    """What the sync worker needs of the agent besides its store, and nothing more."""

    def current_mode(self) -> Mode:
        """The site mode in force."""

    def set_mode(self, mode: Mode, *, source: str) -> None:
        """Switch the site mode (a central command) and record it."""

    def set_stale_cutoff(self, cutoff: int | None) -> None:
        """Apply (or lift, with None) the stale-list policy."""

    def clock_observed(self, trusted_ms: int, source: str) -> None:
        """The office's signed time was seen (agent/clock.py)."""

    def clock_ok(self) -> bool:
        """Whether the wall clock is judged right."""

    def enrollment_decided(self, decided: Decided) -> None:
        """Apply the office's answer to an enrollment made here (raises ``StoreError``)."""

    def record_event(self, event: Event) -> None:
        """Append an event to the chain; raises ``StoreError``."""

    @property
    def site_keys(self) -> SiteKeys | None:
        """The site keys in force (None before the agent has started)."""


class Outbound(Protocol):
    """Where the applier's replies to the office go."""

    def send_applied(self, message: Applied) -> None:
        """Report a central message applied or refused."""

    def request_resync(self, reason: str, *, at_once: bool = False) -> None:
        """Ask the office for a snapshot (``at_once``: without waiting for
        ``resync_interval_s`` since the last request)."""

    def send_status(self) -> None:
        """Publish the gateway's status now (a ``status`` command)."""

    def events_acked(self, upto: int) -> None:
        """The office has stored every event up to ``upto`` (already marked in the
        store)."""


@dataclass(slots=True)
class Staging:
    """A snapshot being received chunk by chunk."""

    manifest: Snapshot
    next_index: int = 0


@dataclass(slots=True)
class Counters:
    """What sync has done since the agent started, for status and tests."""

    refused: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    batches_sent: int = 0
    reconnects: int = 0


class Applier:
    """Verifies and applies central messages to the store and the agent."""

    def __init__(self, store: Store, host: SyncHost, keys: dict[str, Ed25519PublicKey], *,
                 gateway: str, config: SyncConfig, outbound: Outbound,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """``clock`` is the wall clock that expiry, staleness and report times use;
        ``monotonic`` paces refusal events."""
        self.store = store
        self.host = host
        self.keys = keys
        self.trust = Trust(keys, store)
        """``keys`` (trusted-keys.txt) and the office's announced keys (agent/trust.py)."""
        self.gateway = gateway
        self.config = config
        self.outbound = outbound
        self._clock = clock
        self._monotonic = monotonic
        self._staging: Staging | None = None
        self.between_steps: Callable[[], None] = lambda: None
        """Called between the steps of a long list operation: the sync worker applies the
        urgent messages waiting (agent/inbox.py). Never a snapshot's own messages."""
        self._refusal_logged: dict[str, float] = {}
        self._started = clock()
        self.stale: bool | None = None
        """Whether the lists are stale; None before the first check."""
        self.counters = Counters()
        self.changes = 0
        """Goes up whenever ``stale`` or a refusal counter changes (for whoever records
        them)."""

    # -- the way in ------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """Verify and apply one central message; every outcome is reported to
        ``outbound``. A topic that is not one of this gateway's streams is ignored."""
        stream = stream_of(topic, self.gateway, self.config.prefix)
        if stream is None:
            log.debug("mqtt_message_ignored", topic=topic)
            return
        if stream == "list" and is_chunk(payload):
            self._on_chunk(payload)
            return
        seq: int | None = None
        try:
            body = self.trust.open(payload, topic, self.config.max_message_bytes,
                                   self._clock())
            message = parse_central(body)
            seq = message.seq
            self._check_header(stream, message)
            self._apply(stream, message)
        except RefusedError as refused:
            self._refuse(stream, seq, refused)
        except StoreError as exc:
            self._store_failed(stream, seq, exc)

    def on_connected(self, session_present: bool) -> None:
        """After every (re)connect: give up a snapshot whose chunks the broker lost, and
        ask for a list if there is none or a restart cut one short."""
        if not session_present and self._staging is not None:
            # The broker lost our session (restarted without persistence, or the session
            # expired): the rest of the snapshot's chunks will not come.
            log.warning("snapshot_lost_with_session", version=self._staging.manifest.seq)
            self._abort_snapshot()
        versions = self.versions()
        if versions.get("list", 0) == 0:
            self.outbound.request_resync("no_list")
        elif self._staging is None and versions.get(STAGING, 0) > versions["list"]:
            # A snapshot was being staged when the agent stopped (a crash, a power cut):
            # the chunks it had taken from the broker are gone with it, and the rest are
            # ignored without their manifest, so ask for the list again now rather than
            # at the next heartbeat (up to 15 min with serve's default).
            self.outbound.request_resync("interrupted_snapshot")

    def resync_request(self, reason: str) -> ResyncRequest:
        """The resync message for ``reason``, with the versions held now."""
        versions = self.versions()
        return ResyncRequest(
            type="resync", gateway=self.gateway, reason=reason,
            list_version=versions.get("list", 0), rev_seq=versions.get("rev", 0),
            all_seq=versions.get("all", 0), ts_ms=self.now_ms())

    @property
    def staging_version(self) -> int | None:
        """The list version of the snapshot being staged, if one is."""
        return None if self._staging is None else self._staging.manifest.seq

    # -- checks common to every signed message ----------------------------------------------

    def _check_header(self, stream: str, message: CentralBody) -> None:
        if message.type not in STREAM_TYPES[stream]:
            raise RefusedError("wrong_stream", f"a {message.type} on the {stream} topic")
        target = "*" if stream == "all" else self.gateway
        if message.gateway != target:
            raise RefusedError("wrong_target", f"addressed to {message.gateway!r}")
        now = self._clock()
        if message.issued_at > now + MAX_CLOCK_SKEW_S:
            # Signed by the office, so its time is the better one: our clock is behind.
            # The clock judge raises the alarm and the offline policy applies (stale).
            self.host.clock_observed(message.issued_at * 1000, "office")
        if stream in ("rev", "all"):
            # Revocations only take access away: applied whatever the clock says, or a
            # wrong clock would keep a revoked card working. Their seq still refuses
            # replays and rollbacks.
            return
        if now >= message.expires_at:
            raise RefusedError("expired", f"expired at {message.expires_at}, now {int(now)}")
        if message.issued_at > now + MAX_CLOCK_SKEW_S:
            raise RefusedError("from_future", f"issued at {message.issued_at}, now {int(now)}")

    def _apply(self, stream: str, message: CentralBody) -> None:
        if isinstance(message, EventAck):
            self._on_ack(message)
            return
        last = self.versions().get(stream, 0)
        if message.seq <= last:
            raise RefusedError("replay" if message.seq == last else "rollback",
                               f"seq {message.seq}, already at {last}")
        if isinstance(message, Heartbeat):
            self._on_heartbeat(message)
        elif isinstance(message, Command):
            self._on_command(message)
        elif isinstance(message, Revocation):
            self._on_revocation(stream, message, last)
        elif isinstance(message, Snapshot):
            self._on_snapshot(message)
        elif isinstance(message, Delta):
            self._on_delta(message, last)
        elif isinstance(message, EnrollmentDecision):
            self._on_enrollment_decision(message)
        elif isinstance(message, KeyAnnouncement):
            summary = self.trust.announce(message, self._clock())
            self._list_event("keys_announced", "keys", message.seq, summary)
            self._applied("keys", message.seq)
        elif isinstance(message, SiteKey):
            self._on_site_key(message)

    # -- one handler per message type ------------------------------------------------------

    def _on_ack(self, ack: EventAck) -> None:
        upto = min(ack.upto, self.store.last_seq())
        self.store.mark_acked(upto)
        self.outbound.events_acked(upto)

    def _on_heartbeat(self, hb: Heartbeat) -> None:
        self.store.set_stream("hb", hb.seq, {"issued_at": hb.issued_at,
                                             "expires_at": hb.expires_at})
        self.host.clock_observed(hb.issued_at * 1000, "office")
        versions = self.versions()
        if (hb.list_version > versions.get("list", 0) or hb.rev_seq > versions.get("rev", 0)
                or hb.all_seq > versions.get("all", 0)):
            self.outbound.request_resync("behind_heartbeat")
        if "list" not in versions and self._staging is None:
            # Still no list: the request made on connecting may have been published
            # before the office subscribed (an office heartbeats as it starts).
            self.outbound.request_resync("no_list", at_once=True)
        if hb.cmd_seq is not None and hb.cmd_seq > versions.get("cmd", 0):
            # A command was lost (a broker queue dropped it) or refused (it expired on the
            # way): the office sends its latest commands again, with their own seqs.
            self.outbound.request_resync(BEHIND_COMMAND)
        self.check_stale()

    def _on_command(self, cmd: Command) -> None:
        if cmd.action in MODE_ACTIONS:
            self.host.set_mode(Mode(cmd.action), source=f"central command {cmd.seq}")
            # Kept apart from the cmd stream, so a later status or resync command does not
            # make a restart forget the commanded mode.
            self.store.set_stream(MODE, cmd.seq, {"mode": cmd.action})
        elif cmd.action == "resync":
            self.outbound.request_resync("command", at_once=True)
        elif cmd.action == "status":
            self.outbound.send_status()
        self.store.set_stream("cmd", cmd.seq, {"action": cmd.action})
        self._applied("cmd", cmd.seq)

    def _on_site_key(self, message: SiteKey) -> None:
        keys = self.host.site_keys
        if keys is None:
            raise RefusedError("no_seal_key", "the agent has no site keys yet")
        change = keys.check(message)
        self.store.set_stream(SITE_STREAM, message.seq, change.detail())
        ring = keys.commit(change)
        self._list_event("site_key_changed", SITE_STREAM, message.seq, {
            "generation": ring.generation, "changeover": ring.previous is not None})
        self._applied(SITE_STREAM, message.seq)

    def _on_enrollment_decision(self, decision: EnrollmentDecision) -> None:
        for item in decision.items:
            self.host.enrollment_decided(item)
        self.store.set_stream("enr", decision.seq)
        self._applied("enr", decision.seq)

    def _on_revocation(self, stream: str, rev: Revocation, last: int) -> None:
        # Streamed into the store (in batches): no second list of up to MAX_ITEMS keys is
        # built beside the message (bench/load.py).
        count = self.store.revoke(((unb64(item.hash), item.kind) for item in rev.items),
                                  version=rev.seq, stream=stream)
        self._list_event("revocations_applied", stream, rev.seq, {"count": count})
        if revocation_gap(rev, last):
            self.outbound.request_resync("gap")
        self._applied(stream, rev.seq)

    def _on_snapshot(self, manifest: Snapshot) -> None:
        if self._staging is not None:
            log.warning("snapshot_superseded", version=self._staging.manifest.seq)
        self.store.set_stream(STAGING, manifest.seq)  # first: see "interrupted_snapshot"
        self.store.begin_snapshot()
        self._staging = Staging(manifest)
        log.info("snapshot_started", version=manifest.seq, chunks=len(manifest.chunk_sha256),
                 entries=manifest.entries)

    def _on_chunk(self, payload: bytes) -> None:
        staging = self._staging
        if staging is None:
            # A duplicate after the snapshot applied, or a chunk of a snapshot that was
            # refused or given up: nothing to add it to.
            log.debug("snapshot_chunk_ignored", bytes=len(payload))
            return
        manifest = staging.manifest
        # Any failed chunk ends this snapshot at once: the old list stays whole, the
        # office is asked for a fresh one, and the report names the snapshot's version.
        # (Chunks carry no times: only the manifest's expiry, checked on arrival, counts.)
        try:
            self._stage_chunk(staging, payload)
        except RefusedError as refused:
            self._abort_snapshot()
            self._refuse("list", manifest.seq, refused)
            return
        except StoreError as exc:
            self._abort_snapshot()
            self._store_failed("list", manifest.seq, exc)
            return
        if staging.next_index < len(manifest.chunk_sha256):
            return
        self._staging = None
        try:
            self.store.commit_snapshot(manifest.seq, {"rev": manifest.rev_seq,
                                                      "all": manifest.all_seq},
                                       (manifest.entries, manifest.revoked))
        except StoreError as exc:
            self._abort_snapshot()
            if isinstance(exc.__cause__, ValueError):  # what was staged is not what was signed
                self._refuse("list", manifest.seq, RefusedError("bad_snapshot",
                                                                str(exc.__cause__)))
            else:
                self._store_failed("list", manifest.seq, exc)
            return
        self._list_event("snapshot_applied", "list", manifest.seq,
                         {"entries": manifest.entries, "revoked": manifest.revoked})
        self._applied("list", manifest.seq)

    def _stage_chunk(self, staging: Staging, payload: bytes) -> None:
        manifest = staging.manifest
        expected = manifest.chunk_sha256[staging.next_index]
        if chunk_digest(payload) != expected:
            raise RefusedError("bad_chunk", f"chunk {staging.next_index} of version "
                               f"{manifest.seq} does not match its manifest hash")
        chunk = parse_chunk(payload, self.config.max_message_bytes)
        if chunk.version != manifest.seq or chunk.index != staging.next_index:
            raise RefusedError("bad_chunk", f"got chunk {chunk.index} of version "
                               f"{chunk.version}, expected {staging.next_index} of "
                               f"{manifest.seq}")
        try:
            # A step at a time (a chunk of the reference office is one step): the staged
            # rows are not live, so they need not go in one transaction, and between
            # steps the urgent messages waiting (revocations, acks) are applied.
            for start in range(0, max(len(chunk.entries), len(chunk.revoked), 1), STAGE_ROWS):
                end = start + STAGE_ROWS
                self.store.add_snapshot_chunk(
                    (entry_of(e) for e in chunk.entries[start:end]),
                    ((unb64(r.hash), r.kind) for r in chunk.revoked[start:end]))
                self.between_steps()
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                # The office's snapshot, not the database, is at fault: refused and counted
                # like any bad chunk (a local failure stays a store_error).
                raise RefusedError("bad_chunk", f"chunk {chunk.index} of version "
                                   f"{manifest.seq} repeats a credential hash") from None
            raise
        staging.next_index += 1

    def _abort_snapshot(self) -> None:
        self._staging = None
        try:
            self.store.abort_snapshot()
        except StoreError as exc:
            log.error("snapshot_abort_failed", error=str(exc))
        self.outbound.request_resync("bad_snapshot")

    def _on_delta(self, delta: Delta, current: int) -> None:
        if delta.base != current:
            self.outbound.request_resync("gap")
            raise RefusedError("gap", f"delta on version {delta.base}, the list is at "
                               f"{current}")
        self.store.apply_delta(delta.base, delta.seq, (entry_of(e) for e in delta.upsert),
                               (unb64(c) for c in delta.remove))
        self._list_event("delta_applied", "list", delta.seq,
                         {"upserted": len(delta.upsert), "removed": len(delta.remove)})
        self._applied("list", delta.seq)

    # -- reports, refusals, staleness --------------------------------------------------------

    def _applied(self, stream: str, seq: int | None, reason: str | None = None) -> None:
        self.outbound.send_applied(Applied(
            type="applied", gateway=self.gateway, stream=stream, seq=seq,
            status="applied" if reason is None else "refused", reason=reason,
            list_version=self.versions().get("list", 0), ts_ms=self.now_ms()))

    def _refuse(self, stream: str, seq: int | None, refused: RefusedError) -> None:
        self.counters.refused[refused.reason] += 1
        self.changes += 1
        detail = self.public(refused.detail)
        log.warning("sync_message_refused", stream=stream, seq=seq, reason=refused.reason,
                    detail=detail)
        now = self._monotonic()
        if now - self._refusal_logged.get(refused.reason, -REFUSAL_EVENT_EVERY_S) >= \
                REFUSAL_EVENT_EVERY_S:
            self._refusal_logged[refused.reason] = now
            self._record(Event("sync_refused", reason=refused.reason, data={
                "stream": stream, "seq": seq, "detail": detail[:DETAIL_CHARS],
                "count": self.counters.refused[refused.reason]}))
        self._applied(stream, seq, refused.reason)

    def _store_failed(self, stream: str, seq: int | None, exc: StoreError) -> None:
        """A local failure (disk full, I/O): reported and logged, not counted as a
        refusal of the office's message."""
        log.error("sync_apply_failed", stream=stream, seq=seq, error=str(exc))
        self._applied(stream, seq, "store_error")

    def public(self, text: str) -> str:
        """``text`` with the store's local paths taken out: what leaves the gateway names
        no file of it."""
        paths = {str(self.store.lists_path), str(self.store.path)}
        folder = self.store.path.parent
        if folder.is_absolute() and len(folder.parts) > 1:
            paths.add(str(folder))
        for path in sorted(paths, key=len, reverse=True):
            text = text.replace(path, "<store>")
        return text

    def check_stale(self) -> None:
        """Re-evaluate staleness from the newest heartbeat (or the start, before the
        first); apply the offline policy and record a change."""
        detail = self.store.stream_detail("hb")
        reference = float(detail["issued_at"]) if detail else self._started
        now = self._clock()
        # A clock judged wrong makes the heartbeat's age meaningless (negative when the
        # clock went back): the lists then count as stale until the clock is right.
        stale = now - reference > self.config.heartbeat_max_age_s or not self.host.clock_ok()
        if stale and self.config.offline_policy == "recent_only":
            self.host.set_stale_cutoff(int(now - self.config.recent_window_h * 3600))
        elif self.stale:
            self.host.set_stale_cutoff(None)
        if stale != self.stale:
            if stale or self.stale is not None:
                kind = "sync_stale" if stale else "sync_fresh"
                data = {"heartbeat_age_s": int(now - reference),
                        "policy": self.config.offline_policy}
                self._record(Event(kind, data=data))
                (log.error if stale else log.info)(kind, **data)
            self.stale = stale
            self.changes += 1

    def _list_event(self, kind: str, stream: str, seq: int, data: dict[str, Any]) -> None:
        self._record(Event(kind, data={"stream": stream, "seq": seq, **data}))
        log.info(kind, stream=stream, seq=seq, **data)
        self.counters.applied += 1

    def _record(self, event: Event) -> None:
        try:
            self.host.record_event(event)
        except StoreError as exc:
            log.error("event_not_recorded", kind=event.kind, error=str(exc))

    def versions(self) -> dict[str, int]:
        """The stored version of every stream (``staging`` and ``mode`` included)."""
        versions: dict[str, int] = self.store.versions()
        return versions

    def now_ms(self) -> int:
        """The wall clock, Unix ms."""
        return int(self._clock() * 1000)


def revocation_gap(rev: Revocation, stored: int) -> bool:
    """Whether a revocation (its seq above ``stored``, the stream's seq here) shows that
    one was missed before it: its ``prev_seq`` is above ``stored``, or, from an office that
    sends no ``prev_seq``, its seq is not ``stored + 1``."""
    if rev.prev_seq is not None:
        return rev.prev_seq > stored
    return rev.seq != stored + 1


def entry_of(entry: Entry) -> CredentialEntry:
    """A wire allowlist entry as a store entry."""
    return CredentialEntry(
        cred=unb64(entry.cred), permit=None if entry.permit is None else unb64(entry.permit),
        valid_from=entry.valid_from, valid_until=entry.valid_until, doors=entry.doors,
        schedule=entry.schedule or "always", confirmed_at=entry.confirmed_at)
