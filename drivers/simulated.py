"""Simulated reader, relay and inputs, used by the demo, the embedded defaults and tests.

They implement the same interfaces as the hardware drivers and pass the same contract
tests. A ``SimBus`` connects them to whoever plays the outside world: the tests, the
demo, or ``permitgate sim`` through the agent's control socket.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

from pydantic import Field

from drivers.base import CardRead, DeviceError, DriverOptions, Input, Reader, Relay


class SimBus:
    """The simulated world: card taps queued per reader, input levels, relay states."""

    def __init__(self) -> None:
        self._taps: dict[str, queue.Queue[str]] = {}
        self._levels: dict[str, bool] = {}
        self.relays: dict[str, bool] = {}
        self._lock = threading.Lock()

    def tap_queue(self, reader: str) -> queue.Queue[str]:
        """The queue of card ids waiting at ``reader``."""
        with self._lock:
            return self._taps.setdefault(reader, queue.Queue())

    def tap(self, reader: str, card_id: str) -> None:
        """Present ``card_id`` at ``reader``."""
        self.tap_queue(reader).put(card_id)

    def set_level(self, name: str, active: bool) -> None:
        """Set a simulated input (``"<door>.contact"`` or ``"<door>.rex"``)."""
        with self._lock:
            self._levels[name] = active

    def level(self, name: str) -> bool:
        """The current level of a simulated input."""
        with self._lock:
            return self._levels.get(name, False)


BUS = SimBus()
"""The process-wide bus the simulated drivers use unless given another."""


class SimulatedReaderOptions(DriverOptions):
    """Options of the simulated reader (none needed)."""

    fail_open: bool = False


class SimulatedReader(Reader):
    """A reader whose taps come from the ``SimBus``."""

    Options = SimulatedReaderOptions

    def __init__(self, name: str, options: dict[str, Any], bus: SimBus | None = None) -> None:
        super().__init__(name, options)
        self.bus = bus or BUS
        self.feedback_log: list[bool] = []
        self._open = False

    def open(self) -> None:
        """Attach to the bus."""
        if self.options.fail_open:
            raise DeviceError(f"simulated reader {self.name}: configured to fail on open")
        self._open = True

    def read(self, timeout: float) -> CardRead | None:
        """The next tap, or None after ``timeout``."""
        if not self._open:
            raise DeviceError(f"simulated reader {self.name}: not open")
        try:
            card = self.bus.tap_queue(self.name).get(timeout=timeout)
        except queue.Empty:
            return None
        return CardRead(card)

    def close(self) -> None:
        """Detach."""
        self._open = False

    def feedback(self, granted: bool) -> None:
        """Remember the outcome shown."""
        self.feedback_log.append(granted)

    def alarms(self) -> dict[str, bool]:
        """Tamper as set on the bus under ``"<reader>.tamper"``."""
        return {"tamper": self.bus.level(f"{self.name}.tamper")}


class SimulatedRelayOptions(DriverOptions):
    """Options of the simulated relay."""

    state_file: Path | None = Field(default=None, strict=False)
    """Where to mirror the relay state as JSON, so another process can watch it."""


class SimulatedRelay(Relay):
    """A relay that records its state on the bus and, optionally, in a file."""

    Options = SimulatedRelayOptions

    def __init__(self, name: str, options: dict[str, Any], bus: SimBus | None = None) -> None:
        super().__init__(name, options)
        self.bus = bus or BUS
        self.history: list[bool] = []

    def open(self) -> None:
        """Nothing to claim."""

    def set(self, unlocked: bool) -> None:
        """Record the new state (and write it through to the state file)."""
        self.history.append(unlocked)
        self.bus.relays[self.name] = unlocked
        path = self.options.state_file
        if path is not None:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps({"relay": self.name, "unlocked": unlocked}))
            tmp.replace(path)

    def close(self) -> None:
        """Nothing to release."""


class SimulatedInput(Input):
    """An input whose level is set on the bus under its own name."""

    def __init__(self, name: str, options: dict[str, Any], bus: SimBus | None = None) -> None:
        super().__init__(name, options)
        self.bus = bus or BUS

    def open(self) -> None:
        """Nothing to claim."""

    def active(self) -> bool:
        """The level set on the bus."""
        return self.bus.level(self.name)

    def close(self) -> None:
        """Nothing to release."""
