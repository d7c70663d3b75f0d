"""The explicit table of drivers.

A driver module imports an optional hardware library (one installed as an extra, such as
libosdp or gpiod) inside ``open()``, so every module here imports on a machine without that
library, and options can be validated before any device opens. pyserial is a core
dependency and is imported normally.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from drivers.base import Input, Reader, Relay

Kind = Literal["reader", "relay", "input"]

READERS: dict[str, str] = {
    "idcard": "drivers.idcard:IdCardReader",
    "osdp": "drivers.osdp:OsdpReader",
    "pcsc": "drivers.pcsc:PcscReader",
    "qr": "drivers.qr:QrReader",
    "serial": "drivers.serial_reader:SerialReader",
    "pn532": "drivers.pn532:Pn532Reader",
    "simulated": "drivers.simulated:SimulatedReader",
    "wiegand": "drivers.wiegand:WiegandReader",
}
RELAYS: dict[str, str] = {
    "gpio": "drivers.gpio:GpioRelay",
    "osdp": "drivers.osdp:OsdpRelay",
    "relay_board": "drivers.relay_board:SerialRelayBoard",
    "simulated": "drivers.simulated:SimulatedRelay",
}
INPUTS: dict[str, str] = {
    "gpio": "drivers.gpio:GpioInput",
    "simulated": "drivers.simulated:SimulatedInput",
}
_TABLES: dict[Kind, dict[str, str]] = {"reader": READERS, "relay": RELAYS, "input": INPUTS}
_BASES: dict[Kind, type[Any]] = {"reader": Reader, "relay": Relay, "input": Input}

T = TypeVar("T")


class DriverError(Exception):
    """An unknown driver or invalid driver options; the message names the key."""


def driver_class(kind: Kind, name: str) -> type[Any]:
    """The class registered as ``name`` for ``kind``."""
    table = _TABLES[kind]
    if name not in table:
        raise DriverError(f"unknown {kind} driver {name!r} (known: {', '.join(sorted(table))})")
    module_name, _, class_name = table[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not issubclass(cls, _BASES[kind]):
        raise DriverError(f"{table[name]} is not a {kind} driver")
    return cls  # type: ignore[no-any-return]


def check_options(kind: Kind, name: str, options: dict[str, Any], where: str) -> None:
    """Validate a driver's options without opening anything; errors name ``where``."""
    try:
        cls = driver_class(kind, name)
    except DriverError as exc:
        raise DriverError(f"{where}.driver: {exc}") from exc
    try:
        cls.Options.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{where}.options.{'.'.join(str(p) for p in e['loc'])}: "
            + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors())
        raise DriverError(problems) from exc


def create(kind: Kind, name: str, device_name: str, options: dict[str, Any]) -> Any:
    """A new, unopened driver instance."""
    return driver_class(kind, name)(device_name, options)
