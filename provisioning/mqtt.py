"""The office's broker connections: settings, client set-up, the one-shot link.

Both connections use the serving client's id and persistent session (MQTT 5, Clean
Start 0, the same Session Expiry): ``serve`` keeps it (``provisioning.serve``); a one-shot
command resumes it without consuming it (``OneShotLink``).

With a share group (``--share GROUP``) several ``serve`` instances, each under its own
client id, subscribe to ``$share/GROUP/pg/v1/gw/+/out/#`` and the broker hands each
gateway message to one of them. Their sessions then end with their connections (Session
Expiry 0 unless given): Mosquitto goes on sharing messages out to a disconnected
member's persistent session (checked with Mosquitto 2.0.11: after one of two members was
cut off, every second message queued for it), so a killed instance would swallow half of
the traffic until it came back. With sessions that end, the messages it held unacked are
dropped by the broker and the others get everything: a gateway sends unacknowledged
events again after its ack timeout, so none is lost, and the database stores each once.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paho.mqtt.client import Client, ConnectFlags, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol.topics import office_subscription
from provisioning.errors import CentralUsageError, PublishError

DEFAULT_CLIENT_ID = "permitgate-central"
SESSION_EXPIRY_S = 7 * 86_400
"""The broker keeps the serving client's subscription and queues gateway messages for a
week while it is down (mosquitto queues at most 1000 per client by default: B5)."""
SHARED_SESSION_EXPIRY_S = 0
"""A member of a share group: its session ends with its connection (module docstring)."""
SHARE_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""An MQTT 5 share name may not hold '/', '+' or '#'; this keeps it plain."""


