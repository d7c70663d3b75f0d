"""Tests for the pacing of snapshot chunks (``provisioning.publish.Pacer``, ``chunk_rate``).

The office is the real ``Central`` (serving in a thread, or one-shot) on a real Mosquitto;
the gateways' side is a raw paho client that notes when each message for them arrives.
Assertions are on the order of arrivals and on the least time the rate implies (a paced
sender can be late, never early): no test asserts how fast anything is.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.client import Client, ConnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol.messages import Snapshot, chunk_digest, is_chunk, parse_central, parse_chunk
from protocol.signing import load_trusted_keys, open_envelope
from protocol.topics import Topics
from provisioning.central import (
    DEFAULT_CHUNK_RATE,
    TRUSTED_KEYS_NAME,
    Central,
    CentralUsageError,
    keygen,
)
from provisioning.central_cli import build_parser, main
from provisioning.pacing import PACING_BURST_S
from tests.broker import Broker
from tests.conftest import wait_for

WAIT_S = 30.0
"""Upper bound for what a test waits for; a bound on failure, not an expectation."""
MAX_BYTES = 16 * 1024 * 1024
RATE = 100_000
"""Bytes a second in the paced tests: the lists below take about 2.5 s to send."""
CARDS = 2_000
CHUNK = 50
"""Entries per chunk: 40 chunks of about 6.5 kB, so the burst allowance
(``PACING_BURST_S`` of the rate) is a few of them and the rest is paced."""
GATEWAYS = ("gw1", "gw2")


def card(gateway: str, i: int) -> str:
    """Card ``i`` of ``gateway``."""
    return f"em4100:{0xA000000000 + GATEWAYS.index(gateway) * 0x100000 + i:010X}"


@dataclass(frozen=True, slots=True)
class Arrival:
    """One message for a gateway, as the gateway's side received it."""

    at: float
    topic: str
    payload: bytes


class Recorder:
    """A raw MQTT client on every gateway's inbound topics, noting each arrival's
    ``time.monotonic()`` (paho's network thread)."""

    def __init__(self, broker: Broker, keys: dict[str, Ed25519PublicKey]) -> None:
        self.keys = keys
        self._lock = threading.Lock()
        self._got: list[Arrival] = []
        subscribed = threading.Event()
        self.client = Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"pacing-{uuid.uuid4().hex[:8]}",
                             protocol=MQTTProtocolVersion.MQTTv5)

        def on_connect(c: Client, _u: Any, _f: ConnectFlags, _rc: ReasonCode,
                       _p: Properties | None) -> None:
            c.subscribe([(Topics(gw).inbound("+"), 1) for gw in GATEWAYS])

        def on_subscribe(_c: Client, _u: Any, _m: int, _codes: list[ReasonCode],
                         _p: Properties | None) -> None:
            subscribed.set()

        def on_message(_c: Client, _u: Any, msg: MQTTMessage) -> None:
            arrival = Arrival(time.monotonic(), msg.topic, bytes(msg.payload))
            with self._lock:
                self._got.append(arrival)

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(WAIT_S), "the recorder was not subscribed"

    def arrivals(self) -> list[Arrival]:
        """Everything received so far, in arrival order."""
        with self._lock:
            return list(self._got)

    def manifest(self, gateway: str, version: int) -> Snapshot:
        """The manifest of list ``version`` for ``gateway`` (waits for it)."""
        topic = Topics(gateway).inbound("list")

        def found() -> Snapshot | None:
            for a in self.arrivals():
                if a.topic == topic and not is_chunk(a.payload):
                    body = parse_central(open_envelope(a.payload, topic, self.keys,
                                                       MAX_BYTES))
                    if isinstance(body, Snapshot) and body.seq == version:
                        return body
            return None

        return wait_for(found, f"the manifest of version {version} for {gateway}", WAIT_S)

    def chunks(self, gateway: str, version: int) -> list[Arrival]:
        """The chunks of list ``version`` received for ``gateway`` so far, in order."""
        topic = Topics(gateway).inbound("list")
        return [a for a in self.arrivals() if a.topic == topic and is_chunk(a.payload)
                and parse_chunk(a.payload, MAX_BYTES).version == version]

    def whole(self, gateway: str, version: int) -> list[Arrival]:
        """Every chunk of list ``version`` (waits for the last), each checked against the
        manifest: its digest, its index, nothing missing or out of order."""
        manifest = self.manifest(gateway, version)
        count = len(manifest.chunk_sha256)
        wait_for(lambda: len(self.chunks(gateway, version)) >= count,
                 f"{count} chunks of version {version} for {gateway}", WAIT_S)
        got = self.chunks(gateway, version)
        assert [chunk_digest(a.payload) for a in got] == manifest.chunk_sha256
        assert [parse_chunk(a.payload, MAX_BYTES).index for a in got] == list(range(count))
        return got

    def first(self, topic: str) -> Arrival:
        """The first message received on ``topic`` (waits for it)."""
        return wait_for(lambda: next((a for a in self.arrivals() if a.topic == topic), None),
                        f"a message on {topic}", WAIT_S)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Office:
    """A central folder with two gateways of ``CARDS`` cards each, its broker and keys."""

    folder: Path
    broker: Broker

    def central(self, **options: Any) -> Central:
        """A new ``Central`` on this folder and broker."""
        return Central(self.folder, self.broker.host, self.broker.port, **options)


