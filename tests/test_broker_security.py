"""The shipped broker configuration and ACL (config/mosquitto/), run by a real Mosquitto
with certificates made by provisioning.pki, against paho MQTT 5 clients.

The broker runs config/mosquitto/permitgate.conf with only its listener, file paths, log
destination and user rewritten (tests/broker.py), and config/mosquitto/acl unchanged.

Absence of a message is shown without sleeping: after the forbidden publish is answered,
a permitted marker is sent along the same path; Mosquitto delivers to one subscriber in
order, so once the marker has arrived anything routed before it would have too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol.topics import INBOUND_KINDS, Topics
from provisioning import pki
from tests.broker import Broker, BrokerPool, TlsFiles
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "config" / "mosquitto" / "permitgate.conf"
ACL = REPO / "config" / "mosquitto" / "acl"
WAIT_S = 10.0
NOT_AUTHORIZED = 0x87
IMPLEMENTATION_SPECIFIC_ERROR = 0x83
SIZE_LIMIT = 4 * 1024 * 1024  # message_size_limit in permitgate.conf
NEVER_EXPIRES = 0xFFFFFFFF

GW_A = Topics("gw-a")
GW_B = Topics("gw-b")


# -- the site ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A running broker and the PEM folders of its CA and of a foreign CA."""

    broker: Broker
    pki: Path
    foreign: Path


def _site_pki(folder: Path) -> None:
    # The provisioning CLI itself, as an installer would run it.
    assert pki.main(["init", str(folder), "--broker-host", "localhost",
                     "--broker-host", "127.0.0.1"]) == 0
    for gateway in ("gw-a", "gw-b"):
        assert pki.main(["client", str(folder), gateway]) == 0


@pytest.fixture
def site(tmp_path: Path, brokers: BrokerPool) -> Site:
    """The shipped configuration and ACL on a broker with a fresh site PKI."""
    folder = tmp_path / "pki"
    _site_pki(folder)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    foreign_ca = pki.make_ca("someone else's CA")
    pki.write_pem(foreign, "gw-a", *pki.make_client_cert(foreign_ca, "gw-a"))
    broker = brokers.start(
        tls=TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key",
                     folder / "crl.pem"),
        acl_file=ACL, template=TEMPLATE)
    return Site(broker, folder, foreign)


# -- a recording client -------------------------------------------------------------------


class Peer:
    """A paho MQTT 5 client whose callbacks only record what happened (they run on
    paho's network thread)."""

    def __init__(self, broker: Broker, client_id: str, *, ca: Path | None,
                 cert: tuple[Path, Path] | None, persistent: bool = False,
                 protocol: MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        self.name = client_id
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  protocol=protocol, client_id=client_id)
        # A refused client must not hammer the broker while the test looks on.
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        if ca is not None:
            certfile, keyfile = (str(cert[0]), str(cert[1])) if cert else (None, None)
            self.client.tls_set(ca_certs=str(ca), certfile=certfile, keyfile=keyfile)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connacks: list[tuple[ReasonCode, bool]] = []
        self.disconnects: list[ReasonCode] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.connect_error: Exception | None = None
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._broker = broker
        self._persistent = persistent
        self._protocol = protocol
        self._started = False

    # callbacks (network thread)

    def _on_connect(self, _c: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, _p: Properties | None) -> None:
        with self._lock:
            self.connacks.append((reason, flags.session_present))

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags,
                       reason: ReasonCode, _p: Properties | None) -> None:
        with self._lock:
            self.disconnects.append(reason)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode,
                    _p: Properties) -> None:
        with self._lock:
            self.pubacks[mid] = reason

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode],
                      _p: Properties | None) -> None:
        with self._lock:
            self.subacks[mid] = reasons

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put((message.topic, bytes(message.payload)))

    # actions (test thread)

    def start(self) -> None:
        """Open the connection and the network thread without waiting for the CONNACK;
        a refusal during the TLS handshake is kept in ``connect_error``."""
        try:
            if self._protocol == mqtt.MQTTv5:
                # paho's Properties.__init__ has no annotations.
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                if self._persistent:
                    properties.SessionExpiryInterval = NEVER_EXPIRES
                self.client.connect(self._broker.host, self._broker.port, keepalive=30,
                                    clean_start=not self._persistent, properties=properties)
            else:
                assert not self._persistent, "persistent sessions are tested with MQTT 5"
                self.client.connect(self._broker.host, self._broker.port, keepalive=30)
        except OSError as exc:  # ssl.SSLError is an OSError
            self.connect_error = exc
            return
        self.client.loop_start()
        self._started = True

    def connect(self) -> bool:
        """Connect and wait for a successful CONNACK; return Session Present."""
        self.start()
        assert self.connect_error is None, f"{self.name}: {self.connect_error!r}"
        wait_for(lambda: bool(self.connacks), f"{self.name}'s CONNACK")
        reason, session_present = self.connacks[0]
        assert reason.value == 0, f"{self.name} refused: {reason}"
        return session_present

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        """Subscribe at QoS 1 and return the SUBACK reason codes, one per filter."""
        result, mid = self.client.subscribe([(f, 1) for f in filters])
        assert result == mqtt.MQTT_ERR_SUCCESS, result
        assert mid is not None
        wait_for(lambda: mid in self.subacks, f"{self.name}'s SUBACK")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        wait_for(lambda: info.mid in self.pubacks, f"{self.name}'s PUBACK on {topic}")
        return self.pubacks[info.mid]

    def receive(self) -> tuple[str, bytes]:
        """The next message delivered, waiting at most WAIT_S."""
        try:
            return self.messages.get(timeout=WAIT_S)
        except queue.Empty:
            pytest.fail(f"{self.name} received nothing within {WAIT_S} s")

    def receive_until(self, marker: bytes) -> list[tuple[str, bytes]]:
        """Every message delivered up to and including the one carrying ``marker``."""
        received = [self.receive()]
        while received[-1][1] != marker:
            received.append(self.receive())
        return received

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        if self._started:
            self.client.disconnect()
            self.client.loop_stop()
            self._started = False