def _no_delay(_client: Client, _userdata: Any, sock: Any) -> None:
    """Turn off Nagle's algorithm on a new broker connection (paho leaves it on).

    With it on, a message published right after a small unacknowledged packet (the
    manual PUBACK of the last gateway message) waits for the broker's delayed TCP ACK,
    about 40 ms on Linux: bench/revocation.py measured a p50 of 49 ms from revoke to the
    gateway's ``applied``, almost all of it this wait."""
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where the broker is and how the office connects to it (the TLS files checked:
    ``CentralUsageError`` naming the option)."""

    host: str = "localhost"
    port: int = 1883
    client_id: str = DEFAULT_CLIENT_ID
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 10.0
    session_expiry_s: int | None = None
    """None: ``SESSION_EXPIRY_S``, or ``SHARED_SESSION_EXPIRY_S`` in a share group."""
    share_group: str | None = None
    """Subscribe as a member of this MQTT 5 share group (several ``serve`` instances)."""

    def __post_init__(self) -> None:
        if self.share_group is not None and not SHARE_GROUP_RE.match(self.share_group):
            raise CentralUsageError(f"--share {self.share_group!r}: 1-64 letters, digits, "
                                    "'_' and '-'")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CentralUsageError("--tls-cert and --tls-key go together")
        for option, path in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert),
                             ("--tls-key", self.tls_key)):
            if path is not None and not path.is_file():
                raise CentralUsageError(f"{option} {path}: no such file")

    @property
    def where(self) -> str:
        """``broker HOST:PORT``, for messages."""
        return f"broker {self.host}:{self.port}"

    def new_client(self, *, manual_ack: bool) -> Client:
        """A paho MQTT 5 client under the office's id, with TLS if configured."""
        client = Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=self.client_id, protocol=MQTTProtocolVersion.MQTTv5,
                        manual_ack=manual_ack)
        client.connect_timeout = self.connect_timeout_s
        # Reconnect back-off capped at 60 s (B6: the default cap is 120 s).
        client.reconnect_delay_set(1, 60)
        ca, cert, key = self.tls_ca, self.tls_cert, self.tls_key
        if ca is not None or cert is not None:
            client.tls_set(ca_certs=str(ca) if ca else None,
                           certfile=str(cert) if cert else None,
                           keyfile=str(key) if key else None)
        client.on_socket_open = _no_delay
        return client

    @property
    def session_expiry(self) -> int:
        """The Session Expiry Interval asked for (s)."""
        if self.session_expiry_s is not None:
            return self.session_expiry_s
        return SESSION_EXPIRY_S if self.share_group is None else SHARED_SESSION_EXPIRY_S

    def subscription(self) -> str:
        """What ``serve`` subscribes to: every gateway's outbound topics, shared with the
        other members of its share group if it has one."""
        topic = office_subscription()
        return topic if self.share_group is None else f"$share/{self.share_group}/{topic}"

    def connect_properties(self) -> Properties:
        """CONNECT properties: the session's expiry."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry
        return props


class OneShotLink:
    """A one-shot command's connection: connected before any sequence number is spent,
    and every message acknowledged by the broker before ``flush`` returns."""

    def __init__(self, broker: BrokerSettings) -> None:
        self._broker = broker
        self._client: Client | None = None
        self._connected = threading.Event()
        self._connect_rc: ReasonCode | None = None
        self._pending: list[MQTTMessageInfo] = []

    @property
    def connected(self) -> bool:
        """Whether ``connect`` has succeeded (and ``close`` not yet run)."""
        return self._client is not None

    def connect(self) -> None:
        """Connect, once; ``PublishError`` when the broker refuses or does not answer."""
        if self._client is not None:
            return
        broker = self._broker
        # The serving client's id and session, resumed (clean start off, same expiry) and
        # never acknowledging anything: gateway messages queued for the office while serve
        # is down stay queued for it (the broker redelivers unacknowledged ones), and the
        # session is neither wiped (clean start) nor shortened (expiry 0) by a tool. With
        # the shipped broker (use_username_as_clientid) the id is the certificate's CN
        # anyway, so a distinct id would not help.
        client = broker.new_client(manual_ack=True)

        def on_connect(_c: Client, _u: Any, _f: ConnectFlags, rc: ReasonCode,
                       _p: Properties | None) -> None:
            self._connect_rc = rc
            self._connected.set()

        client.on_connect = on_connect
        self._connected.clear()
        try:
            client.connect(broker.host, broker.port, keepalive=30, clean_start=False,
                           properties=broker.connect_properties())
        except (OSError, ValueError) as exc:
            raise PublishError(f"{broker.where}: cannot connect: {exc}") from None
        client.loop_start()
        ok = self._connected.wait(broker.connect_timeout_s)
        rc = self._connect_rc
        if not ok or rc is None or rc.is_failure:
            client.loop_stop()
            with contextlib.suppress(OSError):
                client.disconnect()
            why = "no answer" if not ok or rc is None else str(rc)
            raise PublishError(f"{broker.where}: connection refused or not confirmed "
                               f"({why})")
        self._client = client

    def send(self, topic: str, payload: bytes) -> None:
        """Hand one QoS 1 message to paho; ``flush`` waits for its acknowledgement. Called
        by the one-shot caller, or by the chunk pacer's thread while the caller waits for
        it (``Pacer.drain``, before ``flush``)."""
        if self._client is None:
            raise PublishError("not connected to a broker")
        self._pending.append(self._client.publish(topic, payload, qos=1))

    def flush(self) -> None:
        """Wait until the broker has acknowledged every message sent (``PublishError``
        after ``publish_timeout_s``)."""
        pending, self._pending = self._pending, []
        broker = self._broker
        deadline = time.monotonic() + broker.publish_timeout_s
        for info in pending:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                raise PublishError(f"{broker.where}: publish failed: {exc}") from None
            if not info.is_published():
                raise PublishError(f"{broker.where}: no acknowledgement within "
                                   f"{broker.publish_timeout_s:g} s (the sequence numbers "
                                   "are spent; gateways recover by resync)")

    def close(self) -> None:
        """Disconnect, if connected."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()
