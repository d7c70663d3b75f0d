"""The configuration a provisioned gateway starts from: the shipped example with the
site's values put in, edited as text so that its comments and layout stay for the
installer to read and change.

Only top-level scalar keys of ``[table]`` sections are set (``[site] gateway_id``,
``[sync] host``, ...): an existing line keeps its comment, a missing key is added at the
end of its table, a missing table at the end of the file. Every edited text is parsed as
the agent parses it (``agent.config.parse_config``) before it is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from agent.config import Config, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "permitgate.example.toml"
"""The shipped example, where ``install.sh`` puts the checkout (``/opt/permitgate``)."""

Value = str | int | bool

_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")


def toml_scalar(value: Value) -> str:
    """A string, integer or boolean as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _table_span(lines: list[str], table: str) -> tuple[int, int] | None:
    """``(header line, end)`` of ``[table]``: the body is ``lines[header + 1:end]``."""
    start = None
    for number, line in enumerate(lines):
        match = _HEADER.match(line)
        if start is None:
            if match and match.group(1) == table:
                start = number
        elif _ANY_HEADER.match(line):
            return start, number
    return None if start is None else (start, len(lines))


def set_keys(text: str, table: str, values: Mapping[str, Value], *,
             comment: str | None = None) -> str:
    """``text`` with each key of ``values`` set in ``[table]``; a table that is not there
    is added at the end, under ``comment`` when one is given."""
    lines = text.splitlines()
    span = _table_span(lines, table)
    if span is None:
        if lines and lines[-1].strip():
            lines.append("")
        if comment is not None:
            lines.append(f"# {comment}")
        lines.append(f"[{table}]")
        span = (len(lines) - 1, len(lines))
    start, end = span
    for key, value in values.items():
        pattern = re.compile(rf'^(\s*{re.escape(key)}\s*=\s*)("[^"]*"|[^\s#]+)(.*)$')
        for number in range(start + 1, end):
            match = pattern.match(lines[number])
            if match:
                lines[number] = match.group(1) + toml_scalar(value) + match.group(3)
                break
        else:
            last = end
            while last > start + 1 and not lines[last - 1].strip():
                last -= 1
            lines.insert(last, f"{key} = {toml_scalar(value)}")
            end += 1
    return "\n".join(lines) + "\n"


def gateway_config(example: str, *, gateway_id: str, site_id: str, broker_host: str,
                   broker_port: int, timezone: str | None = None,
                   store: str | None = None, source: str = "permitgate.toml") -> str:
    """The example configuration with this gateway's values: its ids (and time zone),
    the store path when given, and a ``[sync]`` section for the office's broker over TLS.
    ``ConfigError`` (naming ``source``) when the result is not a valid configuration."""
    site: dict[str, Value] = {"site_id": site_id, "gateway_id": gateway_id}
    if timezone is not None:
        site["timezone"] = timezone
    text = set_keys(example, "site", site)
    if store is not None:
        text = set_keys(text, "store", {"path": store})
    text = set_keys(text, "sync", {"enabled": True, "host": broker_host,
                                   "port": broker_port, "tls": True},
                    comment="The office's broker, over TLS with this gateway's certificate "
                    "(docs/operations.md).")
    check(text, source)
    return text


def check(text: str, source: str) -> Config:
    """The configuration ``text`` parsed as the agent parses it."""
    return parse_config(text, source)
