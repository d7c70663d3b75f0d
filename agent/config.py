"""Configuration: one TOML file, validated in full before any device or file opens.

Unknown keys and wrong types are errors that name the key, the file and, where the TOML
parser or a line search can tell, the line. Secrets never live in the TOML: the file names
them, and :mod:`agent.keys` reads them from files or systemd's credentials directory.
"""

from __future__ import annotations

import math
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

from agent.line_patterns import MAX_PATTERN_CHARS, line_pattern_problem
from agent.toml_lines import key_lines

__all__ = [  # the reader patterns' check is imported from here too
    "DEFAULT_CONFIG_NAME",
    "MAX_HOURS",
    "MAX_PATTERN_CHARS",
    "WEEKDAYS",
    "Config",
    "ConfigError",
    "DeviceConfig",
    "DoorConfig",
    "EnrollmentConfig",
    "Ident",
    "KeysConfig",
    "LoggingConfig",
    "PolicyConfig",
    "ReaderConfig",
    "SiteConfig",
    "StoreConfig",
    "SyncConfig",
    "WebConfig",
    "WeeklySchedule",
    "line_pattern_problem",
    "load_config",
    "parse_broker",
    "parse_config",
    "parse_window",
]

DEFAULT_CONFIG_NAME = "<embedded defaults>"

Ident = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
"""Ids of sites, gateways, doors, readers and schedules: lower-case, MQTT-topic safe."""

# [0-9], not \d (which admits other scripts' digits), and fullmatch, not "$" (which admits a
# trailing newline).
_WINDOW = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_HOURS = 87_600.0
"""Ten years: the bound of every setting in hours. The agent turns them into whole seconds
(``int(hours * 3600)``), which a finite but huge float (1e308) would overflow."""


class ConfigError(Exception):
    """The configuration is unusable; the message names the file, key and line."""


class _Model(BaseModel):
    # strict: "5" is not a number and "yes" is not a boolean; a wrong type is an error
    # naming the key. Fields that TOML can only spell loosely (paths as strings, tuples as
    # arrays) opt out one by one with Field(strict=False). TOML spells inf and nan, and no
    # setting means either: int(inf * 3600) is an OverflowError at set-up, not a config error.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


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
        # ZoneInfo("Asia") raises IsADirectoryError (an OSError), not ZoneInfoNotFoundError,
        # and an unreadable zone file PermissionError; both are a bad value, not a crash.
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as "
                             "'Asia/Shanghai')") from exc
        return value


class StoreConfig(_Model):
    """Where the SQLite database lives and how long events are kept."""

    path: Path = Field(default=Path("/var/lib/permitgate/permitgate.db"), strict=False)
    event_retention_days: int = Field(default=180, ge=1, le=3650)
    max_events: int = Field(default=2_000_000, ge=1_000, le=1_000_000_000)
    """Bounded so that it (and arithmetic on it) fits SQLite's 64-bit integers; TOML itself
    admits integers of any size."""
    prune_interval_s: float = Field(default=3600.0, gt=0)
    reserve_mb: int = Field(default=8, ge=0, le=1024)
    """Space kept in ``reserve.bin`` beside the database and given back when the disk
    fills, so the alarm and the next start still have room (agent/diskspace.py); 0 = none."""


class KeysConfig(_Model):
    """Names of secret files; each is a path, or a bare name looked up in
    ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``) first."""

    site_key: str = "site.key"
    generate_missing: bool = False
    signing_key: str = "gateway-signing.key"
    """This gateway's Ed25519 private key (PEM, made by ``permitgate provision``): it signs
    the enrollments the gateway reports. Without the file (a gateway installed before
    provisioning existed) they go unsigned."""
    seal_key: str = "gateway-seal.key"
    """This gateway's X25519 private key (PEM, made by ``permitgate provision``): what the
    office seals to this gateway (its site key) opens with it. Optional like
    ``signing_key``."""