class Peers:
    """Makes clients of the site; ``peers("gw-a")`` uses gw-a's certificate and client id."""

    def __init__(self, site: Site) -> None:
        self._site = site
        self._made: list[Peer] = []

    def __call__(self, name: str, *, client_id: str | None = None,
                 cert_folder: Path | None = None, with_cert: bool = True, tls: bool = True,
                 persistent: bool = False,
                 protocol: MQTTProtocolVersion = mqtt.MQTTv5) -> Peer:
        folder = cert_folder or self._site.pki
        cert = (folder / f"{name}.crt", folder / f"{name}.key") if with_cert else None
        peer = Peer(self._site.broker, client_id or name,
                    ca=self._site.pki / "ca.crt" if tls else None, cert=cert,
                    persistent=persistent, protocol=protocol)
        self._made.append(peer)
        return peer

    def close(self) -> None:
        """Close every client made; raise the first error once all were tried."""
        errors: list[Exception] = []
        for peer in self._made:
            try:
                peer.close()
            except Exception as exc:  # noqa: BLE001 -- close all, then report the first
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def peers(site: Site) -> Iterator[Peers]:
    """Client factory for the site; every client is closed at teardown."""
    made = Peers(site)
    try:
        yield made
    finally:
        made.close()


def connected(make: Peers, name: str, *subscriptions: str,
              persistent: bool = False) -> Peer:
    """A connected client, subscribed to ``subscriptions`` (all granted)."""
    peer = make(name, persistent=persistent)
    peer.connect()
    if subscriptions:
        reasons = peer.subscribe(*subscriptions)
        assert [r.value for r in reasons] == [1] * len(subscriptions), reasons
    return peer


def assert_refused(peer: Peer, broker: Broker, reason_in_log: str | None) -> None:
    """The connection attempt never got a CONNACK and was cut by the broker."""
    peer.start()
    if peer.connect_error is None:
        # TLS 1.3: the client's handshake completes before the server has checked the
        # client certificate; the server's alert then closes the connection.
        wait_for(lambda: bool(peer.disconnects), f"{peer.name} to be disconnected")
    if reason_in_log is not None:
        wait_for(lambda: reason_in_log in broker.log(), f"{reason_in_log!r} in the log")
    assert peer.connacks == [], peer.connacks
    assert f"as {peer.name} " not in broker.log()


# -- what a gateway may do ----------------------------------------------------------------


def test_gateway_events_reach_central(peers: Peers) -> None:
    """A gateway's event published on its own outbound topic is delivered to central."""
    central = connected(peers, "central", "pg/v1/gw/+/out/#")
    gw_a = connected(peers, "gw-a")

    assert gw_a.publish(GW_A.outbound("events"), b"event-1").value == 0
    assert central.receive() == (GW_A.outbound("events"), b"event-1")


