"""The contract every input driver (door contact, exit button) passes, run for each
registered driver.

A driver's test class subclasses ``InputContract`` and provides ``make_input()`` (a new,
unopened input) and ``drive(active)`` (make the peer put the line in that state: contact
open or button pressed for True). The peers are the SimBus for the simulated input and,
for GPIO, a stand-in chip (tests/gpio_chip.py: no GPIO chip exists on this kernel).

What drivers/base.py and the door worker rely on: ``active()`` reports the peer's current
state (active = contact open, button pressed) and keeps reporting it; ``open()`` and
``close()`` are safe to repeat and a reopened input reads again; a closed input refuses
``active()`` with a ``DeviceError`` naming it (the worker reports a contact or exit
button fault) unless it has nothing to claim; a device that cannot be opened is a
``DeviceError`` naming the device.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from typing import ClassVar

import pytest

from drivers.base import DeviceError, Input
from drivers.gpio import GpioInput
from drivers.registry import INPUTS, driver_class
from drivers.simulated import SimBus, SimulatedInput
from tests import gpio_chip
from tests.conftest import wait_for

CONTRACT_MODULES = ("tests.test_input_contract",)
"""Where the driver classes of this contract live."""


class InputContract:
    """Tests every input driver must pass; subclass and provide the hooks below."""

    driver: ClassVar[str]
    """The driver's name in drivers/registry.py."""
    needs_open: ClassVar[bool] = True
    """False for a driver with nothing to claim: ``active()`` then works without it."""

    def make_input(self) -> Input:
        """A new, unopened input of the driver under test, wired to this test's peer."""
        raise NotImplementedError

    def drive(self, active: bool) -> None:
        """Make the peer put the input in state ``active``."""
        raise NotImplementedError

    def unopenable(self) -> tuple[Input, str] | None:
        """An input whose device does not exist, and the name its error must give; None
        for a driver without a device."""
        return None

    def released(self) -> bool:
        """Whether nothing of the device is held any more (after ``close()``)."""
        return True

    def reads(self, device: Input, state: bool) -> None:
        """Wait until ``device.active()`` reads ``state``."""
        wait_for(lambda: device.active() is state, f"active() to read {state}")

    @pytest.fixture
    def device(self) -> Iterator[Input]:
        """An opened input, closed after the test."""
        device = self.make_input()
        device.open()
        try:
            yield device
        finally:
            device.close()

    def test_active_follows_the_peer(self, device: Input) -> None:
        """active() is True while the peer holds the input active (contact open, button
        pressed) and False once it lets go, reading the same on every call."""
        for state in (True, False, True):
            self.drive(state)
            self.reads(device, state)
            assert device.active() is state

    def test_open_twice_then_close_releases_the_device(self, device: Input) -> None:
        """open() on an open input claims nothing twice; it still reads, and one close()
        releases the device."""
        device.open()
        self.drive(True)
        self.reads(device, True)
        device.close()
        assert self.released()

    def test_close_twice_is_safe(self, device: Input) -> None:
        """close() may be called again on a closed input."""
        device.close()
        device.close()
        assert self.released()

    def test_close_without_open_is_safe(self) -> None:
        """close() on an input that was never opened does nothing."""
        self.make_input().close()

    def test_reopen_after_close_reads_again(self, device: Input) -> None:
        """A closed input opens again and reads the peer's state as it is then."""
        device.close()
        self.drive(True)
        device.open()
        self.reads(device, True)

    def test_read_on_a_closed_input_raises_device_error_naming_it(self, device: Input) -> None:
        """After close(), active() raises DeviceError naming the input (a driver with
        nothing to claim still reads)."""
        device.close()
        self.drive(True)
        if not self.needs_open:
            assert device.active() is True
            return
        with pytest.raises(DeviceError, match=re.escape(device.name)):
            device.active()

    def test_device_that_cannot_be_opened_raises_device_error_naming_it(self) -> None:
        """open() on a device that does not exist raises DeviceError naming the device;
        close() after it is safe."""
        missing = self.unopenable()
        if missing is None:
            pytest.skip(f"the {self.driver} input has no device that could be missing")
        device, name = missing
        with pytest.raises(DeviceError, match=re.escape(name)):
            device.open()
        device.close()
        device.close()

    def test_registry_builds_this_driver(self) -> None:
        """The registry's input driver of this name is the class under test."""
        assert driver_class("input", self.driver) is type(self.make_input())


def test_every_registered_input_driver_runs_the_contract() -> None:
    """Each input driver in drivers/registry.py has an InputContract test class."""
    for module in CONTRACT_MODULES:
        importlib.import_module(module)
    tested: set[str] = set()
    pending: list[type[InputContract]] = [InputContract]
    while pending:
        for sub in pending.pop().__subclasses__():
            tested.add(sub.driver)
            pending.append(sub)
    assert set(INPUTS) <= tested


class TestSimulatedInputContract(InputContract):
    """The simulated input; its peer sets the level on the SimBus."""

    driver = "simulated"
    needs_open = False

    @pytest.fixture(autouse=True)
    def _bus(self) -> None:
        self.bus = SimBus()

    def make_input(self) -> Input:
        """A simulated door contact on this test's bus."""
        return SimulatedInput("front.contact", {}, bus=self.bus)

    def drive(self, active: bool) -> None:
        """Set the contact's level on the bus."""
        self.bus.set_level("front.contact", active)


class TestGpioInputContract(InputContract):
    """A door contact on a GPIO line of the stand-in chip; a high pin is active."""

    driver = "gpio"
    line: ClassVar[int] = 27
    active_low: ClassVar[bool] = False

    @pytest.fixture(autouse=True)
    def _chip(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chip = gpio_chip.install(monkeypatch)

    def make_input(self) -> Input:
        """A GPIO input on this test's line of the stand-in chip."""
        return GpioInput("front.contact", {"chip": gpio_chip.FakeGpioChip.PATH,
                                           "line": self.line, "active_low": self.active_low})

    def drive(self, active: bool) -> None:
        """Put the pin at the level that means ``active`` for this wiring."""
        self.chip.high[self.line] = active != self.active_low

    def unopenable(self) -> tuple[Input, str]:
        """A line on a chip that does not exist, asked of the real gpiod."""
        chip = "/dev/gpiochip-permitgate-missing"
        return (GpioInput("front.contact", {"chip": chip, "line": self.line}),
                f"{chip} line {self.line}")

    def released(self) -> bool:
        """Whether the line is free."""
        return self.line not in self.chip.claimed


class TestGpioInputActiveLowContract(TestGpioInputContract):
    """A contact that switches the pin to ground (``active_low = true``, as with a pull-up)."""

    line = 22
    active_low = True
