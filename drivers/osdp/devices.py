"""The OSDP reader and output drivers and their options (overview: drivers/osdp/__init__.py)."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from typing import Any, Literal

import structlog
from pydantic import Field, model_validator

from drivers.base import CardRead, DeviceError, DriverOptions, Reader, Relay
from drivers.osdp.bus import Bus
from drivers.osdp.credentials import Pin, PinAssembler, card_id, load_scbk
from drivers.osdp.link import (
    CAP_AUDIBLE,
    CAP_LED,
    CMD_BUZZER,
    CMD_LED,
    EVENT_CARDREAD,
    LED_GREEN,
    LED_NONE,
    LED_RED,
    libosdp,
)
from drivers.osdp.slot import PdConfig, Slot

_log = structlog.get_logger()

_FEEDBACK_100MS = 5
"""LED colour shown after a decision, in OSDP's 100 ms units: 500 ms."""
_DENY_BEEP_100MS = 3
"""The deny beep: 300 ms, once."""


class OsdpOptions(DriverOptions):
    """Options shared by the OSDP reader and output: the line, the PD and its security."""

    port: str = Field(min_length=1)
    """Serial device of the RS-485 adapter, e.g. ``/dev/serial/by-id/usb-FTDI...``."""

    baudrate: Literal[9600, 19200, 38400, 57600, 115200] = 9600
    """Line speed (8N1); must match the PD. Each rate is tested with bytes arriving at the
    pace of the line (tests/line_relay.py)."""

    address: int = Field(ge=0, le=126)
    """The PD's multi-drop address (127 is broadcast, never a PD's own)."""

    secure: bool = True
    """Secure Channel, enforced. False only for bench tests, and only explicitly."""

    scbk_file: str | None = Field(default=None, min_length=1)
    """The PD's Secure Channel Base Key, 32 hex digits. An absolute path, a path relative
    to the working directory, or a bare name found in ``$CREDENTIALS_DIRECTORY`` first."""

    install_mode: bool = False
    """Installation only: SCBK-D, then ``osdp_KEYSET`` with the key of ``scbk_file``."""

    open_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """How long ``open()`` waits for the PD to be online (and SC active)."""

    @model_validator(mode="after")
    def _security_is_consistent(self) -> OsdpOptions:
        if self.secure and self.scbk_file is None:
            raise ValueError("scbk_file is required: Secure Channel is on unless "
                             "'secure = false' is set explicitly")
        if not self.secure and self.scbk_file is not None:
            raise ValueError("scbk_file is set but secure = false: the key would be unused")
        if self.install_mode and not self.secure:
            raise ValueError("install_mode sets a Secure Channel key; it needs secure = true")
        return self


class OsdpReaderOptions(OsdpOptions):
    """Options of the OSDP reader."""

    keypad: bool = False
    """Turn keypad entries ended by ``#`` into ``"pin:<digits>"`` reads."""

    pin_max_digits: int = Field(default=8, ge=1, le=16)

    pin_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """A longer pause between two keys discards the digits typed so far."""


class OsdpRelayOptions(OsdpOptions):
    """Options of an OSDP PD output driving a lock."""

    output_no: int = Field(default=0, ge=0, le=255)

    active_high: bool = True
    """True: unlocked is output ON. False: unlocked is output OFF (a fail-safe lock wired
    to the PD's relay in its energised-when-locked way)."""



_REGISTRY_LOCK = threading.Lock()
_BUSES: dict[str, Bus] = {}
"""Open buses by the real path of their port: a by-id link and its /dev/ttyUSBn are one."""