def test_gateway_subscriptions_of_the_wire_protocol_are_granted_and_delivered(
        peers: Peers) -> None:
    """Every subscription agent.wire makes is granted, and each inbound kind, the broadcast
    and the gateway's own retained status reach it."""
    central = connected(peers, "central", "pg/v1/gw/+/out/#")
    gw_a = connected(peers, "gw-a")
    assert gw_a.publish(GW_A.outbound("status"), b"online", retain=True).value == 0
    assert central.receive() == (GW_A.outbound("status"), b"online")

    reasons = gw_a.subscribe(*GW_A.subscriptions())
    assert [r.value for r in reasons] == [1] * len(GW_A.subscriptions())
    assert gw_a.receive() == (GW_A.outbound("status"), b"online")  # the retained echo
    for kind in INBOUND_KINDS:
        assert central.publish(GW_A.inbound(kind), kind.encode()).value == 0
        assert gw_a.receive() == (GW_A.inbound(kind), kind.encode())
    assert central.publish(GW_A.broadcast_revocations, b"rev").value == 0
    assert gw_a.receive() == (GW_A.broadcast_revocations, b"rev")


def test_central_command_reaches_only_its_gateway(peers: Peers) -> None:
    """A command central sends to gw-a reaches gw-a and never gw-b."""
    central = connected(peers, "central")
    gw_a = connected(peers, "gw-a", *GW_A.subscriptions())
    gw_b = connected(peers, "gw-b", *GW_B.subscriptions())

    assert central.publish(GW_A.inbound("cmd"), b"unlock").value == 0
    assert gw_a.receive() == (GW_A.inbound("cmd"), b"unlock")
    assert central.publish(GW_B.inbound("hb"), b"marker").value == 0
    assert gw_b.receive_until(b"marker") == [(GW_B.inbound("hb"), b"marker")]


# -- what a gateway may not do --------------------------------------------------------------


def test_gateway_cannot_impersonate_another(peers: Peers) -> None:
    """gw-a publishing on gw-b's outbound topic gets PUBACK "Not authorized" (0x87) and
    central never sees it."""
    central = connected(peers, "central", "pg/v1/gw/+/out/#")
    gw_a = connected(peers, "gw-a")

    reason = gw_a.publish(GW_B.outbound("events"), b"forged")
    assert reason.value == NOT_AUTHORIZED, reason
    assert str(reason) == "Not authorized"
    assert gw_a.publish(GW_A.outbound("events"), b"marker").value == 0
    assert central.receive_until(b"marker") == [(GW_A.outbound("events"), b"marker")]


def test_gateway_cannot_read_another_gateways_inbound(
        peers: Peers) -> None:
    """gw-a subscribing to gw-b's inbound topics never receives gw-b's messages (Mosquitto
    2.0.11 answers the SUBACK "granted" and filters each delivery against the ACL)."""
    central = connected(peers, "central")
    gw_b = connected(peers, "gw-b", *GW_B.subscriptions())
    gw_a = connected(peers, "gw-a", GW_A.inbound("+"))

    [reason] = gw_a.subscribe("pg/v1/gw/gw-b/in/#")
    # Either answer keeps gw-b's messages away from gw-a; a failure code would be better
    # and later Mosquitto versions may send one, so the test accepts both.
    assert reason.value in (1, NOT_AUTHORIZED, 0x80), reason
    [wildcard] = gw_a.subscribe("#")
    assert wildcard.value in (1, NOT_AUTHORIZED, 0x80), wildcard

    assert central.publish(GW_B.inbound("cmd"), b"for-b").value == 0
    assert gw_b.receive() == (GW_B.inbound("cmd"), b"for-b")  # it was routed
    assert central.publish(GW_A.inbound("hb"), b"marker").value == 0
    # The marker matches both of gw-a's permitted filters, so it may come twice.
    received = gw_a.receive_until(b"marker")
    assert received == [(GW_A.inbound("hb"), b"marker")], received


def test_gateway_cannot_forge_its_own_commands(peers: Peers) -> None:
    """gw-a publishing on its own inbound command topic is "Not authorized" and is not
    delivered to it."""
    central = connected(peers, "central")
    gw_a = connected(peers, "gw-a", *GW_A.subscriptions())

    for kind in INBOUND_KINDS:
        reason = gw_a.publish(GW_A.inbound(kind), b"forged")
        assert reason.value == NOT_AUTHORIZED, (kind, reason)
    assert central.publish(GW_A.inbound("hb"), b"marker").value == 0
    assert gw_a.receive_until(b"marker") == [(GW_A.inbound("hb"), b"marker")]


