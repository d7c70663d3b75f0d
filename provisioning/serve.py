"""The serving loop: one worker thread does all database work and all publishing.

``Worker.run()`` turns the calling thread into that worker; paho's network thread only
hands messages to its queue (an exception in a paho callback can kill paho's thread, and
publishing from several threads could interleave a snapshot's chunks). While ``run()`` is
active, work submitted from other threads (``Worker.submit``) is queued to the worker and
waits for its answer. A gateway message is acknowledged to the broker only once handled.
The one other thread that publishes is the chunk pacer's (``provisioning.pacing.Pacer``,
through ``Worker.publish``): it hands over the chunks of a long snapshot, and what must
follow them to that gateway, at the paced rate, in order, after the unit of work that
published the snapshot's manifest has ended.

Several ``serve`` instances can share one (PostgreSQL) database and the gateways' traffic
(``BrokerSettings.share_group``: an MQTT 5 shared subscription, ``$share/<group>/…``;
the broker hands each message to one of them). Each gateway's messages must still reach
it in the order their numbers were allocated, whichever instance sends them: every unit
of the worker's work (one gateway message, one submitted job, the heartbeats, the
chores) runs between ``PublishOrder.begin`` and ``end``; an allocation inside it takes
its gateway's turn, which is given back only after the messages sent under it are with
the broker (their PUBACKs). Acks take no turn, so storing and acknowledging events, the
bulk of the work, never waits for another instance. Heartbeats go out from one instance
(``PublishOrder.leads``).

An ``events`` message identical to one handled since it arrived is not handled again: a
gateway resends its batch when no ack came within its ack timeout, and while a city's
backlog drains a batch can wait longer than that in the queue, so its copies pile up
behind it; the ack of the first copy answers them (bench/office_ingest.py: with 1,000
gateways draining at once, most resent copies were answered this way).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import structlog
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from provisioning.errors import CentralError, PublishError
from provisioning.mqtt import BrokerSettings

log = structlog.get_logger()

T = TypeVar("T")

DEFAULT_HEARTBEAT_EVERY_S = 900.0
"""``serve`` sends heartbeats every 15 min: four chances within one heartbeat's TTL."""
MAX_QUEUED_MESSAGES = 10_000
"""paho's queue is memory only (B6): bound it; the protocol recovers anything lost."""
MAX_COVERED = 100_000
"""Events batches remembered for answering their queued copies (``Worker._covered``)."""
EVENTS_TOPIC_END = "/out/events"
CHORES_EVERY_S = 0.2
"""While messages keep coming, the chores run at most this often (each costs database
reads: the request queue, deferred resyncs); whenever the queue is empty, at once."""


class PublishOrder(Protocol):
    """How the ``serve`` instances of one database keep each gateway's messages in order
    (see the module docstring)."""

    def begin(self, flush: Callable[[], None]) -> None:
        """A unit of work starts on the worker; ``flush`` returns once every message sent
        so far is with the broker (or the publish timeout has passed)."""

    def end(self) -> None:
        """The unit ends: flush and give back the turn taken in it, if any."""

    def leads(self) -> bool:
        """Whether this instance sends the periodic heartbeats now."""


class _OnePublisher:
    """The publishing order of a lone ``serve`` (``central.db``): nothing to arrange."""

    def begin(self, flush: Callable[[], None]) -> None:
        """Nothing to do: one publisher is in order by itself."""

    def end(self) -> None:
        """Nothing to give back."""

    def leads(self) -> bool:
        """Always: there is no other."""
        return True


ONE_PUBLISHER: PublishOrder = _OnePublisher()


@dataclass(slots=True)
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int
    """Which connection delivered it: a packet id means nothing on the next one."""
    arrival: int = 0
    """Its place among the messages this worker received (``Worker._covered``)."""


@dataclass(slots=True)
class _Job:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


@dataclass(frozen=True, slots=True)
class Duties:
    """What the worker does besides running submitted work."""

    on_message: Callable[[str, bytes], None]
    """Handle one gateway message (topic, payload); acknowledged to the broker after."""
    heartbeat_all: Callable[[], Mapping[str, int]]
    """Send every gateway a heartbeat."""
    chores: Callable[[], None]
    """Run whenever the queue is empty, and at least every ``CHORES_EVERY_S`` while it
    is not: deferred resyncs, requests from one-shot commands."""