class WeeklySchedule(_Model):
    """Windows per weekday, ``"HH:MM-HH:MM"`` in site local time, end exclusive.

    ``holiday`` lists the windows that apply on a holiday date instead of the weekday's.
    """

    mon: tuple[str, ...] = Field(default=(), strict=False)
    tue: tuple[str, ...] = Field(default=(), strict=False)
    wed: tuple[str, ...] = Field(default=(), strict=False)
    thu: tuple[str, ...] = Field(default=(), strict=False)
    fri: tuple[str, ...] = Field(default=(), strict=False)
    sat: tuple[str, ...] = Field(default=(), strict=False)
    sun: tuple[str, ...] = Field(default=(), strict=False)
    holiday: tuple[str, ...] = Field(default=(), strict=False)

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
    match = _WINDOW.fullmatch(window)
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
    anti_passback_reset_h: float = Field(default=24.0, ge=0, le=MAX_HOURS)
    holidays: tuple[date, ...] = Field(default=(), strict=False)
    schedules: dict[Ident, WeeklySchedule] = Field(default_factory=dict)
    clock_floor: date = date(2026, 1, 1)
    clock_max_ahead_days: int = Field(default=30, ge=1, le=3650)
    """After a restart, a clock more than this far past the trusted floor (agent/clock.py)
    is judged ``ahead`` until the office or NTP confirms it."""
    clock_trust_ntp: bool = True
    """Take the kernel's NTP-synchronised state as a trusted time source."""

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


class SyncConfig(_Model):
    """The link to the central office's MQTT broker (docs/protocol.md)."""

    enabled: bool = False
    host: str = "localhost"
    port: int = Field(default=8883, ge=1, le=65535)
    brokers: tuple[Annotated[str, Field(max_length=261)], ...] = Field(
        default=(), strict=False, max_length=16)
    """The nodes of a clustered broker, ``"host:port"`` each (``"[v6 address]:port"``),
    tried in this order, the next one after a failed connect or a lost link. Empty: the
    one broker ``host``:``port``; set, it replaces them (giving both is refused)."""
    protocol: Literal["5", "3.1.1"] = "5"
    tls: bool = True
    ca_file: str = "ca.crt"
    cert_file: str = "gateway.crt"
    key_file: str = "gateway.key"
    """TLS files: bare names are looked up like keys (credentials directory, then the store
    folder); the client certificate's CN is the gateway id."""
    username: str | None = None
    password_file: str | None = None
    prefix: str = Field(default="pg/v1", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    trusted_keys: str = "trusted-keys.txt"
    """The office's Ed25519 public keys, ``<key id> <base64>`` a line."""
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    batch_size: int = Field(default=500, ge=1, le=10_000)
    ack_timeout_s: float = Field(default=15.0, gt=0, le=3600)
    status_interval_s: float = Field(default=60.0, ge=1, le=3600)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """The largest payload accepted, and sent (event batches are cut to fit). The default
    is the shipped broker's ``message_size_limit`` (protocol.messages.MAX_MESSAGE_BYTES):
    the broker forwards nothing larger anyway."""
    heartbeat_max_age_s: int = Field(default=86_400, ge=1, le=int(MAX_HOURS * 3600))
    """Past this age of the newest valid heartbeat the lists are stale: an alarm is raised
    and ``offline_policy`` applies."""
    offline_policy: Literal["keep_deciding", "recent_only"] = "keep_deciding"
    recent_window_h: float = Field(default=168.0, gt=0, le=MAX_HOURS)
    """With ``recent_only``: while stale, admit only permits the office confirmed within
    this many hours."""
    resync_interval_s: float = Field(default=30.0, ge=1)
    """At most one resync request per this many seconds."""

    @model_validator(mode="after")
    def _brokers_or_host(self) -> SyncConfig:
        if self.brokers:
            given = sorted({"host", "port"} & self.model_fields_set)
            if given:
                raise ValueError(f"sync.brokers replaces sync.{' and sync.'.join(given)}: "
                                 "give the list, or host and port, not both")
            seen = set()
            for item in self.brokers:
                endpoint = parse_broker(item)
                if endpoint in seen:
                    raise ValueError(f"sync.brokers: {item!r} is listed twice")
                seen.add(endpoint)
        return self

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """The brokers to connect to, in order: ``brokers``, or ``host``:``port``."""
        if self.brokers:
            return tuple(parse_broker(item) for item in self.brokers)
        return ((self.host, self.port),)


_BROKER = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.-]+)):([0-9]{1,5})")


