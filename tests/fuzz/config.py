"""Fuzz target of the configuration loader: a file's bytes in, a ``Config`` whose every
driver's options validate (``check-config``) and that the agent can set up, or
``ConfigError`` / ``DriverError`` naming the file, and nothing else.

``RICH`` is a valid document that names every driver with options, so that a mutation of
it (tests/test_fuzz_config.py) reaches each driver's option model.
"""

from __future__ import annotations

import math
import tempfile
import tomllib
from datetime import date, datetime
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from agent.config import Config, ConfigError, load_config
from agent.runtime import check_drivers
from drivers.registry import DriverError
from tests.fuzz.common import REPO, Target
from tests.fuzz.strategies import mutate_json

_TMP = tempfile.TemporaryDirectory(prefix="permitgate-fuzz-config-")
"""Where each input is written to be loaded as a file; removed when the process ends."""
SOURCE = Path(_TMP.name) / "fuzz.toml"

RICH: dict[str, Any] = {
    "site": {"site_id": "bldg-1", "gateway_id": "gw-1", "timezone": "Asia/Shanghai"},
    "store": {"path": "data/pg.db", "event_retention_days": 180},
    "keys": {"site_key": "site.key"},
    "policy": {"mode": "normal", "anti_passback": "soft", "anti_passback_reset_h": 24.0,
               "holidays": [date(2026, 10, 1)],
               "schedules": {"day": {"mon": ["06:00-23:00"], "holiday": ["08:00-24:00"]}}},
    "sync": {"enabled": True, "host": "broker.example", "port": 8883, "prefix": "pg/v1"},
    "enrollment": {"enabled": True, "units": ["301", "302"]},
    "web": {"port": 8443, "allowed_hosts": ["gw.local"]},
    "doors": [
        {"id": "front", "relay": {"driver": "gpio", "options": {"line": 17}},
         "contact": {"driver": "gpio", "options": {"line": 22, "bias": "pull_up"}},
         "rex": {"driver": "simulated"}, "schedule": "day"},
        {"id": "back", "relay": {"driver": "relay_board",
                                 "options": {"port": "/dev/ttyUSB9", "channel": 2}}},
        {"id": "gate", "relay": {"driver": "osdp", "options": {
            "port": "/dev/ttyUSB3", "address": 2, "secure": False, "output_no": 1}}},
    ],
    "readers": [
        {"id": "front-in", "door": "front", "direction": "entry", "driver": "serial",
         "options": {"port": "/dev/ttyAMA0", "format": "ascii",
                     "pattern": "^(?P<card>[0-9A-F]{8})$", "id_kind": "uid"}},
        {"id": "front-out", "door": "front", "direction": "exit", "driver": "pn532",
         "options": {"port": "/dev/ttyS0", "poll_ms": 100}},
        {"id": "back-in", "door": "back", "direction": "entry", "driver": "idcard",
         "options": {"port": "/dev/ttyUSB1"}},
        {"id": "back-out", "door": "back", "direction": "exit", "driver": "qr",
         "options": {"port": "/dev/ttyACM0", "max_len": 256}},
        {"id": "gate-in", "door": "gate", "direction": "entry", "driver": "wiegand",
         "options": {"d0": 5, "d1": 6, "format": "h10306"}},
        {"id": "gate-out", "door": "gate", "direction": "exit", "driver": "osdp",
         "options": {"port": "/dev/ttyUSB3", "address": 1, "scbk_file": "pd1.key",
                     "keypad": True}},
        {"id": "gate-pc", "door": "gate", "direction": "entry", "driver": "pcsc",
         "options": {"reader": "ACR122"}},
    ],
}


# -- a small TOML writer (tomllib only reads) ---------------------------------------------


def toml_string(text: str) -> str:
    """A TOML basic string holding exactly ``text``."""
    out = []
    for char in text:
        if char in '"\\' or not (" " <= char <= "~"):
            out.append(f"\\U{ord(char):08X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:  # noqa: PLR0911 - one return per TOML type
    """``value`` as an inline TOML value (tables inline, arrays on one line). TOML has no
    null: a None in an array is written as an empty string, a key set to None is left
    out."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(str(k))} = {toml_value(v)}"
                               for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_document(doc: dict[str, Any]) -> str:
    """A TOML document: one ``key = value`` line per top-level key."""
    return "".join(f"{toml_string(str(k))} = {toml_value(v)}\n" for k, v in doc.items()
                   if v is not None)


# -- the target ----------------------------------------------------------------------------


def _can_be_set_up(config: Config) -> None:
    """What the agent computes from a loaded configuration before it opens anything."""
    config.zone.utcoffset(datetime(2026, 1, 1))
    for hours in (config.policy.anti_passback_reset_h, config.sync.recent_window_h):
        int(hours * 3600)
    for door in config.doors:
        int(door.unlock_s * 1000)
        for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun", "holiday"):
            if door.schedule != "always":
                config.policy.schedules[door.schedule].windows(day)


def config_file(data: bytes) -> None:
    """Any file loads to a configuration whose drivers' options validate and that can be
    set up, or is refused with ConfigError or DriverError; a ConfigError names the file."""
    SOURCE.write_bytes(data)
    try:
        config = load_config(SOURCE)
    except ConfigError as exc:
        assert str(exc).startswith(f"{SOURCE}:"), str(exc)[:200]
        return
    assert isinstance(config, Config)
    try:
        check_drivers(config)
    except DriverError as exc:
        assert str(exc), "a DriverError names the key"
        return
    _can_be_set_up(config)


def _seeds() -> list[bytes]:
    defaults = (REPO / "agent" / "defaults.toml").read_bytes()
    example = (REPO / "config" / "permitgate.example.toml").read_bytes()
    return [defaults, example, toml_document(RICH).encode()]


# -- structure-aware inputs ------------------------------------------------------------------

CONFIG_ATOMS: st.SearchStrategy[Any] = st.one_of(
    st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(), st.text(max_size=30), st.dates(),
    st.sampled_from([0, -1, 2**63, 10**30, 1e308, 87_600.0, 87_601.0, "", "\x00", "a\x00b",
                     "Asia", "../../etc", "UTC", "(?P<card>(a+)+)", "(?P<card>" + "(" * 200,
                     "(?P<card>[0-9A-F]{8})", "24:00-24:00", "23:00-01:00", "simulated",
                     "serial", "gpio", "osdp", "/dev/ttyUSB0", "ascii", "em4100"]),
)
"""TOML values of every type (TOML has no null), with the sizes and strings that matter."""
CONFIG_VALUES: st.SearchStrategy[Any] = st.recursive(
    CONFIG_ATOMS, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=4)),
    max_leaves=10)


def _config_structured() -> st.SearchStrategy[bytes]:
    defaults = tomllib.loads((REPO / "agent" / "defaults.toml").read_text("utf-8"))
    return st.sampled_from([RICH, defaults]).flatmap(
        lambda doc: mutate_json(doc, CONFIG_VALUES)).map(
        lambda doc: toml_document(doc if isinstance(doc, dict) else {"site": doc}).encode())


TARGETS: list[Target] = [
    Target("config", config_file, 16384, "config.load_config + runtime.check_drivers", _seeds,
           _config_structured),
]
