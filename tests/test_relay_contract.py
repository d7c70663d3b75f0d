"""The contract every relay (lock output) driver passes, run for each registered driver.

A driver's test class subclasses ``RelayContract`` and provides ``make_relay()`` (a new,
unopened relay) and ``commands()`` (every unlock/lock the peer received, in order, as the
lock sees it: True unlocked). The peers are the real ones the driver tests use: a pty
playing the USB relay board, libosdp's own PD for OSDP outputs (tests/test_osdp.py), the
SimBus for the simulated relay, and for GPIO a stand-in chip (tests/gpio_chip.py: no GPIO
chip exists on this kernel).

What drivers/base.py and the door worker rely on: ``set(True)`` unlocks and ``set(False)``
locks, every call reaching the lock; ``open()`` and ``close()`` send no command of their
own (a GPIO line does take its configured ``initial`` level when requested, pinned by its
own test), so the state the door worker set last (its safe state, set before it closes)
is the state the lock keeps; both are safe to repeat; a closed relay refuses ``set()``
with a ``DeviceError`` naming it (the worker reports a relay fault) unless it has nothing
to claim; a device that cannot be opened is a ``DeviceError`` naming the device.
"""

from __future__ import annotations

import importlib
import os
import re
import select
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import pytest

from drivers.base import DeviceError, Relay
from drivers.gpio import GpioRelay
from drivers.registry import RELAYS, driver_class
from drivers.relay_board import SerialRelayBoard, relay_frame
from drivers.simulated import SimBus, SimulatedRelay
from tests import gpio_chip
from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.conftest import PtyPeer

CONTRACT_MODULES = ("tests.test_relay_contract", "tests.test_osdp")
"""Where the driver classes of this contract live (OSDP's next to its libosdp peer)."""


class RelayContract:
    """Tests every relay driver must pass; subclass and provide the hooks below."""

    driver: ClassVar[str]
    """The driver's name in drivers/registry.py."""
    needs_open: ClassVar[bool] = True
    """False for a driver with nothing to claim: ``set()`` then works without ``open()``."""

    def make_relay(self) -> Relay:
        """A new, unopened relay of the driver under test, wired to this test's peer."""
        raise NotImplementedError

    def commands(self) -> list[bool]:
        """Every command the peer has received so far, in order, as the lock sees it."""
        raise NotImplementedError

    def unopenable(self) -> tuple[Relay, str] | None:
        """A relay whose device does not exist, and the name its error must give; None
        for a driver without a device."""
        return None

    def released(self) -> bool:
        """Whether nothing of the device is held any more (after ``close()``)."""
        return True

    @pytest.fixture
    def relay(self) -> Iterator[Relay]:
        """An opened relay, closed after the test."""
        relay = self.make_relay()
        relay.open()
        try:
            yield relay
        finally:
            relay.close()

    def received(self, tail: list[bool]) -> list[bool]:
        """Every command, once the peer has received ``tail`` as the last of them."""
        def arrived() -> list[bool] | None:
            got = self.commands()
            return got if got[-len(tail):] == tail else None

        return wait_for(arrived, lambda: f"{tail} at the peer; it has {self.commands()}")

    def test_set_unlocks_and_locks(self, relay: Relay) -> None:
        """set(True) unlocks the lock behind the peer and set(False) locks it, each call
        reaching the peer, repeats included; opening sent nothing before them."""
        relay.set(True)
        relay.set(True)
        relay.set(False)
        assert self.received([True, True, False]) == [True, True, False]

    @pytest.mark.parametrize("safe", [False, True], ids=["fail_secure", "fail_safe"])
    def test_close_leaves_the_state_set_last(self, relay: Relay, safe: bool) -> None:
        """The state set last (the door's safe state, locked or unlocked) is the state the
        lock keeps through close(): neither close() nor a later open() sends a command."""
        relay.set(safe)
        relay.close()
        relay.open()
        relay.set(not safe)  # had close() or open() sent anything, it would come before
        assert self.received([not safe]) == [safe, not safe]

    def test_open_twice_then_close_releases_the_device(self, relay: Relay) -> None:
        """open() on an open relay claims nothing twice; it still drives the lock, and one
        close() releases the device."""
        relay.open()
        relay.set(True)
        assert self.received([True]) == [True]
        relay.close()
        assert self.released()

    def test_close_twice_is_safe(self, relay: Relay) -> None:
        """close() may be called again on a closed relay."""
        relay.close()
        relay.close()
        assert self.released()

    def test_close_without_open_is_safe(self) -> None:
        """close() on a relay that was never opened does nothing."""
        self.make_relay().close()

    def test_set_on_a_closed_relay_raises_device_error_naming_it(self, relay: Relay) -> None:
        """After close(), set() raises DeviceError naming the relay (a driver with nothing
        to claim still drives the lock)."""
        relay.close()
        if not self.needs_open:
            relay.set(True)
            assert self.received([True]) == [True]
            return
        with pytest.raises(DeviceError, match=re.escape(relay.name)):
            relay.set(True)
        assert self.commands() == []

    def test_device_that_cannot_be_opened_raises_device_error_naming_it(self) -> None:
        """open() on a device that does not exist raises DeviceError naming the device;
        close() after it is safe."""
        missing = self.unopenable()
        if missing is None:
            pytest.skip(f"the {self.driver} relay has no device that could be missing")
        relay, device = missing
        with pytest.raises(DeviceError, match=re.escape(device)):
            relay.open()
        relay.close()
        relay.close()

    def test_registry_builds_this_driver(self) -> None:
        """The registry's relay driver of this name is the class under test."""
        assert driver_class("relay", self.driver) is type(self.make_relay())