class Worker:
    """The worker of ``serve`` (see the module docstring)."""

    def __init__(self, broker: BrokerSettings, request_timeout_s: float,
                 order: PublishOrder = ONE_PUBLISHER) -> None:
        self._broker = broker
        self._request_timeout_s = request_timeout_s
        self._order = order
        self._queue: queue.Queue[_Incoming | _Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._client: Client | None = None
        self._connection = 0
        self._sent: list[MQTTMessageInfo] = []
        """Messages handed to paho in the current unit of work (``_flush`` waits)."""
        self._arrivals = 0
        """Messages received so far (paho's thread counts, the worker reads)."""
        self._covered: dict[tuple[str, bytes], int] = {}
        """An events message handled, by topic and payload digest: the arrival count when
        its ack had been published. A copy that arrived by then is answered by that ack."""
        self.subscribed = threading.Event()
        """Set once the serving client's subscription is acknowledged (tests wait on it)."""

    @property
    def active(self) -> bool:
        """Whether ``run()`` is active."""
        return self._thread is not None

    def submit(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker while ``run()`` is active, else here."""
        worker = self._thread
        if worker is None or threading.current_thread() is worker:
            return fn()
        job = _Job(fn)
        self._queue.put(job)
        try:
            return cast(T, job.future.result(timeout=self._request_timeout_s))
        except FutureTimeout:
            raise CentralError(f"the central worker did not answer within "
                               f"{self._request_timeout_s:g} s") from None

    def send(self, topic: str, payload: bytes) -> None:
        """Hand one QoS 1 message to the serving client (worker thread only); the unit of
        work waits for its acknowledgement where instances share the gateways
        (``PublishOrder``)."""
        info = self.publish(topic, payload)
        if info is not None:
            self._sent.append(info)

    def publish(self, topic: str, payload: bytes) -> MQTTMessageInfo | None:
        """Hand one QoS 1 message to the serving client, from any thread (paho's
        ``publish`` is thread-safe); nothing waits for its acknowledgement. None when
        paho refused it."""
        client = self._client
        if client is None:
            raise PublishError("not connected to a broker")
        info = client.publish(topic, payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # NO_CONN: paho keeps it and sends it on reconnect; anything lost is recovered
            # by the protocol (gap → resync, missing ack → the gateway resends events).
            log.warning("publish_not_sent", topic=topic, rc=int(info.rc))
            return None
        return info

    def _flush(self) -> None:
        """Wait until the broker has acknowledged every message sent in this unit of work
        (at most the publish timeout): then another instance's next message for the same
        gateway cannot overtake them. A message not acknowledged in time is logged; the
        protocol recovers it as it recovers a lost one."""
        sent, self._sent = self._sent, []
        deadline = time.monotonic() + self._broker.publish_timeout_s
        for info in sent:
            # Not queued (no connection): is_published() is False below.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                log.warning("publish_not_confirmed", mid=info.mid,
                            timeout_s=self._broker.publish_timeout_s)
                return

    @contextlib.contextmanager
    def _unit(self) -> Iterator[None]:
        """One unit of the worker's work, in publishing order with other instances."""
        self._order.begin(self._flush)
        try:
            yield
        finally:
            try:
                self._order.end()
            finally:
                self._sent = []  # acknowledged or not, no longer waited for

    def run(self, stop: threading.Event, duties: Duties, *,
            heartbeat_every_s: float | None = None) -> None:
        """Receive and do ``duties`` until ``stop`` is set; the calling thread becomes the
        worker. With ``heartbeat_every_s`` every gateway gets a heartbeat right after the
        first connection and then at that interval."""
        connected = threading.Event()
        client = self._serving_client(connected)
        self._client = client
        self._thread = threading.current_thread()
        client.loop_start()
        try:
            self._loop(stop, connected, duties, heartbeat_every_s)
        finally:
            self._thread = None
            while True:
                try:
                    left = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(left, _Job):
                    left.future.set_exception(CentralError("central stopped"))
                # An unacknowledged gateway message is redelivered by the broker on the
                # next start (persistent session).
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001 - shutting down; the loop is stopped next
                log.warning("central_disconnect_failed")
            try:
                client.loop_stop()
            except Exception:  # noqa: BLE001 - shutting down
                log.warning("central_loop_stop_failed")
            self._client = None
            self.subscribed.clear()

    def _serving_client(self, connected: threading.Event) -> Client:
        """The persistent-session client of ``run()``; its callbacks only hand off."""
        broker = self._broker
        client = broker.new_client(manual_ack=True)
        client.max_queued_messages_set(MAX_QUEUED_MESSAGES)
        topic = broker.subscription()

        def on_connect(c: Client, _u: Any, flags: ConnectFlags, rc: ReasonCode,
                       _p: Properties | None) -> None:
            if rc.is_failure:
                log.warning("central_connect_refused", reason=str(rc))
                return
            self._connection += 1
            log.info("central_connected", session_present=flags.session_present,
                     client_id=broker.client_id, share_group=broker.share_group)
            # Subscribing here (paho's network thread) makes it survive reconnects.
            c.subscribe(topic, qos=1)
            connected.set()

        def on_subscribe(_c: Client, _u: Any, _mid: int, codes: list[ReasonCode],
                         _p: Properties | None) -> None:
            if all(not code.is_failure for code in codes):
                self.subscribed.set()
                log.info("central_subscribed", topic=topic)
            else:
                log.error("central_subscribe_refused", reasons=[str(c) for c in codes])

        def on_message(_c: Client, _u: Any, msg: MQTTMessage) -> None:
            self._arrivals += 1
            self._queue.put(_Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos,
                                      self._connection, self._arrivals))

        def on_disconnect(_c: Client, _u: Any, _f: DisconnectFlags, rc: ReasonCode,
                          _p: Properties | None) -> None:
            connected.clear()
            log.info("central_disconnected", reason=str(rc))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.on_disconnect = on_disconnect
        client.connect_async(broker.host, broker.port, keepalive=30, clean_start=False,
                             properties=broker.connect_properties())
        return client

    def _loop(self, stop: threading.Event, connected: threading.Event, duties: Duties,
              heartbeat_every_s: float | None) -> None:
        next_hb = time.monotonic() if heartbeat_every_s else float("inf")
        next_chores = time.monotonic()
        failures = 0
        while not stop.is_set():
            try:
                item: _Incoming | _Job | None = self._queue.get(timeout=CHORES_EVERY_S)
            except queue.Empty:
                item = None
            try:
                if isinstance(item, _Job):
                    with self._unit():
                        self._run_job(item)
                elif item is not None:
                    self._handle(item, duties.on_message)
                if heartbeat_every_s and connected.is_set() and time.monotonic() >= next_hb:
                    next_hb = time.monotonic() + heartbeat_every_s
                    # One instance sends them; another asks again an interval later (and
                    # leads once the leader's database session is gone).
                    if self._order.leads():
                        with self._unit():
                            sent = duties.heartbeat_all()
                        log.info("heartbeats_published", gateways=len(sent))
                    else:
                        log.info("heartbeats_sent_by_another_instance",
                                 next_check_s=heartbeat_every_s)
                if self._queue.empty() or time.monotonic() >= next_chores:
                    next_chores = time.monotonic() + CHORES_EVERY_S
                    with self._unit():
                        duties.chores()
                failures = 0
            except Exception:
                # The worker loop is the one broad boundary: log, back off (capped), go on.
                failures += 1
                log.exception("central_worker_failed", failures=failures)
                stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))

    @staticmethod
    def _run_job(job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            job.future.set_exception(exc)

    def _handle(self, msg: _Incoming, on_message: Callable[[str, bytes], None]) -> None:
        key = None
        if msg.topic.endswith(EVENTS_TOPIC_END):
            key = (msg.topic, hashlib.sha256(msg.payload).digest())
        try:
            if key is not None and self._covered.get(key, 0) >= msg.arrival:
                # A gateway sent this batch again (its ack timeout passed while the batch
                # waited in a queue) before the ack of an earlier copy, handled meanwhile,
                # was published: that ack answers this copy too. A copy that arrives after
                # the ack is handled (and acked) again: that ack may have been lost.
                log.info("events_copy_answered_already", topic=msg.topic)
                return
            with self._unit():
                on_message(msg.topic, msg.payload)
            if key is not None:
                if len(self._covered) >= MAX_COVERED:
                    self._covered.clear()  # forgetting costs only a redundant store
                self._covered[key] = self._arrivals
        finally:
            client = self._client
            if client is not None and msg.qos > 0 and msg.connection == self._connection:
                # Acknowledged only once handled (stored, or counted as malformed): a crash
                # before this leaves the message with the broker for the next start. One
                # from an earlier connection is redelivered on this one and acked then.
                client.ack(msg.mid, msg.qos)
