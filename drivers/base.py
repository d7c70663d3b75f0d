"""The interfaces every reader and door-I/O driver implements.

Seams (docs/architecture.md, "Modules and seams"):
- ``Reader.read(timeout)`` returns within about ``timeout`` seconds, with a card read or
  None; it raises ``DeviceError`` when the device is gone, and the agent reopens it with a
  capped back-off.
- A ``Relay`` is owned by exactly one door worker; ``set(True)`` unlocks.
- An ``Input`` reports its current level without blocking (door contact, exit button).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class DeviceError(Exception):
    """A device could not be opened or stopped answering; the message names it."""


class DriverOptions(BaseModel):
    """Base of every driver's options: unknown keys and wrong types are errors ("9600" is
    not a number); path fields opt out of strictness one by one, as TOML spells them as
    strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True, slots=True)
class CardRead:
    """One card presented to a reader.

    ``card_id`` is the normalised identifier, ``"<kind>:<value>"`` (for example
    ``"em4100:67003B51C6"``); it is hashed with the site key at once and never stored or
    logged. ``at`` is ``time.monotonic()`` when the driver had the complete read.
    """

    card_id: str
    at: float = field(default_factory=time.monotonic)


class Reader(ABC):
    """A card reader."""

    Options: ClassVar[type[DriverOptions]] = DriverOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options: Any = self.Options.model_validate(options)
        self.rejected = 0
        """Frames or lines refused (bad checksum, garbage, too long) since open."""

    @abstractmethod
    def open(self) -> None:
        """Open the device; raise ``DeviceError`` naming it when that fails."""

    @abstractmethod
    def read(self, timeout: float) -> CardRead | None:
        """The next card read, or None after about ``timeout`` seconds without one."""

    @abstractmethod
    def close(self) -> None:
        """Release the device; safe to call twice or after a failed open."""

    def feedback(self, granted: bool) -> None:  # noqa: B027 - optional hook, no-op by default
        """Show the outcome on the reader (LED, buzzer) where the device can."""

    def alarms(self) -> dict[str, bool]:
        """Alarm inputs the device reports (``tamper``, ``power`` failure), True while
        raised; readers without them report none. Polled by the agent, never blocks."""
        return {}


class Relay(ABC):
    """A lock output."""

    Options: ClassVar[type[DriverOptions]] = DriverOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options: Any = self.Options.model_validate(options)

    @abstractmethod
    def open(self) -> None:
        """Claim the output."""

    @abstractmethod
    def set(self, unlocked: bool) -> None:
        """Drive the lock: True unlocks, False locks."""

    @abstractmethod
    def close(self) -> None:
        """Release the output."""


class Input(ABC):
    """A digital input: door contact (active = open) or exit button (active = pressed)."""

    Options: ClassVar[type[DriverOptions]] = DriverOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options: Any = self.Options.model_validate(options)

    @abstractmethod
    def open(self) -> None:
        """Claim the input."""

    @abstractmethod
    def active(self) -> bool:
        """The current level, without blocking."""

    @abstractmethod
    def close(self) -> None:
        """Release the input."""
