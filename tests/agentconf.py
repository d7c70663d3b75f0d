"""One builder for the agent configurations tests start: a site key (mode 0600) and a
``permitgate.toml`` in a folder, from a few keyword arguments instead of pasted TOML."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY = bytes(range(32))
"""The site key tests use unless they say otherwise."""


@dataclass(frozen=True)
class DoorSpec:
    """One ``[[doors]]`` table."""

    id: str = "front"
    unlock_s: float = 0.5
    relay: Mapping[str, Any] = field(default_factory=lambda: {"driver": "simulated"})
    contact: Mapping[str, Any] | None = None
    rex: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReaderSpec:
    """One ``[[readers]]`` table."""

    id: str = "front-in"
    door: str = "front"
    direction: str = "entry"
    driver: str = "simulated"
    debounce_s: float = 0.2
    options: Mapping[str, Any] | None = None


def toml_value(value: Any) -> str:
    """A Python value in TOML (strings, numbers, booleans, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
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
               extra: str = "") -> str:
    """The TOML text of an agent configuration whose database and key live in ``folder``."""
    parts = [_table("site", {"site_id": site_id, "gateway_id": gateway_id}),
             _table("store", {"path": str(folder / "pg.db"), **(store or {})}),
             _table("keys", {"site_key": site_key or str(folder / "site.key")})]
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


def write_agent(folder: Path, *, key: bytes = KEY, **kwargs: Any) -> Path:
    """Write ``site.key`` (mode 0600) and ``permitgate.toml`` into ``folder``; returns the
    configuration's path. Keyword arguments go to ``agent_toml``."""
    folder.mkdir(parents=True, exist_ok=True)
    key_path = folder / "site.key"
    key_path.write_text(key.hex())
    key_path.chmod(0o600)
    config = folder / "permitgate.toml"
    config.write_text(agent_toml(folder, **kwargs))
    return config
