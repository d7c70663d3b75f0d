"""A lock relay and door inputs on GPIO lines, through libgpiod v2 (``gpiod`` >= 2.2).

Thin on purpose: each device requests one line and sets or reads it. gpiod is an optional
extra (``permitgate[gpio]``), imported inside ``open()``; the wheel bundles libgpiod v2
(Debian bookworm's ``python3-libgpiod`` is the v1 API and will not do). There is no
armv7l wheel: on 32-bit Raspberry Pi OS pip builds it from source.

Never drive a strike or a magnetic lock from a pin: a GPIO line drives a relay module or
a transistor, and the lock's coil has a flyback diode (docs/hardware.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import Field

from drivers.base import DeviceError, DriverOptions, Input, Relay

if TYPE_CHECKING:
    import gpiod

_log = structlog.get_logger()


class GpioLineOptions(DriverOptions):
    """The line both GPIO devices use."""

    chip: str = Field(default="/dev/gpiochip0", min_length=1)
    """The GPIO character device (``gpiodetect`` lists them)."""
    line: int = Field(ge=0)
    """Line offset, e.g. 17 for GPIO17 on a Pi header (``gpioinfo`` lists them)."""
    active_low: bool = False
    """True when the active state (relay unlocked, contact open, button pressed) is a low
    level on the pin."""


class GpioRelayOptions(GpioLineOptions):
    """Options of a GPIO lock relay."""

    initial: Literal["locked", "unlocked"] = "locked"
    """The level the line takes the moment it becomes an output, before the door worker
    sets anything. Before the agent requests the line the pin is an input, and a relay
    module's own pull resistor decides; choose a module whose idle state is the door's
    safe state."""


class GpioInputOptions(GpioLineOptions):
    """Options of a GPIO input (door contact, exit button)."""

    bias: Literal["as_is", "pull_up", "pull_down", "disabled"] = "as_is"
    """The pin's internal resistor; a contact that switches to ground wants pull_up."""


def _request(device: str, name: str, options: GpioLineOptions,
             make_settings: Any) -> gpiod.LineRequest:
    """Request the line with the settings ``make_settings(gpiod, gpiod.line)`` builds."""
    where = f"{options.chip} line {options.line}"
    try:
        import gpiod  # noqa: PLC0415 - optional extra, imported only where the hardware is used
        from gpiod import line  # noqa: PLC0415
    except ImportError as exc:
        raise DeviceError(f"{device} {name}: gpiod is not installed (pip install "
                          f"'permitgate[gpio]'): {exc}") from exc
    try:
        return gpiod.request_lines(options.chip, consumer=f"permitgate-{name}",
                                   config={options.line: make_settings(gpiod, line)})
    except (OSError, ValueError) as exc:
        # FileNotFoundError: no such chip; ENODEV: not a GPIO chip; EBUSY: claimed by
        # another program; EINVAL/ValueError: no such line offset on this chip.
        raise DeviceError(f"{device} {name}: cannot request {where}: {exc}") from exc


def _release(request: gpiod.LineRequest | None, event: str, name: str) -> None:
    if request is None:
        return
    try:
        request.release()
    except OSError as exc:
        _log.warning(event, device=name, error=str(exc))


class GpioRelay(Relay):
    """A lock relay on one GPIO output line; active means unlocked."""

    Options = GpioRelayOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._request: gpiod.LineRequest | None = None

    def open(self) -> None:
        """Request the line as an output at its ``initial`` level."""
        self.close()
        opts = self.options

        def settings(gpiod: Any, line: Any) -> Any:
            return gpiod.LineSettings(
                direction=line.Direction.OUTPUT, active_low=opts.active_low,
                output_value=line.Value.ACTIVE if opts.initial == "unlocked"
                else line.Value.INACTIVE)

        self._request = _request("gpio relay", self.name, opts, settings)

    def set(self, unlocked: bool) -> None:
        """Drive the line active (unlocked) or inactive (locked)."""
        request = self._request
        if request is None:
            raise DeviceError(f"gpio relay {self.name}: {self.options.chip} line "
                              f"{self.options.line} is not open")
        from gpiod.line import Value  # noqa: PLC0415 - open() succeeded, so gpiod exists

        try:
            request.set_value(self.options.line, Value.ACTIVE if unlocked else Value.INACTIVE)
        except OSError as exc:
            raise DeviceError(f"gpio relay {self.name}: {self.options.chip} line "
                              f"{self.options.line} failed: {exc}") from exc

    def close(self) -> None:
        """Release the line; safe to call twice. The kernel then keeps or drops the
        level as the chip's driver does, which is why the door worker sets the safe
        state before it closes."""
        request, self._request = self._request, None
        _release(request, "relay_close_failed", self.name)


class GpioInput(Input):
    """A door contact or exit button on one GPIO input line."""

    Options = GpioInputOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._request: gpiod.LineRequest | None = None

    def open(self) -> None:
        """Request the line as an input with the configured bias."""
        self.close()
        opts = self.options

        def settings(gpiod: Any, line: Any) -> Any:
            bias = {"as_is": line.Bias.AS_IS, "pull_up": line.Bias.PULL_UP,
                    "pull_down": line.Bias.PULL_DOWN, "disabled": line.Bias.DISABLED}
            return gpiod.LineSettings(direction=line.Direction.INPUT,
                                      active_low=opts.active_low, bias=bias[opts.bias])

        self._request = _request("gpio input", self.name, opts, settings)

    def active(self) -> bool:
        """Whether the line is active now (contact open, button pressed)."""
        request = self._request
        if request is None:
            raise DeviceError(f"gpio input {self.name}: {self.options.chip} line "
                              f"{self.options.line} is not open")
        from gpiod.line import Value  # noqa: PLC0415 - open() succeeded, so gpiod exists

        try:
            return request.get_value(self.options.line) == Value.ACTIVE
        except OSError as exc:
            raise DeviceError(f"gpio input {self.name}: {self.options.chip} line "
                              f"{self.options.line} failed: {exc}") from exc

    def close(self) -> None:
        """Release the line; safe to call twice."""
        request, self._request = self._request, None
        _release(request, "input_close_failed", self.name)