@pytest.fixture
def office(tmp_path: Path, broker: Broker) -> Office:
    """Keys made by ``keygen``; gateways gw1 and gw2 registered with ``CARDS`` cards."""
    folder = tmp_path / "central"
    keygen(folder)
    with Central(folder, broker.host, broker.port) as central:
        for gateway in GATEWAYS:
            central.add_gateway(gateway, f"site-{gateway}", os.urandom(32))
            central.enroll_many(gateway, [(card(gateway, i), f"P-{gateway}-{i}")
                                          for i in range(CARDS)])
    return Office(folder, broker)


@pytest.fixture
def recorder(office: Office) -> Iterator[Recorder]:
    """The gateways' side, subscribed before anything is published."""
    rec = Recorder(office.broker, load_trusted_keys(office.folder / TRUSTED_KEYS_NAME))
    yield rec
    rec.close()


@pytest.fixture
def serving(office: Office) -> Iterator[Callable[..., Central]]:
    """``Central.run`` in a thread on demand (options for ``Central``); stopped, closed
    and its thread joined at teardown."""
    running: list[tuple[Central, threading.Event, threading.Thread]] = []

    def start(**options: Any) -> Central:
        central = office.central(**options)
        stop = threading.Event()
        thread = threading.Thread(target=central.run, args=(stop,), daemon=True)
        thread.start()
        running.append((central, stop, thread))
        assert central.subscribed.wait(WAIT_S), "central did not subscribe"
        return central

    yield start
    for central, stop, thread in running:
        stop.set()
        thread.join(WAIT_S)
        assert not thread.is_alive(), "run() did not return"
        central.close()


def span(chunks: list[Arrival]) -> float:
    """Seconds from the first chunk's arrival to the last's."""
    return chunks[-1].at - chunks[0].at


def size(chunks: list[Arrival]) -> int:
    """Bytes of the chunks' payloads."""
    return sum(len(a.payload) for a in chunks)


# -- pacing ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["serve", "one-shot"])
def test_paced_snapshot_chunks_arrive_spread_over_the_time_the_rate_implies(
        mode: str, office: Office, recorder: Recorder,
        serving: Callable[..., Central]) -> None:
    """A snapshot's chunks reach the gateway whole and in order, the manifest first, the
    first chunk to the last spread over at least 0.8 times their bytes / the rate (a serving
    office, and a one-shot one that returns only once all of them are handed over)."""
    if mode == "serve":
        version = serving(chunk_rate=RATE).publish_snapshot("gw1", CHUNK)
    else:
        with office.central(chunk_rate=RATE) as central:
            version = central.publish_snapshot("gw1", CHUNK)
    chunks = recorder.whole("gw1", version)
    assert len(chunks) == CARDS // CHUNK
    first = recorder.first(Topics("gw1").inbound("list"))
    body = parse_central(open_envelope(first.payload, first.topic, recorder.keys, MAX_BYTES))
    assert isinstance(body, Snapshot)
    assert body.seq == version
    assert span(chunks) >= 0.8 * size(chunks) / RATE


def test_a_revocation_and_a_command_during_a_paced_snapshot_arrive_before_its_last_chunk(
        recorder: Recorder, serving: Callable[..., Central]) -> None:
    """A revocation and a command for the gateway whose snapshot is being paced go out
    at once: they arrive before the snapshot's last chunk, not after it."""
    central = serving(chunk_rate=RATE)
    version = central.publish_snapshot("gw1", CHUNK)
    central.revoke_card("gw1", card("gw1", 7))
    central.command("gw1", "status")
    rev = recorder.first(Topics("gw1").inbound("rev"))
    cmd = recorder.first(Topics("gw1").inbound("cmd"))
    last = recorder.whole("gw1", version)[-1]
    assert rev.at < last.at
    assert cmd.at < last.at


def test_list_messages_and_heartbeats_wait_behind_the_paced_chunks_of_their_gateway_only(
        recorder: Recorder, serving: Callable[..., Central]) -> None:
    """While a snapshot is paced to gw1, a delta and a heartbeat for gw1 arrive after its
    last chunk (in the order sent), and a heartbeat for gw2 arrives before it."""
    central = serving(chunk_rate=RATE)
    version = central.publish_snapshot("gw1", CHUNK)
    delta = central.publish_delta("gw1", upsert=[card("gw1", 3)])
    central.heartbeat("gw1")
    central.heartbeat("gw2")
    other = recorder.first(Topics("gw2").inbound("hb"))
    hb = recorder.first(Topics("gw1").inbound("hb"))
    chunks = recorder.whole("gw1", version)
    after = [a for a in recorder.arrivals() if a.topic == Topics("gw1").inbound("list")
             and not is_chunk(a.payload)]
    assert len(after) == 2  # the manifest and the delta
    delta_at = after[1]
    body = parse_central(open_envelope(delta_at.payload, delta_at.topic, recorder.keys,
                                       MAX_BYTES))
    assert body.seq == delta
    assert other.at < chunks[-1].at
    assert chunks[-1].at <= delta_at.at <= hb.at