def attach(port: str, baudrate: int, config: PdConfig, member: object, *,
           reader: str | None = None, output_no: int | None = None) -> tuple[Bus, Slot]:
    """The bus of ``port`` (opened at ``baudrate`` if it is not open yet) and the slot of
    ``config.address`` on it, with ``member`` as one of its users (``Bus.attach``)."""
    key = os.path.realpath(port)
    with _REGISTRY_LOCK:
        bus = _BUSES.get(key)
        if bus is None:
            bus = _BUSES[key] = Bus(key, port, baudrate)
        elif bus.baudrate != baudrate:
            raise DeviceError(f"osdp bus {port}: already open at {bus.baudrate} "
                              f"baud, not {baudrate}")
        try:
            return bus, bus.attach(config, member, reader=reader, output_no=output_no)
        except BaseException:
            if bus.empty:
                _BUSES.pop(key, None)
                bus.shutdown()
            raise


def detach(bus: Bus, slot: Slot, member: object) -> None:
    """Remove ``member`` from the bus; the last user closes it."""
    with _REGISTRY_LOCK:
        bus.detach(slot, member)
        if bus.empty:
            if _BUSES.get(bus.key) is bus:
                del _BUSES[bus.key]
            bus.shutdown()


def _pd_config(options: OsdpOptions) -> PdConfig:
    scbk = load_scbk(options.scbk_file) if options.secure and options.scbk_file else None
    if options.install_mode:
        _log.warning("osdp_install_mode", port=options.port, address=options.address,
                     risk="the key is sent under the public SCBK-D; bench or closed line "
                          "only, then set install_mode = false")
    return PdConfig(options.address, options.secure, scbk, options.install_mode)


# --- the drivers ---------------------------------------------------------------------------


class OsdpReader(Reader):
    """An OSDP reader (PD) at one address on an RS-485 line; the agent is the CP."""

    Options = OsdpReaderOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._bus: Bus | None = None
        self._slot: Slot | None = None
        self._pin = self._new_pin()
        self._pending: deque[CardRead] = deque()

    def _new_pin(self) -> PinAssembler:
        return PinAssembler(self.options.pin_max_digits, self.options.pin_timeout_s)

    @property
    def _what(self) -> str:
        return f"osdp reader {self.name}"

    def open(self) -> None:
        """Join the line's bus and wait (``open_timeout_s``) for the PD to be online, with
        Secure Channel unless ``secure = false``; DeviceError names port, address, reason."""
        self.close()
        libosdp()
        config = _pd_config(self.options)
        bus, slot = attach(self.options.port, self.options.baudrate, config, self,
                           reader=self.name)
        try:
            bus.wait_online(slot, self.options.open_timeout_s, self._what)
        except BaseException:
            detach(bus, slot, self)
            raise
        self._bus, self._slot = bus, slot
        self._pin = self._new_pin()
        self._pending.clear()
        self.rejected = 0

    def read(self, timeout: float) -> CardRead | None:
        """The next card (or PIN) read, or None after about ``timeout`` seconds; raises
        DeviceError when the PD is offline or the port failed."""
        bus, slot = self._bus, self._slot
        if bus is None or slot is None:
            raise DeviceError(f"{self._what}: not open")
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            bus.check(slot, self._what, self.options.open_timeout_s)
            if self._pending:
                return self._pending.popleft()
            events = slot.events
            if events is None:
                raise DeviceError(f"{self._what}: not open")
            remaining = deadline - time.monotonic()
            try:
                # Wake at least every 0.1 s to notice the PD going offline.
                event = events.get(timeout=min(max(remaining, 0.0), 0.1))
            except queue.Empty:
                if remaining <= 0:
                    return None
                continue
            self._decode(event)

    def _decode(self, event: dict[str, Any]) -> None:
        if event.get("event") == EVENT_CARDREAD:
            try:
                self._pending.append(CardRead(card_id(event)))
            except ValueError as exc:
                self._refuse(str(exc), len(event.get("data") or b""))
            return
        if not self.options.keypad:
            return
        for entry in self._pin.feed(event.get("data") or b"", time.monotonic()):
            if isinstance(entry, Pin):
                self._pending.append(CardRead(f"pin:{entry.digits}"))
            else:
                self._refuse(f"pin_{entry.reason}", entry.length)

    def _refuse(self, reason: str, length: int) -> None:
        self.rejected += 1
        _log.warning("reader_frame_rejected", reader=self.name, reason=reason, length=length)

    def feedback(self, granted: bool) -> None:
        """Green LED for a grant, red plus a short beep for a deny, for 500 ms."""
        bus, slot = self._bus, self._slot
        if bus is None or slot is None:
            raise DeviceError(f"{self._what}: not open")
        # A command the PD does not support is NAK'd, and libosdp then takes the PD
        # offline: send only what PDCAP announced.
        if slot.caps.get(CAP_LED, (0, 0))[0] > 0:
            self._led(bus, slot, granted)
        if not granted and slot.caps.get(CAP_AUDIBLE, (0, 0))[0] > 0:
            bus.submit(slot, {"command": CMD_BUZZER, "reader": 0, "control_code": 2,
                              "on_count": _DENY_BEEP_100MS, "off_count": 0, "rep_count": 1},
                       self._what)

    def _led(self, bus: Bus, slot: Slot, granted: bool) -> None:
        bus.submit(slot, {
            "command": CMD_LED, "reader": 0, "led_number": 0, "temporary": True,
            "control_code": 2,  # temporary state, start the timer (osdp_LED, table 24)
            "on_color": LED_GREEN if granted else LED_RED, "off_color": LED_NONE,
            "on_count": _FEEDBACK_100MS, "off_count": 0, "timer_count": _FEEDBACK_100MS,
        }, self._what)

    @property
    def status(self) -> dict[str, Any]:
        """Link and PD status: ``online``, ``secure``, ``state``, ``reason``, and
        ``tamper`` / ``power`` (True = tamper / power failure) once the PD reported them."""
        bus, slot = self._bus, self._slot
        if bus is None or slot is None:
            return {"online": False, "secure": False, "state": "closed", "reason": None}
        return bus.snapshot(slot)

    def alarms(self) -> dict[str, bool]:
        """The PD's local tamper and power-failure reports (osdp_LSTATR)."""
        status = self.status
        return {key: bool(status[key]) for key in ("tamper", "power") if key in status}

    def close(self) -> None:
        """Leave the bus (the last user closes the port); safe to call twice."""
        bus, slot = self._bus, self._slot
        self._bus = self._slot = None
        if bus is not None and slot is not None:
            detach(bus, slot, self)


