"""One builder for the agent configurations tests and benchmarks start: a site key (mode
0600) and a ``permitgate.toml`` in a folder, from a few keyword arguments instead of pasted
TOML.

``agent_toml`` gives the text, ``write_agent`` writes it with its key, ``agent_config``
also parses it as the agent does. A table key whose value is None is left out, so the
agent's default applies (``DoorSpec(unlock_s=None)`` has the agent's 5 s; ``keys={"site_key":
None}`` the key next to the store). Tests that check how the loader treats broken or
unusual TOML (tests/test_config.py) write their text by hand on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from agent.config import Config, load_config

KEY = bytes(range(32))
"""The site key tests use unless they say otherwise."""

SIMULATED: Mapping[str, Any] = {"driver": "simulated"}
"""A simulated device (relay, contact or exit button) without options."""


@dataclass(frozen=True)
class DoorSpec:
    """One ``[[doors]]`` table; ``extra`` holds further keys (``fail_mode``, ...)."""

    id: str = "front"
    unlock_s: float | None = 0.5
    relay: Mapping[str, Any] = field(default_factory=lambda: dict(SIMULATED))
    contact: Mapping[str, Any] | None = None
    rex: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReaderSpec:
    """One ``[[readers]]`` table; ``debounce_s=None`` leaves the agent's default."""

    id: str = "front-in"
    door: str = "front"
    direction: str = "entry"
    driver: str = "simulated"
    debounce_s: float | None = 0.2
    options: Mapping[str, Any] | None = None


def toml_value(value: Any) -> str:
    """A Python value in TOML (strings, paths, numbers, booleans, dates, lists, inline
    tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()
                                if v is not None) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _table(name: str, values: Mapping[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()
                             if v is not None]
    return "\n".join(lines) + "\n"


def agent_toml(folder: Path, *, doors: Sequence[DoorSpec] = (DoorSpec(),),
               readers: Sequence[ReaderSpec] = (ReaderSpec(),),
               policy: Mapping[str, Any] | None = None, sync: Mapping[str, Any] | None = None,
               store: Mapping[str, Any] | None = None, site_key: str | None = None,
               site_id: str = "test-site", gateway_id: str = "test-gw",
               site: Mapping[str, Any] | None = None, keys: Mapping[str, Any] | None = None,
               extra: str = "") -> str:
    """The TOML text of an agent configuration whose database and key live in ``folder``.

    ``site``, ``store``, ``keys``, ``policy`` and ``sync`` add keys to (or, with None,
    drop keys from) those tables; ``extra`` is appended as it is (further tables).
    """
    parts = [_table("site", {"site_id": site_id, "gateway_id": gateway_id, **(site or {})}),
             _table("store", {"path": str(folder / "pg.db"), **(store or {})}),
             _table("keys", {"site_key": site_key or str(folder / "site.key"),
                             **(keys or {})})]
    if policy:
        parts.append(_table("policy", policy))
    if sync:
        parts.append(_table("sync", sync))
    for door in doors:
        parts.append(_table("[doors]", {"id": door.id, "unlock_s": door.unlock_s,
                                        "relay": door.relay, "contact": door.contact,
                                        "rex": door.rex, **door.extra}))
    for reader in readers:
        parts.append(_table("[readers]", {
            "id": reader.id, "door": reader.door, "direction": reader.direction,
            "driver": reader.driver, "debounce_s": reader.debounce_s,
            "options": reader.options}))
    return "\n".join(parts) + extra


def write_key(folder: Path, key: bytes = KEY) -> Path:
    """Write ``key`` as hex to ``folder/site.key`` (mode 0600, as the agent demands)."""
    folder.mkdir(parents=True, exist_ok=True)
    key_path = folder / "site.key"
    key_path.write_text(key.hex())
    key_path.chmod(0o600)
    return key_path


def write_agent(folder: Path, *, key: bytes = KEY, name: str = "permitgate.toml",
                **kwargs: Any) -> Path:
    """Write ``site.key`` (mode 0600) and the configuration (``name``) into ``folder``;
    returns the configuration's path. Keyword arguments go to ``agent_toml``."""
    write_key(folder, key)
    config = folder / name
    config.write_text(agent_toml(folder, **kwargs))
    return config


def agent_config(folder: Path, *, key: bytes = KEY, **kwargs: Any) -> Config:
    """``write_agent``, then the configuration loaded as the agent loads it."""
    return load_config(write_agent(folder, key=key, **kwargs))
