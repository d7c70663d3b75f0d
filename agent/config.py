"""Configuration: one TOML file, validated in full before any device or file opens.

Unknown keys and wrong types are errors that name the key, the file and, where the TOML
parser or a line search can tell, the line. Secrets never live in the TOML: the file names
them, and :mod:`agent.keys` reads them from files or systemd's credentials directory.
"""

from __future__ import annotations

import re
import tomllib
from datetime import date, time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_NAME = "<embedded defaults>"

Ident = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
"""Ids of sites, gateways, doors, readers and schedules: lower-case, MQTT-topic safe."""

_WINDOW = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class ConfigError(Exception):
    """The configuration is unusable; the message names the file, key and line."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteConfig(_Model):
    """Who this gateway is and which clock its schedules follow."""

    site_id: Ident
    gateway_id: Ident
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as "
                             "'Asia/Shanghai')") from exc
        return value


class StoreConfig(_Model):
    """Where the SQLite database lives and how long events are kept."""

    path: Path = Path("/var/lib/permitgate/permitgate.db")
    event_retention_days: int = Field(default=180, ge=1, le=3650)
    max_events: int = Field(default=2_000_000, ge=1_000)
    prune_interval_s: float = Field(default=3600.0, gt=0)


class KeysConfig(_Model):
    """Names of secret files; each is a path, or a bare name looked up in
    ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``) first."""

    site_key: str = "site.key"
    generate_missing: bool = False


class WeeklySchedule(_Model):
    """Windows per weekday, ``"HH:MM-HH:MM"`` in site local time, end exclusive.

    ``holiday`` lists the windows that apply on a holiday date instead of the weekday's.
    """

    mon: tuple[str, ...] = ()
    tue: tuple[str, ...] = ()
    wed: tuple[str, ...] = ()
    thu: tuple[str, ...] = ()
    fri: tuple[str, ...] = ()
    sat: tuple[str, ...] = ()
    sun: tuple[str, ...] = ()
    holiday: tuple[str, ...] = ()

    @field_validator("mon", "tue", "wed", "thu", "fri", "sat", "sun", "holiday")
    @classmethod
    def _windows(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for window in value:
            parse_window(window)
        return value

    def windows(self, day: str) -> tuple[tuple[time, time | None], ...]:
        """Parsed windows of ``day`` (a weekday key or ``holiday``)."""
        raw: tuple[str, ...] = getattr(self, day)
        return tuple(parse_window(w) for w in raw)


def parse_window(window: str) -> tuple[time, time | None]:
    """Parse ``"HH:MM-HH:MM"``; an end of ``24:00`` is returned as ``None`` (end of day)."""
    match = _WINDOW.match(window)
    if not match:
        raise ValueError(f"window {window!r} is not 'HH:MM-HH:MM'")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise ValueError(f"window {window!r} has an impossible time")
    start = time(h1, m1)
    end = None if h2 == 24 else time(h2, m2)
    if end is not None and end <= start:
        raise ValueError(f"window {window!r} ends before it starts (split it at midnight)")
    return start, end


class PolicyConfig(_Model):
    """Site-wide decision switches."""

    mode: Literal["normal", "lockdown", "free_passage"] = "normal"
    anti_passback: Literal["off", "soft", "hard"] = "off"
    anti_passback_reset_h: float = Field(default=24.0, ge=0)
    holidays: tuple[date, ...] = ()
    schedules: dict[Ident, WeeklySchedule] = Field(default_factory=dict)
    clock_floor: date = date(2026, 1, 1)

    @field_validator("schedules")
    @classmethod
    def _no_builtin_override(cls, value: dict[str, WeeklySchedule]) -> dict[str, WeeklySchedule]:
        if "always" in value:
            raise ValueError("'always' is built in (every day, all day) and cannot be redefined")
        return value


class DeviceConfig(_Model):
    """A driver name and its own options, checked by the driver before anything opens."""

    driver: str
    options: dict[str, Any] = Field(default_factory=dict)


class DoorConfig(_Model):
    """One door: its relay, optional inputs, timing and failure mode."""

    id: Ident
    name: str = ""
    relay: DeviceConfig = DeviceConfig(driver="simulated")
    contact: DeviceConfig | None = None
    rex: DeviceConfig | None = None
    unlock_s: float = Field(default=5.0, gt=0, le=600)
    held_open_s: float = Field(default=30.0, gt=0, le=3600)
    fail_mode: Literal["secure", "safe"] = "secure"
    schedule: Ident = "always"
    rex_unlocks: bool = True


class ReaderConfig(_Model):
    """One reader: which door and side it serves and how to talk to it."""

    id: Ident
    door: Ident
    direction: Literal["entry", "exit"]
    driver: str
    options: dict[str, Any] = Field(default_factory=dict)
    debounce_s: float = Field(default=1.5, ge=0, le=60)


class LoggingConfig(_Model):
    """Log format and level."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Model):
    """The whole agent configuration."""

    site: SiteConfig
    store: StoreConfig = StoreConfig()
    keys: KeysConfig = KeysConfig()
    policy: PolicyConfig = PolicyConfig()
    logging: LoggingConfig = LoggingConfig()
    doors: tuple[DoorConfig, ...] = Field(min_length=1)
    readers: tuple[ReaderConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        door_ids = [d.id for d in self.doors]
        _unique(door_ids, "doors")
        _unique([r.id for r in self.readers], "readers")
        schedules = {"always", *self.policy.schedules}
        for i, door in enumerate(self.doors):
            if door.schedule not in schedules:
                raise ValueError(f"doors[{i}].schedule: no schedule named {door.schedule!r} "
                                 f"(known: {', '.join(sorted(schedules))})")
        for i, reader in enumerate(self.readers):
            if reader.door not in door_ids:
                raise ValueError(f"readers[{i}].door: no door with id {reader.door!r} "
                                 f"(known: {', '.join(door_ids)})")
        return self

    def door(self, door_id: str) -> DoorConfig:
        """The door with ``door_id``."""
        return next(d for d in self.doors if d.id == door_id)

    @property
    def zone(self) -> ZoneInfo:
        """The site's time zone."""
        return ZoneInfo(self.site.timezone)


def _unique(ids: list[str], what: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{what}: id {i!r} is used twice")
        seen.add(i)


def _line_of(text: str, loc: tuple[int | str, ...]) -> int | None:
    """Best-effort line number of the key at ``loc`` in the TOML source."""
    keys = [k for k in loc if isinstance(k, str)]
    if not keys:
        return None
    last = keys[-1]
    pattern = re.compile(rf"^\s*(\"?){re.escape(last)}\1\s*=", re.MULTILINE)
    # Search after the nearest enclosing table header where one exists, so ``id`` in the
    # third ``[[doors]]`` block is found there and not in the first.
    start = 0
    index = next((k for k in reversed(loc) if isinstance(k, int)), None)
    for table in reversed(keys[:-1] or keys):
        headers = [m.start() for m in re.finditer(
            rf"^\s*\[\[?\s*{re.escape(table)}(\.[^\]]*)?\s*\]\]?", text, re.MULTILINE)]
        if headers:
            start = headers[min(index, len(headers) - 1)] if index is not None else headers[0]
            break
    match = pattern.search(text, start) or pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None


def _format_validation(error: ValidationError, source: str, text: str) -> str:
    lines = [f"{source}: invalid configuration ({error.error_count()} problem(s)):"]
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
        line = _line_of(text, loc)
        where = f"{source}:{line}: " if line else f"{source}: "
        kind = item["type"]
        message = item["msg"]
        if kind == "extra_forbidden":
            message = "unknown key (check the spelling; see docs/configuration.md)"
        elif kind == "missing":
            message = "required key is missing"
        shown = f" (got {item['input']!r})" if kind not in {"missing", "extra_forbidden"} and \
            not isinstance(item.get("input"), dict) else ""
        lines.append(f"  {where}{key or '<top level>'}: {message}{shown}")
    return "\n".join(lines)


def parse_config(text: str, source: str) -> Config:
    """Parse and validate TOML ``text``; ``source`` names it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source, text)) from exc


def load_config(path: Path | None) -> Config:
    """Load ``path``, or the embedded defaults (a simulated site) when ``path`` is None."""
    if path is None:
        text = resources.files("agent").joinpath("defaults.toml").read_text("utf-8")
        return parse_config(text, DEFAULT_CONFIG_NAME)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
    return parse_config(text, str(path))
