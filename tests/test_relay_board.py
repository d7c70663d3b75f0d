"""The LCUS/CH340 USB relay board driver, over a real pseudo-terminal.

The board's end of the pty is read by the test, which checks the exact bytes against the
vendor command vectors (channel 1 on ``A0 01 01 A2``, off ``A0 01 00 A1``, channel 2 on
``A0 02 01 A3``: docs/hardware.md). These boards never answer, so the bytes that arrive
are all there is to check; that a real board switches on them was not verifiable here.
"""

from __future__ import annotations

import os
import select
import sys
from typing import TYPE_CHECKING, Any

import gpiod
import pytest
from gpiod.line import Bias, Direction, Edge, Value

from agent.config import DoorConfig
from agent.door import DoorWorker
from drivers import gpio
from drivers.base import DeviceError
from drivers.gpio import GpioInput, GpioRelay
from drivers.registry import DriverError, Kind, check_options, create
from drivers.relay_board import RelayBoardOptions, SerialRelayBoard, relay_frame
from drivers.wiegand import WiegandReader
from protocol.chain import Event
from tests.conftest import wait_for
from tests.test_door import START, StepClock

if TYPE_CHECKING:
    from tests.conftest import PtyPeer

WAIT_S = 5.0
"""Generous bound for bytes already written to reach the board's end."""


def board_bytes(pty: PtyPeer, count: int) -> bytes:
    """The next ``count`` bytes at the board's end of the pty, once they have arrived."""
    data = bytearray()

    def arrived() -> bool:
        while len(data) < count and select.select([pty.master], [], [], 0)[0]:
            data.extend(os.read(pty.master, count - len(data)))
        return len(data) >= count

    wait_for(arrived, lambda: f"{count} bytes at the board; only {data.hex(' ')} arrived",
             WAIT_S, interval=0.005)
    return bytes(data)


def nothing_more(pty: PtyPeer) -> bool:
    """Whether no further byte has reached the board's end (shown by a marker sent after
    whatever the driver wrote: no waiting on a clock)."""
    return pty.unread() == b""


def board(pty: PtyPeer, **options: Any) -> SerialRelayBoard:
    """An opened relay board driver on the test's pty."""
    relay = SerialRelayBoard("front.relay", {"port": pty.path, **options})
    relay.open()
    return relay


# --- the frame -------------------------------------------------------------------------


@pytest.mark.parametrize(("channel", "on", "frame"), [
    (1, True, "A0 01 01 A2"),
    (1, False, "A0 01 00 A1"),
    (2, True, "A0 02 01 A3"),
    (2, False, "A0 02 00 A2"),
    (8, True, "A0 08 01 A9"),
    (8, False, "A0 08 00 A8"),
])
def test_frames_match_the_vendor_vectors(channel: int, on: bool, frame: str) -> None:
    """relay_frame builds A0, channel, state and their byte sum, as the vendor sheets do."""
    assert relay_frame(channel, on) == bytes.fromhex(frame)


@pytest.mark.parametrize("channel", [0, 9, -1])
def test_frame_refuses_channels_outside_1_to_8(channel: int) -> None:
    """Channels are 1-based and boards have at most 8."""
    with pytest.raises(ValueError, match="not 1-8"):
        relay_frame(channel, True)


# --- over the pty ----------------------------------------------------------------------


def test_unlock_and_lock_write_the_exact_frames(pty_peer: PtyPeer) -> None:
    """set(True) writes channel 1 "on" and set(False) "off", nothing else; open writes
    nothing."""
    relay = board(pty_peer)
    try:
        assert nothing_more(pty_peer)
        relay.set(True)
        assert board_bytes(pty_peer, 4) == bytes.fromhex("A0 01 01 A2")
        relay.set(False)
        assert board_bytes(pty_peer, 4) == bytes.fromhex("A0 01 00 A1")
        assert nothing_more(pty_peer)
    finally:
        relay.close()


@pytest.mark.parametrize("channel", range(1, 9))
def test_each_channel_gets_its_own_frame(pty_peer: PtyPeer, channel: int) -> None:
    """The configured channel is the one addressed, with its own checksum byte."""
    relay = board(pty_peer, channel=channel)
    try:
        relay.set(True)
        relay.set(False)
        assert board_bytes(pty_peer, 8) == bytes(
            [0xA0, channel, 1, 0xA1 + channel, 0xA0, channel, 0, 0xA0 + channel])
    finally:
        relay.close()