def parse_broker(item: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6 address]:port"``) as ``(host, port)``; ``ValueError``
    naming the item otherwise."""
    match = _BROKER.fullmatch(item)
    port = int(match.group(3)) if match else 0
    if match is None or not 1 <= port <= 65535:
        raise ValueError(f"sync.brokers: {item!r} is not \"host:port\" (a host name or "
                         "address, \"[v6 address]\" for IPv6, and a port 1 to 65535)")
    return match.group(1) or match.group(2), port


class LoggingConfig(_Model):
    """Log format and level."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class EnrollmentConfig(_Model):
    """Landlords enrolling tenants at the gateway (docs/landlord.md)."""

    enabled: bool = False
    units: tuple[Annotated[str, Field(min_length=1, max_length=32,
                                      pattern=r"^[0-9A-Za-z][0-9A-Za-z._-]*$")], ...] = Field(
        default=(), strict=False, max_length=5000)
    """The building's units (flats, rooms) a tenant can be enrolled to."""
    provisional_h: float = Field(default=72.0, gt=0, le=24 * 30)
    """Access a new enrollment gives before the office answers, at most."""
    capture_timeout_s: float = Field(default=60.0, ge=5, le=600)
    """How long a capture waits for the card's tap."""
    max_lease_days: int = Field(default=3660, ge=1, le=36_600)
    seal_key: str = "office-seal.pub"
    """The office's X25519 public key permit numbers are sealed to (a file, looked up like
    the other keys)."""
    web_socket: str | None = None
    """Where the landlord page's control socket is made (default: ``web.sock`` in the data
    folder). An installed gateway puts it in ``/run/permitgate/`` (the agent's runtime
    folder, group-traversable), since the data folder is private to the agent."""
    web_group: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    """The group of the landlord page's service user: the page's control socket
    (``web.sock``) is made writable for it."""

    @model_validator(mode="after")
    def _units_when_enabled(self) -> EnrollmentConfig:
        if self.enabled and not self.units:
            raise ValueError("enrollment.units: list the building's units when enrollment "
                             "is enabled")
        if len(set(self.units)) != len(self.units):
            raise ValueError("enrollment.units: a unit is listed twice")
        return self


class WebConfig(_Model):
    """The landlord page (``permitgate web``): its own process and service user."""

    listen: str = "0.0.0.0"  # noqa: S104 - the page serves the building's network
    port: int = Field(default=8443, ge=1, le=65535)
    tls_cert: str | None = "web.crt"
    tls_key: str | None = "web.key"
    """HTTPS with the device certificate from the site PKI; set both to none for plain
    HTTP, which the page then serves on localhost only."""
    allowed_hosts: tuple[Annotated[str, Field(min_length=1, max_length=253)], ...] = Field(
        default=("localhost", "127.0.0.1"), strict=False)
    """Host header values the page answers (DNS-rebinding defence): the gateway's name
    and address on the building's network."""
    state_dir: Path = Field(default=Path("/var/lib/permitgate-web"), strict=False)
    """The page's own folder: accounts and sessions (web.db)."""
    session_idle_min: float = Field(default=30.0, gt=0, le=24 * 60)
    session_max_h: float = Field(default=12.0, gt=0, le=24 * 30)
    language: Literal["auto", "zh", "en"] = "auto"


class Config(_Model):
    """The whole agent configuration."""

    site: SiteConfig
    store: StoreConfig = StoreConfig()
    keys: KeysConfig = KeysConfig()
    policy: PolicyConfig = PolicyConfig()
    logging: LoggingConfig = LoggingConfig()
    sync: SyncConfig = SyncConfig()
    enrollment: EnrollmentConfig = EnrollmentConfig()
    web: WebConfig = WebConfig()
    doors: tuple[DoorConfig, ...] = Field(min_length=1, strict=False)
    readers: tuple[ReaderConfig, ...] = Field(min_length=1, strict=False)

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
        """The door with ``door_id``; ``KeyError`` if there is none."""
        # Not a bare next(): its StopIteration would silently end a caller's map() or loop.
        for door in self.doors:
            if door.id == door_id:
                return door
        raise KeyError(door_id)

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
    """Best-effort line number of the key at ``loc`` in the TOML source.

    The key's own line where it is written; for a key that is missing (or a problem with a
    whole table) the line of the nearest enclosing table or key that is written, so
    ``id`` missing from the second ``[[doors]]`` points at that block's header.
    """
    lines = key_lines(text)
    path = tuple(p for p in loc if p != "[key]")
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _problem(source: str, text: str, loc: tuple[int | str, ...], message: str) -> str:
    """One problem line: ``  FILE:LINE: key.path: message``."""
    key = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
    line = _line_of(text, loc)
    where = f"{source}:{line}: " if line else f"{source}: "
    return f"  {where}{key or '<top level>'}: {message}"