def test_two_gateways_snapshots_are_paced_side_by_side_not_one_after_the_other(
        recorder: Recorder, serving: Callable[..., Central]) -> None:
    """Snapshots to two gateways at once are each paced on its own budget: each spreads
    over its own bytes / rate, and the second's chunks start before the first's end."""
    central = serving(chunk_rate=RATE)
    v1 = central.publish_snapshot("gw1", CHUNK)
    v2 = central.publish_snapshot("gw2", CHUNK)
    gw1, gw2 = recorder.whole("gw1", v1), recorder.whole("gw2", v2)
    assert gw2[0].at < gw1[-1].at
    assert gw1[0].at < gw2[-1].at
    for chunks in (gw1, gw2):
        assert span(chunks) >= 0.8 * size(chunks) / RATE


def test_a_new_snapshot_supersedes_the_chunks_still_paced_of_the_previous_one(
        recorder: Recorder, serving: Callable[..., Central]) -> None:
    """A snapshot published while an earlier one is still being paced to the same gateway
    stops the earlier one's chunks (the gateway would discard its staging anyway): every
    chunk of it that went arrives before the new manifest, and the new one arrives whole."""
    central = serving(chunk_rate=RATE)
    first = central.publish_snapshot("gw1", CHUNK)
    count = len(recorder.manifest("gw1", first).chunk_sha256)
    wait_for(lambda: len(recorder.chunks("gw1", first)) >= count // 5,
             "a fifth of the first snapshot's chunks", WAIT_S)
    second = central.publish_snapshot("gw1", CHUNK)
    recorder.whole("gw1", second)
    manifests = [a for a in recorder.arrivals() if a.topic == Topics("gw1").inbound("list")
                 and not is_chunk(a.payload)]
    sent = recorder.chunks("gw1", first)
    assert count // 5 <= len(sent) < count
    assert sent[-1].at <= manifests[1].at


def test_rate_zero_sends_every_chunk_before_publish_returns(
        office: Office, recorder: Recorder, serving: Callable[..., Central]) -> None:
    """With ``chunk_rate=0`` a snapshot is unpaced: every chunk is handed to the broker
    client before ``publish_snapshot`` returns, so a revocation published right after it
    arrives after the last chunk (on one connection messages keep their order)."""
    central = serving(chunk_rate=0)
    version = central.publish_snapshot("gw1", CHUNK)
    central.revoke_card("gw1", card("gw1", 7))
    rev = recorder.first(Topics("gw1").inbound("rev"))
    chunks = recorder.whole("gw1", version)
    assert chunks[-1].at <= rev.at


def test_a_list_within_the_burst_allowance_goes_out_whole_before_publish_returns(
        recorder: Recorder, serving: Callable[..., Central]) -> None:
    """A list within the burst allowance (``PACING_BURST_S`` of the rate; here a
    2,000-entry list, about 250 kB, at a rate whose allowance is 300 kB) goes out whole as
    unpaced: a revocation published right after it arrives after its last chunk."""
    central = serving(chunk_rate=int(300_000 / PACING_BURST_S))
    version = central.publish_snapshot("gw1", CHUNK)
    central.revoke_card("gw1", card("gw1", 7))
    rev = recorder.first(Topics("gw1").inbound("rev"))
    chunks = recorder.whole("gw1", version)
    assert size(chunks) < 300_000
    assert chunks[-1].at <= rev.at


# -- the setting ----------------------------------------------------------------------


def test_a_negative_chunk_rate_is_refused_naming_the_setting(office: Office) -> None:
    """``Central(chunk_rate=-1)`` is refused with a message naming ``--chunk-rate``, before
    the folder is opened (a Central can open it right after)."""
    with pytest.raises(CentralUsageError, match=r"--chunk-rate -1: must be 0"):
        office.central(chunk_rate=-1)
    office.central().close()


def test_the_command_line_refuses_a_negative_chunk_rate_naming_the_option(
        office: Office, capsys: pytest.CaptureFixture[str]) -> None:
    """``serve --chunk-rate -5`` exits with status 2 and an error naming ``--chunk-rate``."""
    with pytest.raises(SystemExit) as exited:
        main(["--dir", str(office.folder), "serve", "--chunk-rate", "-5"])
    assert exited.value.code == 2
    assert "argument --chunk-rate: '-5' must be 0" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "rate"), [(None, DEFAULT_CHUNK_RATE), ("0", 0),
                                             ("1.5M", 1_500_000), ("250k", 250_000),
                                             ("4000000", 4_000_000)])
def test_serve_and_publish_take_a_chunk_rate_in_bytes_per_second(given: str | None,
                                                                  rate: int) -> None:
    """``--chunk-rate`` of ``serve`` and ``publish`` is bytes a second (k and M are
    thousands and millions), the office's default when not given."""
    for command in (["serve"], ["publish", "gw1"]):
        extra = [] if given is None else ["--chunk-rate", given]
        assert build_parser().parse_args([*command, *extra]).chunk_rate == rate