def test_gateway_cannot_broadcast_revocations(peers: Peers) -> None:
    """gw-a publishing on the broadcast revocation topic is "Not authorized" and no
    gateway receives it."""
    central = connected(peers, "central")
    gw_b = connected(peers, "gw-b", *GW_B.subscriptions())
    gw_a = connected(peers, "gw-a")

    reason = gw_a.publish(GW_A.broadcast_revocations, b"forged")
    assert reason.value == NOT_AUTHORIZED, reason
    assert central.publish(GW_B.broadcast_revocations, b"marker").value == 0
    assert gw_b.receive_until(b"marker") == [(GW_B.broadcast_revocations, b"marker")]


def test_gateway_cannot_take_over_another_gateways_session(
        peers: Peers) -> None:
    """gw-a connecting with client id "gw-b" gets a session of its own, so the messages
    queued for the offline gw-b survive and reach it."""
    central = connected(peers, "central")
    gw_b = connected(peers, "gw-b", *GW_B.subscriptions(), persistent=True)
    gw_b.close()
    assert central.publish(GW_B.inbound("rev"), b"before").value == 0

    intruder = peers("gw-a", client_id="gw-b", persistent=True)
    # use_username_as_clientid: the broker files it under "gw-a", where nothing waits.
    assert intruder.connect() is False
    intruder.close()
    assert central.publish(GW_B.inbound("rev"), b"after").value == 0

    gw_b_again = peers("gw-b", persistent=True)
    assert gw_b_again.connect() is True
    assert gw_b_again.receive() == (GW_B.inbound("rev"), b"before")
    assert gw_b_again.receive() == (GW_B.inbound("rev"), b"after")


# -- who may connect ------------------------------------------------------------------------


def test_client_without_certificate_is_refused(site: Site,
                                               peers: Peers) -> None:
    """A TLS client that presents no certificate never gets a CONNACK."""
    assert_refused(peers("gw-a", client_id="no-cert", with_cert=False), site.broker,
                   "peer did not return a certificate")


def test_client_with_certificate_from_another_ca_is_refused(
        site: Site, peers: Peers) -> None:
    """A certificate with a valid-looking CN but signed by another CA is refused."""
    assert_refused(peers("gw-a", client_id="foreign-ca", cert_folder=site.foreign),
                   site.broker, "certificate verify failed")


def test_plain_anonymous_connection_to_tls_port_is_refused(
        site: Site, peers: Peers) -> None:
    """Plain MQTT without TLS or credentials on the listener is cut off."""
    assert_refused(peers("anonymous", tls=False, with_cert=False), site.broker, None)


# -- queueing settings ----------------------------------------------------------------------


def test_queued_messages_survive_broker_restart(site: Site,
                                                peers: Peers) -> None:
    """QoS 1 messages queued for an offline gateway's persistent session are delivered
    after a clean broker restart (persistence true)."""
    central = connected(peers, "central")
    gw_b = connected(peers, "gw-b", *GW_B.subscriptions(), persistent=True)
    gw_b.close()
    payloads = [f"rev-{i}".encode() for i in range(50)]
    for payload in payloads:
        assert central.publish(GW_B.inbound("rev"), payload).value == 0

    site.broker.restart()

    gw_b_again = peers("gw-b", persistent=True)
    assert gw_b_again.connect() is True
    assert [gw_b_again.receive() for _ in payloads] == [
        (GW_B.inbound("rev"), p) for p in payloads]


def test_payloads_over_the_size_limit_are_dropped(site: Site, peers: Peers) -> None:
    """A payload of exactly message_size_limit bytes is delivered; one byte more is
    acknowledged but never forwarded, and the publisher stays connected."""
    # central speaks MQTT 3.1.1 here. Mosquitto 2.0.11 answers an MQTT 5 publisher with
    # PUBACK reason 0x95 "Packet too large" (its man page says 0x83), a code MQTT 5 does
    # not allow in a PUBACK; paho 2.2 fails to decode it, drops the connection and
    # republishes the message on reconnect, forever. Central must check sizes itself.
    central = peers("central", protocol=mqtt.MQTTv311)
    central.connect()
    gw_a = connected(peers, "gw-a", *GW_A.subscriptions())

    largest = b"x" * SIZE_LIMIT
    assert central.publish(GW_A.inbound("list"), largest).value == 0
    assert gw_a.receive() == (GW_A.inbound("list"), largest)
    central.publish(GW_A.inbound("list"), largest + b"x")
    assert central.publish(GW_A.inbound("hb"), b"marker").value == 0
    assert gw_a.receive_until(b"marker") == [(GW_A.inbound("hb"), b"marker")]
    assert "Dropped too large PUBLISH from central" in site.broker.log()
    assert central.disconnects == []