def test_active_low_board_inverts(pty_peer: PtyPeer) -> None:
    """With active_high false, unlocking switches the relay off and locking switches it on."""
    relay = board(pty_peer, channel=2, active_high=False)
    try:
        relay.set(True)
        relay.set(False)
        assert board_bytes(pty_peer, 8) == bytes.fromhex("A0 02 00 A2 A0 02 01 A3")
    finally:
        relay.close()


def test_two_doors_share_one_board(pty_peer: PtyPeer) -> None:
    """Two channels of one board, opened as two relays on the same port, each send their
    own whole frames."""
    first, second = board(pty_peer, channel=1), board(pty_peer, channel=2)
    try:
        first.set(True)
        second.set(True)
        first.set(False)
        assert board_bytes(pty_peer, 12) == bytes.fromhex("A0 01 01 A2 A0 02 01 A3 A0 01 00 A1")
    finally:
        first.close()
        second.close()


def test_set_before_open_raises_device_error() -> None:
    """Driving a relay that was never opened is a DeviceError naming the port."""
    relay = SerialRelayBoard("front.relay", {"port": "/dev/ttyUSB5"})
    with pytest.raises(DeviceError, match="/dev/ttyUSB5 is not open"):
        relay.set(True)


def test_open_missing_port_raises_device_error_naming_it() -> None:
    """Opening a port that does not exist is a DeviceError naming it; close() is safe."""
    relay = SerialRelayBoard("front.relay", {"port": "/dev/serial/by-id/usb-1a86-gone"})
    with pytest.raises(DeviceError, match="/dev/serial/by-id/usb-1a86-gone"):
        relay.open()
    relay.close()
    relay.close()


def test_unplugged_board_raises_device_error(pty_peer: PtyPeer) -> None:
    """When the board's end goes away (USB unplugged), set() raises DeviceError naming
    the port and the relay is closed."""
    relay = board(pty_peer)
    pty_peer.hang_up()
    with pytest.raises(DeviceError, match=pty_peer.path):
        relay.set(True)
    with pytest.raises(DeviceError, match="not open"):
        relay.set(False)


# --- options ------------------------------------------------------------------------------


def test_options_defaults() -> None:
    """Defaults: 9600 baud, channel 1, relay on means unlocked."""
    opts = RelayBoardOptions.model_validate({"port": "/dev/ttyUSB0"})
    assert (opts.baudrate, opts.channel, opts.active_high) == (9600, 1, True)


@pytest.mark.parametrize(("options", "key"), [
    ({}, "port"),
    ({"port": "/dev/ttyUSB0", "channel": 0}, "channel"),
    ({"port": "/dev/ttyUSB0", "channel": 9}, "channel"),
    ({"port": "/dev/ttyUSB0", "channel": "1"}, "channel"),
    ({"port": "/dev/ttyUSB0", "baudrate": 0}, "baudrate"),
    ({"port": "/dev/ttyUSB0", "active_high": 1}, "active_high"),
    ({"port": "/dev/ttyUSB0", "relay": 1}, "relay"),
])
def test_registry_check_names_the_bad_option(options: dict[str, Any], key: str) -> None:
    """Config checking through the registry names a missing, out-of-range, wrong-typed or
    unknown option of a relay board."""
    with pytest.raises(DriverError, match=rf"doors\[0\]\.relay\.options\.{key}"):
        check_options("relay", "relay_board", options, "doors[0].relay")


def test_registry_creates_a_relay_board() -> None:
    """The registry knows the relay driver as "relay_board"; creating it opens nothing."""
    relay = create("relay", "relay_board", "front.relay", {"port": "/dev/ttyUSB0"})
    assert isinstance(relay, SerialRelayBoard)


# --- with the door worker ------------------------------------------------------------------


