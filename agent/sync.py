"""Sync with the central office over MQTT (protocol: docs/protocol.md, the ``protocol`` package).

This module is the link: the MQTT client, the worker thread, the outbox pump, status
publishing and every timer (status interval, resync pacing, ack timeout, staleness checks,
the silent-link watchdog). What the gateway does with each central message is
``agent.sync_apply.Applier``, which has no MQTT in it; the worker hands it every inbound
message and implements its ``Outbound`` interface.

One worker thread owns everything. paho's network thread only hands messages and
connection changes to the worker through a queue (an exception in a paho callback can kill
its thread, and publishing from several threads can deadlock it).

Delivery does not rest on paho or the broker: an event leaves the outbox only when the
central office acknowledges it with a signed ``event_ack``; unacknowledged events are sent
again after ``ack_timeout_s`` or a reconnect. A dead link is detected by traffic (the
gateway's own retained status echoes back to it), not by ``is_connected()``.

Reconnecting is the worker's too, not paho's: the client is made with
``reconnect_on_failure=False``, so paho's network thread ends after a failed connect or a
lost link, and the worker, after a back-off (1 s doubling to 60 s, reset by a successful
connect), points the client at the next broker of ``sync.brokers`` (``connect_async``) and
starts a new network thread. Only the worker changes where the client connects, and only
while no network thread runs, so a failover cannot race paho's own reconnect.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__
from agent.config import SyncConfig
from agent.inbox import BULK_STREAMS, Inbox
from agent.site_keys import RekeyReports
from agent.sync_apply import STAGING, Applier, Counters, SyncHost, entry_of
from agent.yielding import CardPath
from common.memory import trim_heap
from common.sqlite import StoreError
from protocol.hashing import SecretError
from protocol.messages import (
    BEHIND_COMMAND,
    Applied,
    EventBatch,
    Status,
    StatusSettings,
    WireEvent,
)
from protocol.signing import unb64
from protocol.topics import Topics, stream_of

if TYPE_CHECKING:
    from agent.store import Store, StoredEvent

__all__ = ["STAGING", "Counters", "SyncHost", "SyncWorker", "TlsFiles", "entry_of",
           "fit_batch"]

log = structlog.get_logger()

SESSION_EXPIRY_S = 7 * 86_400
"""The broker keeps the gateway's subscriptions and queued QoS 1 messages (revocations
sent while it was offline) this long after a disconnect."""
TICK_S = 0.05
SYNC_STATE = ("system", "sync")
"""The device-state row where the worker records its link state, staleness and refusal
counts, for ``permitgate status`` (another process)."""
RECORD_EVERY_S = 1.0
"""That row is rewritten at most this often (a flood of refusals is one write a second)."""
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 60.0
"""The back-off between connect attempts: 1 s after a lost link or a failed attempt,
doubling with each failure (whichever broker it was), at most 60 s (B6: paho's own cap of
120 s is too long for revocations), back to 1 s once a broker accepts the connection."""


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


class SyncWorker:
    """The agent's side of the MQTT link (and the applier's ``Outbound``)."""

    def __init__(self, host: SyncHost, store: Store, config: SyncConfig,
                 keys: dict[str, Ed25519PublicKey], *, gateway: str, site: str,
                 tls: TlsFiles | None = None, password: str | None = None,
                 clock: Callable[[], float] = time.time,
                 card_path: CardPath | None = None) -> None:
        self.host = host
        self.store = store
        self.config = config
        self.gateway = gateway
        self.site = site
        self.topics = Topics(self.gateway, config.prefix)
        self._clock = clock
        self._inbox = Inbox(store.path.parent / "spool")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._last_rx = 0.0
        self._last_status = 0.0
        self._inflight: InFlight | None = None
        self._resync_reason: str | None = None
        self._last_resync = -math.inf
        self._command_request = False
        """A ``behind_command`` request is due (kept apart from the snapshot request: the
        office answers it with the latest commands, not a list)."""
        self._last_command_request = -math.inf
        self._endpoints = config.endpoints
        self._endpoint = 0
        """The index in ``_endpoints`` of the broker being tried or in use."""
        self._generation = 0
        """Which network thread a connection event comes from: events of an earlier one
        (read after the worker moved on) are ignored."""
        self._retry_at: float | None = None
        """When to try the next broker (monotonic), after the current attempt failed."""
        self._backoff = RECONNECT_MIN_S
        self._last_stale_check = -math.inf
        self._last_connect_warning = -60.0
        self._recorded: tuple[str, int] | None = None
        self._last_record = -math.inf
        self.applier = Applier(store, host, keys, gateway=gateway, config=config,
                               outbound=self, clock=clock)
        self._card_path = card_path or CardPath()
        """The agent's card path: the worker steps aside while it is busy (agent/yielding.py)."""
        self.applier.between_steps = self._between_steps
        self._trimmed_at = 0
        self.rekeys = RekeyReports(gateway)
        """Cards known only under the previous site key, for the office (``rekey``)."""
        self.counters: Counters = self.applier.counters
        self._client = self._make_client(tls, password)

    # -- set-up ----------------------------------------------------------------------

    def _make_client(self, tls: TlsFiles | None, password: str | None) -> mqtt.Client:
        v5 = self.config.protocol == "5"
        # reconnect_on_failure=False: the network thread ends when a connect fails or the
        # link drops, and the worker reconnects (to the next broker): see the module doc.
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.gateway,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False, reconnect_on_failure=False)
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
            type="status", gateway=self.gateway, state="offline",
            version=__version__).model_dump_json(),
            qos=1, retain=True)
        # No wait inside paho's thread (its first-connect retry would otherwise sleep there
        # before ending); the worker keeps the back-off.
        client.reconnect_delay_set(0, 0)
        client.max_inflight_messages_set(20)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        return client

    def start(self) -> None:
        """Connect in the background (to the first broker) and start the worker thread."""
        self._record_state(force=True)  # the counters of the previous run are gone
        self._connect_async()
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)
        self._thread.start()

    @property
    def broker(self) -> tuple[str, int]:
        """``(host, port)`` of the broker being tried or in use."""
        return self._endpoints[self._endpoint]

    def _where(self) -> dict[str, Any]:
        """The broker being tried or in use, as log fields."""
        host, port = self.broker
        return {"host": host, "port": port}

    def _connect_async(self) -> None:
        """Point the client at the current broker (no network thread may run)."""
        host, port = self._endpoints[self._endpoint]
        properties = None
        if self.config.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(
            host, port, keepalive=self.config.keepalive_s,
            clean_start=False if self.config.protocol == "5" else
            mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=properties)

    def _attempt_failed(self) -> None:
        """The current attempt failed, or its link dropped: the next broker, after the
        back-off (once per attempt, however many events say so)."""
        if self._retry_at is not None:
            return
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RECONNECT_MAX_S)
        self._endpoint = (self._endpoint + 1) % len(self._endpoints)

    def _reconnect(self) -> None:
        """Start the next attempt: the last network thread has ended (or is about to: it
        reported its failure as its last act), so it is joined before the client is
        pointed elsewhere."""
        self._retry_at = None
        try:
            self._client.loop_stop()
            # loop_start makes a new socket pair (the network thread's wake-up channel)
            # every time and nothing closes the last one: close it, or each reconnect
            # leaks two sockets (paho 2.2; they would go, with a ResourceWarning, at exit).
            with contextlib.suppress(AttributeError):  # without it: only that leak
                self._client._reset_sockets(sockpair_only=True)  # noqa: SLF001 - see above
            self._generation += 1
            log.debug("mqtt_connecting", **self._where())
            self._connect_async()
            self._client.loop_start()
        except (OSError, RuntimeError, ValueError) as exc:
            log.error("mqtt_reconnect_failed", **self._where(), error=str(exc))
            self._attempt_failed()

    def stop(self, timeout: float = 3.0) -> None:
        """Say offline, disconnect, and stop both threads."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            if self._connected:
                info = self._client.publish(self.topics.outbound("status"), Status(
                    type="status", gateway=self.gateway, state="offline",
                    ts_ms=self.applier.now_ms(), version=__version__).model_dump_json(),
                    qos=1, retain=True)
                info.wait_for_publish(1.0)
            self._client.disconnect()
        except (RuntimeError, ValueError, OSError) as exc:
            log.warning("mqtt_disconnect_failed", error=str(exc))
        self._client.loop_stop()
        self._connected = False
        self._record_state(force=True, link="stopped")

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- paho callbacks: hand off only ------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self._inbox.put(("connected", self._generation, str(reason),
                         bool(getattr(flags, "session_present", False)),
                         not getattr(reason, "is_failure", False)))

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        self._inbox.put(("connect_failed", self._generation))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._inbox.put(("disconnected", self._generation, str(reason)))

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if stream_of(topic, self.gateway, self.config.prefix) in BULK_STREAMS:
            self._inbox.put_bulk(topic, bytes(message.payload))
        else:
            self._inbox.put(("message", topic, bytes(message.payload)))

    # -- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=TICK_S)
                if item is not None:
                    self._card_path.wait_idle()
                    self._dispatch(item)
                elif not self.store.reclaim_step():  # idle: empty a replaced list, a step a tick
                    self._trim_after_bulk()
                self._tick()
            except Exception as exc:  # the worker's one broad boundary: log, go on
                log.exception("sync_worker_error", error=str(exc))
                self._stop.wait(1.0)

    def _trim_after_bulk(self) -> None:
        """Once idle after list messages (a snapshot parses hundreds of chunks), hand the
        heap's free pages back to the system: glibc keeps them otherwise, and the agent's
        resident set would stay that much higher (bench/load.py)."""
        if self._inbox.bulk_taken != self._trimmed_at:
            self._trimmed_at = self._inbox.bulk_taken
            trim_heap()

    def _between_steps(self) -> None:
        self._card_path.wait_idle()
        self._take_urgent()

    def _take_urgent(self) -> None:
        """Apply the urgent messages waiting (agent/inbox.py), in the middle of a long
        bulk item. Connection changes wait for the worker's loop: they may end the bulk
        item's snapshot, which must not happen under its feet."""
        while (item := self._inbox.take_urgent()) is not None:
            self._card_path.wait_idle()
            self._dispatch(item)

    def _dispatch(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind != "message" and item[1] != self._generation:
            return  # from a network thread the worker has already replaced
        if kind == "connected":
            _, _, reason, session_present, ok = item
            if not ok:
                log.warning("mqtt_connect_refused", **self._where(), reason=reason)
                self._attempt_failed()
                return
            self._connected = True
            self._backoff = RECONNECT_MIN_S
            self._last_rx = time.monotonic()
            self.counters.reconnects += 1
            self._no_delay()
            log.info("mqtt_connected", **self._where(), session_present=session_present)
            for topic in self.topics.subscriptions():
                self._client.subscribe(topic, qos=1)
            self._inflight = None  # resend from the first unacknowledged event
            self.applier.on_connected(session_present)
            self._publish_status()
        elif kind == "connect_failed":
            now = time.monotonic()
            if now - self._last_connect_warning >= 60.0:
                self._last_connect_warning = now
                log.warning("mqtt_connect_failed", **self._where(),
                            hint="broker unreachable, TLS handshake refused, or certificate "
                            "not accepted; retrying with back-off"
                            + (", the next broker of sync.brokers each time"
                               if len(self._endpoints) > 1 else ""))
            self._attempt_failed()
        elif kind == "disconnected":
            if self._connected:
                log.warning("mqtt_disconnected", **self._where(), reason=item[2])
            self._connected = False
            self._attempt_failed()
        elif kind == "message":
            self._last_rx = time.monotonic()
            topic, payload = item[1], item[2]
            if topic != self.topics.outbound("status"):
                # (our own status coming back only proves that the link works)
                self.applier.handle(topic, payload)
            if stream_of(topic, self.gateway, self.config.prefix) == "hb":
                # The office is listening now (it heartbeats as it starts, then every 15
                # minutes): a batch still unacknowledged may have been sent while it was
                # not, so it goes again now rather than at the ack timeout (the office
                # keeps each seq once and acknowledges a copy like the original).
                self._inflight = None

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_stale_check >= 1.0:
            self._last_stale_check = now
            self.applier.check_stale()
        self._record_state()
        if self._retry_at is not None and now >= self._retry_at:
            self._reconnect()
        if not self._connected:
            return
        if now - self._last_status >= self.config.status_interval_s:
            self._publish_status()
        if self._resync_reason and now - self._last_resync >= self.config.resync_interval_s:
            self._send_resync()
        if (self._command_request
                and now - self._last_command_request >= self.config.resync_interval_s):
            self._send_command_request()
        self._pump_outbox(now)
        if (rekey := self.rekeys.take(self.applier.now_ms())) is not None:
            self._publish("rekey", rekey.model_dump_json())
            try:  # the enrollments made here follow their cards to the new key
                self.store.tenants.rekey([(unb64(o), unb64(n)) for o, n in rekey.pairs])
            except StoreError as exc:
                log.error("tenants_not_rekeyed", error=str(exc))
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

    def _record_state(self, *, force: bool = False, link: str | None = None) -> None:
        """Record the link state, staleness and refusal counts where ``permitgate status``
        reads them, when they changed (at most once a second unless ``force``)."""
        link = link or ("connected" if self._connected else "disconnected")
        key = (link, self.applier.changes)
        now = time.monotonic()
        if not force and (key == self._recorded or now - self._last_record < RECORD_EVERY_S):
            return
        self._recorded, self._last_record = key, now
        state = {"state": link, "stale": self.applier.stale,
                 "refused": dict(sorted(self.counters.refused.items()))}
        try:
            self.store.set_device_state(*SYNC_STATE, json.dumps(state))
        except (StoreError, sqlite3.Error, OSError) as exc:  # set_device_state raises raw
            log.error("sync_state_not_recorded", error=str(exc))

    # -- outbound: the link ------------------------------------------------------------

    def _publish(self, kind: str, payload: str, *, retain: bool = False) -> bool:
        info = self._client.publish(self.topics.outbound(kind), payload, qos=1, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _pump_outbox(self, now: float) -> None:
        if self._inflight is not None:
            if now - self._inflight.sent_at < self.config.ack_timeout_s:
                return
            log.warning("event_ack_timeout", first=self._inflight.first,
                        last=self._inflight.last)
            self._inflight = None
        first = self.store.first_unacked()
        if first is None:
            return
        events = self.store.events(after_seq=first - 1, limit=self.config.batch_size)
        if not events:
            return
        attachments = self.store.attachments(events[0].seq, events[-1].seq)
        payload, count = fit_batch(self.gateway, events, self.config.max_message_bytes,
                                   attachments, anchor=self._anchor_before(events[0].seq))
        if self._publish("events", payload):
            self._inflight = InFlight(events[0].seq, events[count - 1].seq, now)
            self.counters.batches_sent += 1

    def _anchor_before(self, first: int) -> tuple[int, str] | None:
        """The chain anchor (seq and hash of the newest pruned event) when it is the
        predecessor of event ``first``: an office holding nothing before ``first`` checks
        the first link against it."""
        seq, digest = self.store.meta("chain_anchor_seq"), self.store.meta("chain_anchor_hash")
        if seq is None or digest is None or int(seq) != first - 1:
            return None
        return int(seq), digest

    def _publish_status(self) -> None:
        self._last_status = time.monotonic()
        store = self.store
        states: dict[str, dict[str, Any]] = {}
        for row in store.device_states():
            states.setdefault(row["kind"], {})[row["id"]] = json.loads(row["state"])
        status = Status(
            type="status", gateway=self.gateway, state="online", ts_ms=self.applier.now_ms(),
            site=self.site, versions=self.applier.versions(),
            outbox=store.counts("outbox")["outbox"], mode=self.host.current_mode().value,
            clock=states.get("system", {}).get("clock", {}).get("state"),
            stale=bool(self.applier.stale), doors=states.get("door", {}),
            readers=states.get("reader", {}), refused=dict(self.counters.refused),
            settings=StatusSettings(heartbeat_max_age_s=self.config.heartbeat_max_age_s,
                                    max_message_bytes=self.config.max_message_bytes,
                                    batch_size=self.config.batch_size),
            version=__version__)
        self._publish("status", status.model_dump_json(), retain=True)

    def _send_resync(self) -> None:
        request = self.applier.resync_request(self._resync_reason or "requested")
        if self._publish("request", request.model_dump_json()):
            log.info("resync_requested", reason=request.reason)
            self._last_resync = time.monotonic()
            self._resync_reason = None

    def _send_command_request(self) -> None:
        request = self.applier.resync_request(BEHIND_COMMAND)
        if self._publish("request", request.model_dump_json()):
            log.info("resync_requested", reason=BEHIND_COMMAND)
            self._last_command_request = time.monotonic()
            self._command_request = False

    # -- Outbound (for the applier) ------------------------------------------------------

    def send_applied(self, message: Applied) -> None:
        """Publish an ``applied`` report (dropped while disconnected: the office sees the
        versions in the next status)."""
        if self._connected:
            self._publish("applied", message.model_dump_json())

    def request_resync(self, reason: str, *, at_once: bool = False) -> None:
        """Keep one pending resync request (the first reason wins); sent when connected
        and ``resync_interval_s`` after the last one, or at the next tick ``at_once``.
        ``behind_command`` is kept apart, paced alike: the office answers it with its
        latest commands, not with a snapshot, so neither may stand in for the other."""
        if reason == BEHIND_COMMAND:
            self._command_request = True
            return
        if self._resync_reason is None:
            self._resync_reason = reason
        if at_once:
            self._last_resync = -math.inf

    def send_status(self) -> None:
        """Publish the status now."""
        if self._connected:
            self._publish_status()

    def report_rekey(self, generation: int, old: bytes, new: bytes) -> None:
        """A card matched only under the previous site key (any thread): its pair of
        hashes goes to the office at the next tick."""
        self.rekeys.add(generation, old, new)

    def events_acked(self, upto: int) -> None:
        """Send the next batch at once when the one in flight is covered."""
        if self._inflight is not None and upto >= self._inflight.last:
            self._inflight = None


def fit_batch(gateway: str, events: Sequence[StoredEvent], max_bytes: int,
              attachments: Mapping[int, str] | None = None, *,
              anchor: tuple[int, str] | None = None) -> tuple[str, int]:
    """The ``events`` message of the first events that fit in ``max_bytes`` (halving the
    count until they do; one event always goes), and how many it holds. ``anchor``, the
    chain anchor ``(seq, hash)`` that precedes the first event, travels with the batch.

    ``batch_size`` bounds the count, but events vary in size: a batch over the broker's
    message size limit would never be forwarded (and, to an MQTT 5 client, answered with a
    PUBACK code paho cannot decode, config/mosquitto/permitgate.conf), so the outbox would
    never drain."""
    held = attachments or {}
    wire = [WireEvent.model_validate({**e.as_dict(), "attachment": held.get(e.seq)})
            for e in events]
    count = len(wire)
    while True:
        payload = EventBatch(type="events", gateway=gateway, events=wire[:count],
                             anchor_seq=None if anchor is None else anchor[0],
                             anchor_hash=None if anchor is None else anchor[1]
                             ).model_dump_json()
        if count == 1 or len(payload.encode()) <= max_bytes:
            return payload, count
        count = max(1, count // 2)