def test_every_registered_relay_driver_runs_the_contract() -> None:
    """Each relay driver in drivers/registry.py has a RelayContract test class."""
    for module in CONTRACT_MODULES:
        importlib.import_module(module)
    tested: set[str] = set()
    pending: list[type[RelayContract]] = [RelayContract]
    while pending:
        for sub in pending.pop().__subclasses__():
            tested.add(sub.driver)
            pending.append(sub)
    assert set(RELAYS) <= tested


# --- the drivers here ------------------------------------------------------------------


class _RecordedRelays(dict[str, bool]):
    """The SimBus's relay states, with every state set kept in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, bool]] = []

    def __setitem__(self, key: str, value: bool) -> None:
        self.log.append((key, value))
        super().__setitem__(key, value)


class TestSimulatedRelayContract(RelayContract):
    """The simulated relay; its peer is the SimBus, which records every state set."""

    driver = "simulated"
    needs_open = False

    @pytest.fixture(autouse=True)
    def _bus(self) -> None:
        self.bus = SimBus()
        self.states = _RecordedRelays()
        self.bus.relays = self.states

    def make_relay(self) -> Relay:
        """A simulated relay on this test's bus."""
        return SimulatedRelay("front.relay", {}, bus=self.bus)

    def commands(self) -> list[bool]:
        """The states set on the bus."""
        return [state for name, state in list(self.states.log) if name == "front.relay"]


class TestRelayBoardContract(RelayContract):
    """One channel of an LCUS USB relay board, whose end of a real pty the test reads;
    relay on is unlocked."""

    driver = "relay_board"
    channel: ClassVar[int] = 3
    active_high: ClassVar[bool] = True

    @pytest.fixture(autouse=True)
    def _board(self, pty_peer: PtyPeer) -> None:
        self.pty = pty_peer
        self.wire = bytearray()

    def make_relay(self) -> Relay:
        """A relay board driver for this test's channel on the pty."""
        return SerialRelayBoard("front.relay", {"port": self.pty.path, "channel": self.channel,
                                                "active_high": self.active_high})

    def commands(self) -> list[bool]:
        """The frames the board received, each checked against the vendor format."""
        while select.select([self.pty.master], [], [], 0)[0]:
            self.wire.extend(os.read(self.pty.master, 4096))
        frames = [bytes(self.wire[i:i + 4]) for i in range(0, len(self.wire) - 3, 4)]
        on = relay_frame(self.channel, True)
        off = relay_frame(self.channel, False)
        assert all(f in (on, off) for f in frames), f"unexpected bytes {self.wire.hex(' ')}"
        return [(f == on) == self.active_high for f in frames]

    def unopenable(self) -> tuple[Relay, str]:
        """A board whose by-id link names no device (unplugged)."""
        port = "/dev/serial/by-id/usb-1a86_USB_Serial-permitgate-gone"
        return SerialRelayBoard("front.relay", {"port": port}), port

    def released(self) -> bool:
        """Whether this process holds the pty only through the test's own descriptor."""
        held = 0
        for fd in Path("/proc/self/fd").iterdir():
            try:
                held += str(fd.readlink()) == self.pty.path
            except OSError:
                continue  # the descriptor iterdir itself used, closed meanwhile
        return held == 1


class TestRelayBoardActiveLowContract(TestRelayBoardContract):
    """A relay board channel wired so that relay on locks (``active_high = false``)."""

    channel = 8
    active_high = False


class TestGpioRelayContract(RelayContract):
    """A relay module on a GPIO line of the stand-in chip; a high pin unlocks."""

    driver = "gpio"
    line: ClassVar[int] = 17
    active_low: ClassVar[bool] = False

    @pytest.fixture(autouse=True)
    def _chip(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chip = gpio_chip.install(monkeypatch)

    def make_relay(self) -> Relay:
        """A GPIO relay on this test's line of the stand-in chip."""
        return GpioRelay("front.relay", {"chip": gpio_chip.FakeGpioChip.PATH,
                                         "line": self.line, "active_low": self.active_low})

    def commands(self) -> list[bool]:
        """The levels driven on the line (requesting it sets ``initial``, no command)."""
        return [high != self.active_low for line, high in list(self.chip.driven)
                if line == self.line]

    def unopenable(self) -> tuple[Relay, str]:
        """A line on a chip that does not exist, asked of the real gpiod."""
        chip = "/dev/gpiochip-permitgate-missing"
        return (GpioRelay("front.relay", {"chip": chip, "line": self.line}),
                f"{chip} line {self.line}")

    def released(self) -> bool:
        """Whether the line is free."""
        return self.line not in self.chip.claimed

    def test_requested_line_starts_locked(self, relay: Relay) -> None:
        """The line becomes an output at the locked level the moment it is requested,
        before the door worker sets anything."""
        assert self.chip.high[self.line] == self.active_low


class TestGpioRelayActiveLowContract(TestGpioRelayContract):
    """A relay module that switches on a low pin (``active_low = true``)."""

    line = 5
    active_low = True
