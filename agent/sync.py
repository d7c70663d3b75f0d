"""Sync with the central office over MQTT (protocol: docs/protocol.md, the ``protocol`` package).

One worker thread owns everything: it applies central messages, publishes events from the
durable outbox, status, acknowledgements and resync requests. paho's network thread only
hands messages and connection changes to the worker through a queue (an exception in a
paho callback can kill its thread, and publishing from several threads can deadlock it).

Delivery does not rest on paho or the broker: an event leaves the outbox only when the
central office acknowledges it with a signed ``event_ack``; unacknowledged events are sent
again after ``ack_timeout_s`` or a reconnect. A dead link is detected by traffic (the
gateway's own retained status echoes back to it), not by ``is_connected()``.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import SyncConfig
from agent.decision import Mode
from agent.store import CredentialEntry
from common.sqlite import StoreError
from protocol.chain import Event
from protocol.hashing import SecretError
from protocol.messages import (
    MAX_CLOCK_SKEW_S,
    STREAM_TYPES,
    Applied,
    Command,
    Delta,
    Entry,
    EventAck,
    EventBatch,
    Heartbeat,
    RefusedError,
    ResyncRequest,
    Revocation,
    Snapshot,
    Status,
    WireEvent,
    chunk_digest,
    is_chunk,
    parse_central,
    parse_chunk,
)
from protocol.signing import open_envelope, unb64
from protocol.topics import Topics, stream_of

if TYPE_CHECKING:
    from agent.store import Store

log = structlog.get_logger()

SESSION_EXPIRY_S = 7 * 86_400
"""The broker keeps the gateway's subscriptions and queued QoS 1 messages (revocations
sent while it was offline) this long after a disconnect."""
REFUSAL_EVENT_EVERY_S = 60.0
"""Refusals are logged one by one but recorded as events at most once a minute per reason,
so a flood of forged messages cannot fill the event log."""
TICK_S = 0.05
STAGING = "staging"
"""The pseudo-stream recording the list version of the last snapshot whose staging began;
above the applied list version after a restart, it means the staging was cut short."""


@dataclass(slots=True)
class Staging:
    """A snapshot being received chunk by chunk."""

    manifest: Snapshot
    next_index: int = 0


@dataclass(slots=True)
class InFlight:
    """The batch of events sent and not yet acknowledged."""

    first: int
    last: int
    sent_at: float


@dataclass(slots=True)
class TlsFiles:
    """Resolved TLS file paths."""

    ca: Path
    cert: Path
    key: Path


@dataclass(slots=True)
class Counters:
    """What the worker has done, for status and tests."""

    refused: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    batches_sent: int = 0
    reconnects: int = 0


class SyncHost(Protocol):
    """What the sync worker needs of the agent besides its store, and nothing more."""

    def current_mode(self) -> Mode:
        """The site mode in force."""

    def set_mode(self, mode: Mode, *, source: str) -> None:
        """Switch the site mode (a central command) and record it."""

    def set_stale_cutoff(self, cutoff: int | None) -> None:
        """Apply (or lift, with None) the stale-list policy."""

    def record_event(self, event: Event) -> None:
        """Append an event to the chain; raises ``StoreError``."""


class SyncWorker:
    """The agent's side of the MQTT link."""

    def __init__(self, host: SyncHost, store: Store, config: SyncConfig,
                 keys: dict[str, Ed25519PublicKey], *, gateway: str, site: str,
                 tls: TlsFiles | None = None, password: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.store = store
        self.config = config
        self.keys = keys
        self.gateway = gateway
        self.site = site
        self.topics = Topics(self.gateway, config.prefix)
        self._clock = clock
        self._inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._last_rx = 0.0
        self._last_status = 0.0
        self._inflight: InFlight | None = None
        self._staging: Staging | None = None
        self._resync_reason: str | None = None
        self._last_resync = 0.0
        self._refusal_logged: dict[str, float] = {}
        self._stale: bool | None = None
        self._last_stale_check = 0.0
        self._last_connect_warning = -60.0
        self._started = clock()
        self.counters = Counters()
        self._client = self._make_client(tls, password)

    # -- set-up ----------------------------------------------------------------------

    def _make_client(self, tls: TlsFiles | None, password: str | None) -> mqtt.Client:
        v5 = self.config.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.gateway,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False)
        if tls is not None:
            try:
                client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert),
                               keyfile=str(tls.key), tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise SecretError(f"sync TLS files (ca {tls.ca}, cert {tls.cert}, key "
                                  f"{tls.key}) are not a usable certificate/key set: "
                                  f"{exc}") from exc
        if self.config.username:
            client.username_pw_set(self.config.username, password)
        client.will_set(self.topics.outbound("status"), Status(
            type="status", gateway=self.gateway, state="offline").model_dump_json(),
            qos=1, retain=True)
        client.reconnect_delay_set(1, 60)
        client.max_inflight_messages_set(20)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        return client

    def start(self) -> None:
        """Connect in the background and start the worker thread."""
        properties = None
        if self.config.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(
            self.config.host, self.config.port, keepalive=self.config.keepalive_s,
            clean_start=False if self.config.protocol == "5" else
            mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=properties)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Say offline, disconnect, and stop both threads."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            if self._connected:
                info = self._client.publish(self.topics.outbound("status"), Status(
                    type="status", gateway=self.gateway, state="offline",
                    ts_ms=self._now_ms()).model_dump_json(), qos=1, retain=True)
                info.wait_for_publish(1.0)
            self._client.disconnect()
        except (RuntimeError, ValueError, OSError) as exc:
            log.warning("mqtt_disconnect_failed", error=str(exc))
        self._client.loop_stop()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- paho callbacks: hand off only ------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self._inbox.put(("connected", str(reason), bool(getattr(flags, "session_present",
                                                                False)),
                         not getattr(reason, "is_failure", False)))

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        self._inbox.put(("connect_failed",))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._inbox.put(("disconnected", str(reason)))

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put(("message", message.topic, bytes(message.payload)))

    # -- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                try:
                    item = self._inbox.get(timeout=TICK_S)
                except queue.Empty:
                    item = None
                if item is not None:
                    self._dispatch(item)
                self._tick()
            except Exception as exc:  # the worker's one broad boundary: log, go on
                log.exception("sync_worker_error", error=str(exc))
                self._stop.wait(1.0)

    def _dispatch(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "connected":
            _, reason, session_present, ok = item
            if not ok:
                log.warning("mqtt_connect_refused", reason=reason)
                return
            self._connected = True
            self._last_rx = time.monotonic()
            self.counters.reconnects += 1
            self._no_delay()
            log.info("mqtt_connected", host=self.config.host, session_present=session_present)
            for topic in self.topics.subscriptions():
                self._client.subscribe(topic, qos=1)
            self._inflight = None  # resend from the first unacknowledged event
            if not session_present and self._staging is not None:
                # The broker lost our session (restarted without persistence, or the
                # session expired): the rest of the snapshot's chunks will not come.
                log.warning("snapshot_lost_with_session", version=self._staging.manifest.seq)
                self._abort_snapshot()
            self._publish_status()
            versions = self._versions()
            if versions.get("list", 0) == 0:
                self._request_resync("no_list")
            elif self._staging is None and versions.get(STAGING, 0) > versions["list"]:
                # A snapshot was being staged when the agent stopped (a crash, a power
                # cut): the chunks it had taken from the broker are gone with it, and the
                # rest are ignored without their manifest, so ask for the list again now
                # rather than at the next heartbeat (up to 15 min with serve's default).
                self._request_resync("interrupted_snapshot")
        elif kind == "connect_failed":
            now = time.monotonic()
            if now - self._last_connect_warning >= 60.0:
                self._last_connect_warning = now
                log.warning("mqtt_connect_failed", host=self.config.host,
                            port=self.config.port, hint="broker unreachable, TLS handshake "
                            "refused, or certificate not accepted; retrying with back-off")
        elif kind == "disconnected":
            if self._connected:
                log.warning("mqtt_disconnected", reason=item[1])
            self._connected = False
        elif kind == "message":
            self._last_rx = time.monotonic()
            self._on_central(item[1], item[2])

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_stale_check >= 1.0:
            self._last_stale_check = now
            self._check_stale()
        if not self._connected:
            return
        if now - self._last_status >= self.config.status_interval_s:
            self._publish_status()
        if self._resync_reason and now - self._last_resync >= self.config.resync_interval_s:
            self._send_resync()
        self._pump_outbox(now)
        silent = now - self._last_rx
        if silent > 3 * self.config.status_interval_s + self.config.keepalive_s:
            # Our own retained status should have echoed back several times by now: the
            # link is dead even if paho still says connected (paho #891). Close the socket
            # under paho so its loop notices and reconnects.
            log.warning("mqtt_link_silent", silent_s=round(silent, 1))
            self._last_rx = now
            sock = self._client.socket()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _no_delay(self) -> None:
        """Turn off Nagle's algorithm on paho's socket (paho leaves it on).

        With it on, the next event batch waits behind the still unacknowledged PUBACK of
        the last ``event_ack`` until the broker's delayed TCP ACK (about 40 ms on Linux),
        so one batch went per ~90 ms round trip (tests/test_sync_faults.py drained 2-event
        batches at ~23 events/s)."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- outbound ----------------------------------------------------------------------

    def _publish(self, kind: str, payload: str, *, retain: bool = False) -> bool:
        info = self._client.publish(self.topics.outbound(kind), payload, qos=1, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _pump_outbox(self, now: float) -> None:
        store = self._store()
        if self._inflight is not None:
            if now - self._inflight.sent_at < self.config.ack_timeout_s:
                return
            log.warning("event_ack_timeout", first=self._inflight.first,
                        last=self._inflight.last)
            self._inflight = None
        first = store.first_unacked()
        if first is None:
            return
        events = store.events(after_seq=first - 1, limit=self.config.batch_size)
        if not events:
            return
        batch = EventBatch(type="events", gateway=self.gateway,
                           events=[WireEvent.model_validate(e.as_dict()) for e in events])
        if self._publish("events", batch.model_dump_json()):
            self._inflight = InFlight(events[0].seq, events[-1].seq, now)
            self.counters.batches_sent += 1

    def _publish_status(self) -> None:
        self._last_status = time.monotonic()
        store = self._store()
        states: dict[str, dict[str, Any]] = {}
        for row in store.device_states():
            states.setdefault(row["kind"], {})[row["id"]] = json.loads(row["state"])
        status = Status(
            type="status", gateway=self.gateway, state="online", ts_ms=self._now_ms(),
            site=self.site, versions=self._versions(),
            outbox=store.counts()["outbox"], mode=self.host.current_mode().value,
            clock=states.get("system", {}).get("clock", {}).get("state"),
            stale=bool(self._stale), doors=states.get("door", {}),
            readers=states.get("reader", {}), refused=dict(self.counters.refused))
        self._publish("status", status.model_dump_json(), retain=True)

    def _applied(self, stream: str, seq: int | None, status: str,
                 reason: str | None = None) -> None:
        if not self._connected:
            return
        message = Applied(type="applied", gateway=self.gateway, stream=stream, seq=seq,
                          status=status,  # type: ignore[arg-type]
                          reason=reason, list_version=self._versions().get("list", 0),
                          ts_ms=self._now_ms())
        self._publish("applied", message.model_dump_json())

    def _request_resync(self, reason: str) -> None:
        if self._resync_reason is None:
            self._resync_reason = reason

    def _send_resync(self) -> None:
        versions = self._versions()
        request = ResyncRequest(
            type="resync", gateway=self.gateway, reason=self._resync_reason or "requested",
            list_version=versions.get("list", 0), rev_seq=versions.get("rev", 0),
            all_seq=versions.get("all", 0), ts_ms=self._now_ms())
        if self._publish("request", request.model_dump_json()):
            log.info("resync_requested", reason=request.reason)
            self._last_resync = time.monotonic()
            self._resync_reason = None

    # -- inbound ------------------------------------------------------------------------

    def _on_central(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.outbound("status"):
            return  # our own status coming back: it only proves the link works
        stream = stream_of(topic, self.gateway, self.config.prefix)
        if stream is None:
            log.debug("mqtt_message_ignored", topic=topic)
            return
        seq: int | None = None
        try:
            if stream == "list" and is_chunk(payload):
                self._on_chunk(payload)
                return
            body = open_envelope(payload, topic, self.keys, self.config.max_message_bytes)
            message = parse_central(body)
            seq = message.seq
            self._check_header(stream, message)
            self._handle(stream, message)
        except RefusedError as refused:
            if seq is None and self._staging is not None and stream == "list":
                seq = self._staging.manifest.seq
            self._refuse(stream, seq, refused)
        except StoreError as exc:
            log.error("sync_apply_failed", stream=stream, seq=seq, error=str(exc))
            self._applied(stream, seq, "refused", "store_error")

    def _check_header(self, stream: str, message: Any) -> None:
        if message.type not in STREAM_TYPES[stream]:
            raise RefusedError("wrong_stream", f"a {message.type} on the {stream} topic")
        target = "*" if stream == "all" else self.gateway
        if message.gateway != target:
            raise RefusedError("wrong_target", f"addressed to {message.gateway!r}")
        now = self._clock()
        if now >= message.expires_at:
            raise RefusedError("expired", f"expired at {message.expires_at}, now {int(now)}")
        if message.issued_at > now + MAX_CLOCK_SKEW_S:
            raise RefusedError("from_future", f"issued at {message.issued_at}, now {int(now)}")

    def _handle(self, stream: str, message: Any) -> None:
        if isinstance(message, EventAck):
            self._on_ack(message)
            return
        last = self._versions().get(stream, 0)
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

    def _on_ack(self, ack: EventAck) -> None:
        store = self._store()
        upto = min(ack.upto, store.last_seq())
        store.mark_acked(upto)
        if self._inflight is not None and upto >= self._inflight.last:
            self._inflight = None

    def _on_heartbeat(self, hb: Heartbeat) -> None:
        self._store().set_stream("hb", hb.seq, {"issued_at": hb.issued_at,
                                                "expires_at": hb.expires_at})
        versions = self._versions()
        if (hb.list_version > versions.get("list", 0) or hb.rev_seq > versions.get("rev", 0)
                or hb.all_seq > versions.get("all", 0)):
            self._request_resync("behind_heartbeat")
        self._check_stale()

    def _on_command(self, cmd: Command) -> None:
        if cmd.action in ("lockdown", "free_passage", "normal"):
            self.host.set_mode(Mode(cmd.action), source=f"central command {cmd.seq}")
            # Kept apart from the cmd stream, so a later status or resync command does not
            # make a restart forget the commanded mode.
            self._store().set_stream("mode", cmd.seq, {"mode": cmd.action})
        elif cmd.action == "resync":
            self._request_resync("command")
            self._last_resync = 0.0
        elif cmd.action == "status":
            self._publish_status()
        self._store().set_stream("cmd", cmd.seq, {"action": cmd.action})
        self._applied("cmd", cmd.seq, "applied")

    def _on_revocation(self, stream: str, rev: Revocation, last: int) -> None:
        items = [(unb64(item.hash), item.kind) for item in rev.items]
        self._store().revoke(items, version=rev.seq, stream=stream)
        self._list_event("revocations_applied", stream, rev.seq, {"count": len(items)})
        if rev.seq > last + 1:
            self._request_resync("gap")
        self._applied(stream, rev.seq, "applied")

    def _on_snapshot(self, manifest: Snapshot) -> None:
        if self._staging is not None:
            log.warning("snapshot_superseded", version=self._staging.manifest.seq)
        store = self._store()
        store.set_stream(STAGING, manifest.seq)  # first: see "interrupted_snapshot"
        store.begin_snapshot()
        self._staging = Staging(manifest)
        log.info("snapshot_started", version=manifest.seq, chunks=len(manifest.chunk_sha256),
                 entries=manifest.entries)

    def _on_chunk(self, payload: bytes) -> None:
        staging = self._staging
        if staging is None:
            log.debug("snapshot_chunk_ignored")  # a duplicate after the snapshot applied
            return
        manifest = staging.manifest
        expected = manifest.chunk_sha256[staging.next_index]
        if chunk_digest(payload) != expected:
            self._abort_snapshot()
            raise RefusedError("bad_chunk", f"chunk {staging.next_index} of version "
                               f"{manifest.seq} does not match its manifest hash")
        store = self._store()
        try:
            chunk = parse_chunk(payload, self.config.max_message_bytes)
            if chunk.version != manifest.seq or chunk.index != staging.next_index:
                raise RefusedError("bad_chunk", f"got chunk {chunk.index} of version "
                                   f"{chunk.version}, expected {staging.next_index} of "
                                   f"{manifest.seq}")
            store.add_snapshot_chunk([entry_of(e) for e in chunk.entries],
                                     [(unb64(r.hash), r.kind) for r in chunk.revoked])
        except (RefusedError, StoreError) as exc:
            # Any failed chunk ends this snapshot: the old list stays whole, and the office
            # is asked for a fresh one rather than left waiting for a last chunk.
            self._abort_snapshot()
            reason = exc.reason if isinstance(exc, RefusedError) else "bad_chunk"
            raise RefusedError(reason, str(exc)) from None
        staging.next_index += 1
        if staging.next_index < len(manifest.chunk_sha256):
            return
        self._staging = None
        try:
            store.commit_snapshot(manifest.seq, {"rev": manifest.rev_seq,
                                                 "all": manifest.all_seq},
                                  (manifest.entries, manifest.revoked))
        except StoreError as exc:
            self._abort_snapshot()
            raise RefusedError("bad_snapshot", str(exc)) from None
        self._list_event("snapshot_applied", "list", manifest.seq,
                         {"entries": manifest.entries, "revoked": manifest.revoked})
        self._applied("list", manifest.seq, "applied")

    def _abort_snapshot(self) -> None:
        self._staging = None
        try:
            self._store().abort_snapshot()
        except StoreError as exc:
            log.error("snapshot_abort_failed", error=str(exc))
        self._request_resync("bad_snapshot")

    def _on_delta(self, delta: Delta, current: int) -> None:
        if delta.base != current:
            self._request_resync("gap")
            raise RefusedError("gap", f"delta on version {delta.base}, the list is at "
                               f"{current}")
        self._store().apply_delta(delta.base, delta.seq,
                                  [entry_of(e) for e in delta.upsert],
                                  [unb64(c) for c in delta.remove])
        self._list_event("delta_applied", "list", delta.seq,
                         {"upserted": len(delta.upsert), "removed": len(delta.remove)})
        self._applied("list", delta.seq, "applied")

    # -- refusals, staleness, helpers --------------------------------------------------

    def _refuse(self, stream: str, seq: int | None, refused: RefusedError) -> None:
        self.counters.refused[refused.reason] += 1
        log.warning("sync_message_refused", stream=stream, seq=seq, reason=refused.reason,
                    detail=refused.detail)
        now = time.monotonic()
        if now - self._refusal_logged.get(refused.reason, -REFUSAL_EVENT_EVERY_S) >= \
                REFUSAL_EVENT_EVERY_S:
            self._refusal_logged[refused.reason] = now
            self._record(Event("sync_refused", reason=refused.reason, data={
                "stream": stream, "seq": seq, "detail": refused.detail[:200],
                "count": self.counters.refused[refused.reason]}))
        self._applied(stream, seq, "refused", refused.reason)

    def _check_stale(self) -> None:
        detail = self._store().stream_detail("hb")
        reference = float(detail["issued_at"]) if detail else self._started
        now = self._clock()
        stale = now - reference > self.config.heartbeat_max_age_s
        if stale and self.config.offline_policy == "recent_only":
            self.host.set_stale_cutoff(int(now - self.config.recent_window_h * 3600))
        elif self._stale:
            self.host.set_stale_cutoff(None)
        if stale != self._stale:
            if stale or self._stale is not None:
                kind = "sync_stale" if stale else "sync_fresh"
                self._record(Event(kind, data={"heartbeat_age_s": int(now - reference),
                                               "policy": self.config.offline_policy}))
                (log.error if stale else log.info)(kind, age_s=int(now - reference))
            self._stale = stale

    def _list_event(self, kind: str, stream: str, seq: int, data: dict[str, Any]) -> None:
        self._record(Event(kind, data={"stream": stream, "seq": seq, **data}))
        log.info(kind, stream=stream, seq=seq, **data)
        self.counters.applied += 1

    def _record(self, event: Event) -> None:
        try:
            self.host.record_event(event)
        except StoreError as exc:
            log.error("event_not_recorded", kind=event.kind, error=str(exc))

    def _store(self) -> Store:
        return self.store

    def _versions(self) -> dict[str, int]:
        versions: dict[str, int] = self._store().versions()
        return versions

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


def entry_of(entry: Entry) -> CredentialEntry:
    """A wire allowlist entry as a store entry."""
    return CredentialEntry(
        cred=unb64(entry.cred), permit=None if entry.permit is None else unb64(entry.permit),
        valid_from=entry.valid_from, valid_until=entry.valid_until, doors=entry.doors,
        schedule=entry.schedule or "always", confirmed_at=entry.confirmed_at)
