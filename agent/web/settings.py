"""What the page's server process is told: plain values, already validated and resolved.

``permitgate-web run`` validates the whole configuration with the agent's own models
(``agent.config``) and resolves every path (``agent.resolve``), then starts the server with
these settings as JSON (``PERMITGATE_WEB_SETTINGS``). The server imports neither pydantic
nor the agent's modules, which would double its memory on a Pi (agent/web/__init__.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config import Config

ENV_VAR = "PERMITGATE_WEB_SETTINGS"
DB_NAME = "web.db"


class SettingsError(ValueError):
    """The settings cannot serve the page; the message names the key."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server process needs."""

    listen: str
    port: int
    tls_cert: str | None
    tls_key: str | None
    allowed_hosts: tuple[str, ...]
    state_dir: str
    agent_socket: str
    timezone: str
    session_idle_s: float = 30 * 60.0
    session_max_s: float = 12 * 3600.0
    language: str = "auto"
    log_level: str = "info"
    log_format: str = "auto"

    @property
    def tls(self) -> bool:
        """Whether the page is served over HTTPS."""
        return self.tls_cert is not None

    @property
    def db_path(self) -> Path:
        """The page's own database."""
        return Path(self.state_dir) / DB_NAME

    def to_json(self) -> str:
        """The settings as one JSON object."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        """Settings from ``to_json``'s output."""
        raw: dict[str, Any] = json.loads(text)
        raw["allowed_hosts"] = tuple(raw["allowed_hosts"])
        return cls(**raw)

    def check(self) -> None:
        """Refuse settings that would serve the page unsafely."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("web.tls_cert and web.tls_key: set both (HTTPS) or neither "
                                "(plain HTTP on localhost only)")
        if not self.tls and not is_loopback(self.listen):
            raise SettingsError(f"web.listen: plain HTTP (no tls_cert) is served on "
                                f"localhost only, not on {self.listen!r}: give the device "
                                "certificate (web.tls_cert, web.tls_key)")
        if not self.allowed_hosts:
            raise SettingsError("web.allowed_hosts: list the gateway's name and address")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def from_config(config: Config, config_path: Path | None) -> Settings:
    """Settings from a validated agent configuration (imports the agent's modules)."""
    from agent.keys import resolve_secret_path  # noqa: PLC0415 - kept out of the server
    from agent.resolve import config_dir, resolve_paths  # noqa: PLC0415

    web = config.web
    cfg_dir = config_dir(config_path)
    state_dir = web.state_dir if web.state_dir.is_absolute() else cfg_dir / web.state_dir

    def secret(name: str | None) -> str | None:
        # TOML has no null: "" or "none" switches HTTPS off (plain HTTP on localhost only).
        if name is None or name.strip().lower() in ("", "none"):
            return None
        return str(resolve_secret_path(name, state_dir, cfg_dir))

    settings = Settings(
        listen=web.listen, port=web.port, tls_cert=secret(web.tls_cert),
        tls_key=secret(web.tls_key), allowed_hosts=tuple(h.lower() for h in web.allowed_hosts),
        state_dir=str(state_dir),
        agent_socket=str(resolve_paths(config, config_path).web_socket),
        timezone=config.site.timezone, session_idle_s=web.session_idle_min * 60.0,
        session_max_s=web.session_max_h * 3600.0, language=web.language,
        log_level=config.logging.level, log_format=config.logging.format)
    settings.check()
    return settings