def _format_problems(source: str, problems: list[str]) -> str:
    return "\n".join([f"{source}: invalid configuration ({len(problems)} problem(s)):",
                      *problems])


def _format_validation(error: ValidationError, source: str, text: str) -> str:
    lines = [f"{source}: invalid configuration ({error.error_count()} problem(s)):"]
    for item in error.errors():
        loc = tuple(item["loc"])
        kind = item["type"]
        message = item["msg"]
        if kind == "extra_forbidden":
            message = "unknown key (check the spelling; see docs/configuration.md)"
        elif kind == "missing":
            message = "required key is missing"
        shown = f" (got {item['input']!r})" if kind not in {"missing", "extra_forbidden"} and \
            not isinstance(item.get("input"), dict) else ""
        lines.append(_problem(source, text, loc, f"{message}{shown}"))
    return "\n".join(lines)


def _value_problems(value: object, loc: tuple[int | str, ...] = ()
                    ) -> list[tuple[tuple[int | str, ...], str]]:
    """Values no setting can mean, anywhere in the document (driver options included, which
    the schema here does not know): a NUL byte in a string (no path, device or name can hold
    one; ``open()`` raises ValueError on it) and a float that is inf or nan."""
    problems: list[tuple[tuple[int | str, ...], str]] = []
    # An explicit stack, not recursion: tomllib already refused documents nested deeper
    # than the interpreter's recursion limit, but this walk must not be the next to fail.
    stack: list[tuple[object, tuple[int | str, ...]]] = [(value, loc)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if "\0" in key:
                    problems.append((where, "a key contains a NUL byte (\\0)"))
                else:
                    stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, i)) for i, child in enumerate(item))
        elif isinstance(item, str) and "\0" in item:
            problems.append((where, "contains a NUL byte (\\0), which no path, device or "
                                    "name can hold"))
        elif isinstance(item, float) and not math.isfinite(item):
            problems.append((where, f"{item} is not accepted: give a finite number"))
    return problems


def _reader_pattern_problems(config: Config) -> list[tuple[tuple[int | str, ...], str]]:
    """Reader line patterns (any reader's ``options.pattern``) that could backtrack
    without end on a line a device sends."""
    problems: list[tuple[tuple[int | str, ...], str]] = []
    for i, reader in enumerate(config.readers):
        pattern = reader.options.get("pattern")
        if isinstance(pattern, str):
            problem = line_pattern_problem(pattern)
            if problem is not None:
                problems.append((("readers", i, "options", "pattern"), problem))
    return problems


def parse_config(text: str, source: str) -> Config:
    """Parse and validate TOML ``text``; ``source`` names it in errors.

    Raises ``ConfigError`` and nothing else, whatever ``text`` holds.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: "a = [[[[..." a few
        # thousand deep exhausts the interpreter's stack.
        raise ConfigError(f"{source}: not valid TOML: arrays or inline tables nested too "
                          "deeply") from None
    _raise_problems(_value_problems(raw), source, text)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source, text)) from exc
    _raise_problems(_reader_pattern_problems(config), source, text)
    return config


def _raise_problems(problems: list[tuple[tuple[int | str, ...], str]], source: str,
                    text: str) -> None:
    """``ConfigError`` listing ``problems`` in the order of their lines, if there are any."""
    if problems:
        problems.sort(key=lambda p: _line_of(text, p[0]) or 0)
        raise ConfigError(_format_problems(
            source, [_problem(source, text, loc, message) for loc, message in problems]))


def load_config(path: Path | None) -> Config:
    """Load ``path``, or the embedded defaults (a simulated site) when ``path`` is None."""
    if path is None:
        text = resources.files("agent").joinpath("defaults.toml").read_text("utf-8-sig")
        return parse_config(text, DEFAULT_CONFIG_NAME)
    try:
        text = path.read_text("utf-8-sig")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
    return parse_config(text, str(path))