class OsdpRelay(Relay):
    """An output of an OSDP PD (``osdp_OUT``) driving a lock."""

    Options = OsdpRelayOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._bus: Bus | None = None
        self._slot: Slot | None = None

    @property
    def _what(self) -> str:
        return f"osdp output {self.name}"

    def open(self) -> None:
        """Join the line's bus and wait for the PD to be online (SC when required)."""
        self.close()
        libosdp()
        config = _pd_config(self.options)
        bus, slot = attach(self.options.port, self.options.baudrate, config, self,
                           output_no=self.options.output_no)
        try:
            bus.wait_online(slot, self.options.open_timeout_s, self._what)
        except BaseException:
            detach(bus, slot, self)
            raise
        self._bus, self._slot = bus, slot

    def set(self, unlocked: bool) -> None:
        """Set the output permanently ON or OFF (``active_high`` maps unlocked to ON) and
        wait for the PD's acknowledgement; the state is re-sent if the PD reconnects."""
        bus, slot = self._bus, self._slot
        if bus is None or slot is None:
            raise DeviceError(f"{self._what}: not open")
        on = unlocked == self.options.active_high
        # control code 2: permanent ON, 1: permanent OFF, both abort a timed operation.
        bus.set_output(slot, self.options.output_no, 2 if on else 1, self._what)

    def close(self) -> None:
        """Leave the bus; safe to call twice."""
        bus, slot = self._bus, self._slot
        self._bus = self._slot = None
        if bus is not None and slot is not None:
            detach(bus, slot, self)