def test_door_worker_grant_switches_the_board_on_then_off(pty_peer: PtyPeer) -> None:
    """A real DoorWorker owning the board: start locks (off), a grant unlocks (on), the
    relock (off) comes when unlock_s has passed on the worker's clock and not before, and
    stopping leaves a fail-secure door locked."""
    unlock_s = 0.3
    relay = SerialRelayBoard("front.relay", {"port": pty_peer.path, "channel": 3})
    events: list[tuple[str, str | None]] = []

    def emit(event: Event, state: str) -> None:
        events.append((event.kind, event.reason))

    clock = StepClock()
    worker = DoorWorker(DoorConfig(id="front", unlock_s=unlock_s, fail_mode="secure"),
                        relay, emit, clock=clock)
    off, on = bytes.fromhex("A0 03 00 A3"), bytes.fromhex("A0 03 01 A4")
    worker.start()
    try:
        assert board_bytes(pty_peer, 4) == off
        worker.grant()
        assert board_bytes(pty_peer, 4) == on
        clock.set(START + unlock_s - 0.01)
        # The worker reads its clock once a tick: three more reads, and a whole tick has
        # run at this time.
        ticked = clock.reads + 3
        wait_for(lambda: clock.reads >= ticked, "the worker to tick")
        assert nothing_more(pty_peer)
        clock.set(START + unlock_s)
        assert board_bytes(pty_peer, 4) == off
        assert nothing_more(pty_peer)
    finally:
        worker.stop()
    assert board_bytes(pty_peer, 4) == off
    assert [k for k, _ in events] == ["door_locked", "door_unlocked", "door_locked",
                                      "door_locked"]
    assert events[-1] == ("door_locked", "shutdown")


def test_door_worker_fail_safe_door_is_left_unlocked(pty_peer: PtyPeer) -> None:
    """A fail-safe (egress) door's worker switches the board to unlocked when it stops."""
    relay = SerialRelayBoard("exit.relay", {"port": pty_peer.path})
    worker = DoorWorker(DoorConfig(id="exit", unlock_s=0.3, fail_mode="safe"), relay,
                        lambda event, state: None)
    worker.start()
    try:
        assert board_bytes(pty_peer, 4) == bytes.fromhex("A0 01 00 A1")
    finally:
        worker.stop()
    assert board_bytes(pty_peer, 4) == bytes.fromhex("A0 01 01 A2")


# --- GPIO relay and inputs (drivers/gpio.py) -------------------------------------------------
#
# No GPIO chip exists on this kernel (CONFIG_GPIOLIB is off, gpio-sim impossible), so the
# real gpiod is exercised for option checks and missing chips, and its request_lines is
# replaced by a recorder to check the line settings the drivers build with its classes.


class RecordedRequest:
    """Stands in for the gpiod LineRequest a driver gets: records values set, returns the
    level a test chose."""

    def __init__(self) -> None:
        self.values: list[tuple[int, Any]] = []
        self.level: Any = None
        self.released = 0

    def set_value(self, line: int, value: Any) -> None:
        """Record a level set."""
        self.values.append((line, value))

    def get_value(self, line: int) -> Any:
        """The level the test chose."""
        return self.level

    def release(self) -> None:
        """Count releases."""
        self.released += 1


