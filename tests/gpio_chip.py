"""A stand-in GPIO chip for the GPIO relay and input drivers.

No GPIO chip exists on this kernel (CONFIG_GPIOLIB is off, so gpio-sim cannot be loaded:
docs/hardware.md), so ``gpiod.request_lines`` is answered here for one chip path, with the
line semantics of the kernel's GPIO character device as libgpiod v2 documents them: a
request claims its line (a second request for it fails with EBUSY), an output takes its
``output_value`` the moment it is requested, ``active_low`` inverts between the logical
value a driver uses and the physical level on the pin, and a released request can no
longer be used. Releasing leaves the pin's level alone here; on real chips that depends on
the chip's driver, which is why the door worker sets the safe state before it closes.
Every other chip path goes to the real gpiod, so a missing chip fails as it does on a
gateway.
"""

from __future__ import annotations

import errno
from typing import Any

import gpiod
import pytest
from gpiod.line import Direction, Value


class FakeGpioChip:
    """The pins of one stand-in chip: physical levels, claims, and every level driven."""

    PATH = "/dev/gpiochip-permitgate-test"

    def __init__(self) -> None:
        self.high: dict[int, bool] = {}
        """The physical level of each line that has one (True: high)."""
        self.claimed: set[int] = set()
        self.driven: list[tuple[int, bool]] = []
        """(line, high) for every ``set_value`` on an output, in order."""

    def request(self, config: dict[Any, Any]) -> FakeLineRequest:
        """Claim the one line in ``config`` with its settings."""
        ((offset, settings),) = config.items()
        if offset in self.claimed:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.claimed.add(offset)
        if settings.direction == Direction.OUTPUT:
            self.high[offset] = (settings.output_value == Value.ACTIVE) != settings.active_low
        return FakeLineRequest(self, offset, active_low=settings.active_low)


class FakeLineRequest:
    """A granted request for one line of a ``FakeGpioChip``."""

    def __init__(self, chip: FakeGpioChip, offset: int, *, active_low: bool) -> None:
        self._chip = chip
        self._offset = offset
        self._active_low = active_low
        self._released = False

    def _check(self, line: int) -> None:
        if self._released:
            raise gpiod.RequestReleasedError
        assert line == self._offset, f"line {line} was not requested"

    def set_value(self, line: int, value: Value) -> None:
        """Drive the line: ACTIVE is high unless active-low."""
        self._check(line)
        high = (value == Value.ACTIVE) != self._active_low
        self._chip.high[line] = high
        self._chip.driven.append((line, high))

    def get_value(self, line: int) -> Value:
        """The line's logical value (a line nobody drives reads low)."""
        self._check(line)
        active = self._chip.high.get(line, False) != self._active_low
        return Value.ACTIVE if active else Value.INACTIVE

    def release(self) -> None:
        """Give the line back."""
        if not self._released:
            self._released = True
            self._chip.claimed.discard(self._offset)


def install(monkeypatch: pytest.MonkeyPatch) -> FakeGpioChip:
    """A ``FakeGpioChip`` at ``FakeGpioChip.PATH`` for the rest of the test; other chip
    paths reach the real gpiod."""
    chip = FakeGpioChip()
    real = gpiod.request_lines

    def request_lines(path: str, config: dict[Any, Any], consumer: str | None = None,
                      event_buffer_size: int | None = None,
                      output_values: dict[Any, Value] | None = None) -> Any:
        if path != FakeGpioChip.PATH:
            return real(path, config, consumer=consumer, event_buffer_size=event_buffer_size,
                        output_values=output_values)
        return chip.request(config)

    monkeypatch.setattr(gpiod, "request_lines", request_lines)
    return chip
