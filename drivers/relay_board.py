"""LCUS-1/2/4/8 USB relay boards (CH340 USB-serial chip), one relay channel per door.

Every command is 4 bytes at 9600 8N1: ``A0 <channel, 1-based> <state: 00 off, 01 on>
<(A0 + channel + state) & FF>``, e.g. channel 1 on ``A0 01 01 A2``, off ``A0 01 00 A1``,
channel 2 on ``A0 02 01 A3`` (vendor sheets, docs/hardware.md). Most boards never answer,
so a write that the kernel accepted is all the confirmation there is: a board that has
lost power behind a powered USB hub, or a relay that stuck, goes unnoticed. A door
contact input is what shows whether the door actually opened.

Several doors may share one multi-channel board: each door's relay is its own
``SerialRelayBoard`` with its own channel, each opens the port (not exclusively), and
each command is a single 4-byte write(2), which the tty layer does not interleave with
another writer's (it holds the tty's write lock for the whole call).
"""

from __future__ import annotations

from typing import Any

import serial
import structlog
from pydantic import Field

from drivers.base import DeviceError, DriverOptions, Relay

_log = structlog.get_logger()

HEADER = 0xA0
ON = 0x01
OFF = 0x00


def relay_frame(channel: int, on: bool) -> bytes:
    """The command that switches relay ``channel`` (1-8) on or off."""
    if not 1 <= channel <= 8:
        raise ValueError(f"channel {channel} is not 1-8")
    state = ON if on else OFF
    return bytes([HEADER, channel, state, (HEADER + channel + state) & 0xFF])


class RelayBoardOptions(DriverOptions):
    """Options of the USB relay board."""

    port: str = Field(min_length=1)
    """Device path; prefer ``/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0``-style
    links (CH340 boards usually have no serial number, so with two boards use
    ``/dev/serial/by-path/...``, which names the USB socket)."""
    baudrate: int = Field(default=9600, gt=0)
    channel: int = Field(default=1, ge=1, le=8)
    active_high: bool = True
    """True when the relay energised ("on") unlocks the door (lock wired to the normally
    open contact, or a strike that opens when powered); False when "on" locks it."""


class SerialRelayBoard(Relay):
    """One channel of an LCUS/CH340 USB relay board."""

    Options = RelayBoardOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._port: serial.Serial | None = None

    def open(self) -> None:
        """Open the port; raise ``DeviceError`` naming it when that fails. Sends nothing:
        the door worker sets the locked state right after."""
        self.close()
        path = self.options.port
        try:
            # write_timeout: a wedged CH340 must not block the door worker for ever; the
            # worker reports the DeviceError as a relay fault and retries.
            self._port = serial.Serial(port=path, baudrate=self.options.baudrate,
                                       timeout=0, write_timeout=1.0)
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            raise DeviceError(f"relay board {self.name}: cannot open {path}: {exc}") from exc

    def set(self, unlocked: bool) -> None:
        """Switch the channel so the door is unlocked (True) or locked (False)."""
        port = self._port
        if port is None:
            raise DeviceError(f"relay board {self.name}: {self.options.port} is not open")
        frame = relay_frame(self.options.channel, unlocked == self.options.active_high)
        try:
            # No flush(): it is tcdrain(), which has no timeout, and a wedged CH340 would
            # hang the door worker in it. The kernel sends queued bytes within milliseconds,
            # and these boards never confirm anyway.
            written = port.write(frame)
        except OSError as exc:  # SerialException, SerialTimeoutException are OSErrors
            self.close()
            raise DeviceError(f"relay board {self.name}: {self.options.port} failed: "
                              f"{exc}") from exc
        if written != len(frame):
            raise DeviceError(f"relay board {self.name}: {self.options.port} took {written} "
                              f"of {len(frame)} bytes")

    def close(self) -> None:
        """Release the port; safe to call twice or after a failed open. The relay keeps
        its state: the door worker sets the safe state before it closes."""
        port, self._port = self._port, None
        if port is None:
            return
        try:
            port.close()
        except OSError as exc:
            _log.warning("relay_close_failed", relay=self.name, error=str(exc))
