"""The page's client of the agent's control socket (``web.sock``).

One request is one JSON object in one datagram (at most ``MAX_REQUEST`` bytes); the reply
is one datagram back to the address the client bound. Each call binds a fresh abstract
address (Linux autobind), so concurrent calls never read each other's replies. The
asynchronous ``AgentLink.call`` serves the web application without a thread; ``call_sync``
serves the command line.

Replies are returned as they come (``{"ok": false, ...}`` included), except that a reply
that is not a JSON object is an ``AgentUnavailable``: callers deal with refusals, which
carry a field and a rule, and treat a missing agent as one failure.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

MAX_REQUEST = 1024
"""The agent refuses longer request datagrams whole (agent.control.MAX_DATAGRAM)."""
RECV_BYTES = 256 * 1024
"""Room for the largest reply: the tenant list of a big building."""
DEFAULT_TIMEOUT_S = 5.0


class AgentUnavailable(Exception):  # noqa: N818 - reads as the condition, like TimeoutError
    """No agent answered on the socket (not running, wrong path, no permission, timeout),
    or its reply was not a JSON object."""


def _encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > MAX_REQUEST:
        raise ValueError(f"request of {len(data)} bytes is over the {MAX_REQUEST}-byte limit")
    return data


def _decode(data: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AgentUnavailable(f"the agent's reply is not JSON: {exc}") from exc
    if not isinstance(reply, dict):
        raise AgentUnavailable("the agent's reply is not a JSON object")
    return reply


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("")  # Linux autobind: a unique abstract address the agent replies to
    except OSError:
        sock.close()
        raise
    return sock


class AgentLink:
    """Requests to the agent at ``path``."""

    def __init__(self, path: Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout

    async def call(self, message: dict[str, Any], *,
                   timeout: float | None = None) -> dict[str, Any]:
        """Send ``message`` and wait for the reply; ``AgentUnavailable`` when none comes."""
        data = _encode(message)
        loop = asyncio.get_running_loop()
        sock = _socket()
        try:
            sock.setblocking(False)
            try:
                await loop.sock_sendto(sock, data, str(self.path))
                reply = await asyncio.wait_for(loop.sock_recv(sock, RECV_BYTES),
                                               timeout or self.timeout)
            except TimeoutError:
                raise AgentUnavailable("the agent did not answer in time") from None
            except OSError as exc:
                raise AgentUnavailable(f"cannot reach the agent at {self.path}: "
                                       f"{exc.strerror or type(exc).__name__}") from exc
        finally:
            sock.close()
        return _decode(reply)

    def call_sync(self, message: dict[str, Any], *,
                  timeout: float | None = None) -> dict[str, Any]:
        """The blocking form of ``call`` (the command line)."""
        data = _encode(message)
        with _socket() as sock:
            sock.settimeout(timeout or self.timeout)
            try:
                sock.sendto(data, str(self.path))
                reply = sock.recv(RECV_BYTES)
            except TimeoutError:
                raise AgentUnavailable("the agent did not answer in time") from None
            except OSError as exc:
                raise AgentUnavailable(f"cannot reach the agent at {self.path}: "
                                       f"{exc.strerror or type(exc).__name__}") from exc
        return _decode(reply)