@pytest.fixture
def recorded_gpiod(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace gpiod.request_lines by a recorder; returns the recorded calls."""
    calls: list[dict[str, Any]] = []

    def request_lines(path: str, config: dict[Any, Any], consumer: str | None = None,
                      event_buffer_size: int | None = None,
                      output_values: Any = None) -> RecordedRequest:
        request = RecordedRequest()
        calls.append({"path": path, "config": config, "consumer": consumer,
                      "event_buffer_size": event_buffer_size, "request": request})
        return request

    monkeypatch.setattr(gpiod, "request_lines", request_lines)
    return calls


def test_gpio_relay_requests_an_output_at_the_locked_level(
        recorded_gpiod: list[dict[str, Any]]) -> None:
    """A GPIO relay requests its line as an output starting inactive (locked), and drives
    it active to unlock, inactive to lock."""
    relay = GpioRelay("front.relay", {"chip": "/dev/gpiochip0", "line": 17,
                                      "active_low": True})
    relay.open()
    (call,) = recorded_gpiod
    settings = call["config"][17]
    assert (call["path"], call["consumer"]) == ("/dev/gpiochip0", "permitgate-front.relay")
    assert (settings.direction, settings.output_value, settings.active_low) == (
        Direction.OUTPUT, Value.INACTIVE, True)
    relay.set(True)
    relay.set(False)
    assert call["request"].values == [(17, Value.ACTIVE), (17, Value.INACTIVE)]
    relay.close()
    relay.close()
    assert call["request"].released == 1


def test_gpio_relay_initial_unlocked(recorded_gpiod: list[dict[str, Any]]) -> None:
    """initial = "unlocked" makes the line start active (for a fail-safe door)."""
    relay = GpioRelay("exit.relay", {"line": 5, "initial": "unlocked"})
    relay.open()
    assert recorded_gpiod[0]["config"][5].output_value == Value.ACTIVE
    relay.close()


def test_gpio_input_reads_the_active_level(recorded_gpiod: list[dict[str, Any]]) -> None:
    """A GPIO input requests its line as an input with the chosen bias, and reports
    active exactly when gpiod says ACTIVE."""
    contact = GpioInput("front.contact", {"line": 22, "bias": "pull_up", "active_low": True})
    contact.open()
    call = recorded_gpiod[0]
    settings = call["config"][22]
    assert (settings.direction, settings.bias, settings.active_low) == (
        Direction.INPUT, Bias.PULL_UP, True)
    call["request"].level = Value.ACTIVE
    assert contact.active() is True
    call["request"].level = Value.INACTIVE
    assert contact.active() is False
    contact.close()


def test_wiegand_requests_both_lines_for_pulse_edges(
        recorded_gpiod: list[dict[str, Any]]) -> None:
    """The Wiegand reader requests D0 and D1 together as pulled-up inputs with falling-edge
    detection and a 256-event kernel buffer (active_low, the default); rising edges
    behind an inverting stage."""
    for active_low, edge in ((True, Edge.FALLING), (False, Edge.RISING)):
        reader = WiegandReader("gate", {"d0": 17, "d1": 18, "active_low": active_low})
        reader.open()
        reader.close()
        call = recorded_gpiod[-1]
        settings = call["config"][(17, 18)]
        assert (settings.direction, settings.edge_detection, settings.bias) == (
            Direction.INPUT, edge, Bias.PULL_UP)
        assert call["event_buffer_size"] == 256


@pytest.mark.parametrize("cls_name", ["GpioRelay", "GpioInput"])
def test_gpio_missing_chip_raises_device_error_naming_it(cls_name: str) -> None:
    """With the real gpiod, a chip that does not exist is a DeviceError naming the chip
    and the line."""
    device = getattr(gpio, cls_name)("front.x", {"chip": "/dev/gpiochip9", "line": 4})
    with pytest.raises(DeviceError, match="/dev/gpiochip9 line 4"):
        device.open()
    device.close()


def test_gpio_non_chip_device_raises_device_error() -> None:
    """A path that is no GPIO chip (here /dev/null) is a DeviceError, not a crash."""
    with pytest.raises(DeviceError, match="/dev/null line 4"):
        GpioRelay("front.relay", {"chip": "/dev/null", "line": 4}).open()


def test_gpio_without_gpiod_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where gpiod is not installed, open() says which extra to install."""
    monkeypatch.setitem(sys.modules, "gpiod", None)
    with pytest.raises(DeviceError, match=r"permitgate\[gpio\]"):
        GpioInput("front.rex", {"line": 4}).open()


def test_gpio_use_before_open_raises_device_error() -> None:
    """Setting or reading a line that was never requested is a DeviceError."""
    with pytest.raises(DeviceError, match="line 4 is not open"):
        GpioRelay("front.relay", {"line": 4}).set(True)
    with pytest.raises(DeviceError, match="line 4 is not open"):
        GpioInput("front.rex", {"line": 4}).active()


@pytest.mark.parametrize(("kind", "options", "key"), [
    ("relay", {}, "line"),
    ("relay", {"line": -1}, "line"),
    ("relay", {"line": "17"}, "line"),
    ("relay", {"line": 17, "initial": "open"}, "initial"),
    ("relay", {"line": 17, "bias": "pull_up"}, "bias"),
    ("input", {"line": 17, "initial": "locked"}, "initial"),
    ("input", {"line": 17, "bias": "up"}, "bias"),
    ("input", {"line": 17, "chip": ""}, "chip"),
    ("input", {"line": 17, "active_low": "true"}, "active_low"),
])
def test_gpio_registry_check_names_the_bad_option(kind: Kind, options: dict[str, Any],
                                                  key: str) -> None:
    """Config checking through the registry names a missing, wrong-typed or unknown
    option of a GPIO relay or input (relays take no bias, inputs no initial level)."""
    with pytest.raises(DriverError, match=rf"doors\[0\]\.x\.options\.{key}"):
        check_options(kind, "gpio", options, "doors[0].x")
