"""What every response and every state-changing request of the page must pass.

- ``Guard`` (ASGI middleware, outermost): a request whose ``Host`` is not in
  ``[web] allowed_hosts`` gets a bare 421 before anything else runs: a page on a LAN
  address is otherwise open to DNS rebinding from any web site its users visit. Every
  response carries the security headers: a CSP with no inline script or style, no
  framing, ``Referrer-Policy: same-origin`` (``no-referrer`` makes Chromium send
  ``Origin: null`` on same-origin form posts, which the origin check below would refuse),
  and ``Cache-Control: no-store`` on everything but the static files.
- ``same_origin``: a POST must come from the page itself, by ``Sec-Fetch-Site:
  same-origin`` where the browser sends it and by ``Origin`` otherwise; a request with
  neither is refused. A per-session token (``csrf_ok``) must match as well.

No ``Strict-Transport-Security``: the device certificate comes from the site's own CA,
which landlords' phones usually do not trust, and HSTS would make the browser's
certificate warning impossible to pass.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "manifest-src 'self'")
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
)
NO_STORE = (b"cache-control", b"no-store")
STATIC_CACHE = (b"cache-control", b"private, max-age=3600")


def host_name(host: str) -> str:
    """The name part of a ``Host`` header (``[::1]:8443`` is ``::1``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def host_allowed(host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a ``Host`` header names this gateway (with or without the port)."""
    if not host:
        return False
    full = host.strip().lower()
    name = host_name(full)
    return any(entry in (full, name) for entry in allowed)


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (the first one), as text."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def same_origin(scope: Scope, origin: str) -> bool:
    """Whether a request comes from the page at ``origin`` (``https://host:port``)."""
    fetch_site = header(scope, b"sec-fetch-site")
    sent_origin = header(scope, b"origin")
    if sent_origin == "null":
        sent_origin = None  # a privacy-stripped origin: let Sec-Fetch-Site speak
    if fetch_site is None and sent_origin is None:
        return False
    if fetch_site is not None and fetch_site != "same-origin":
        return False
    return sent_origin is None or hmac.compare_digest(sent_origin.encode(), origin.encode())


def csrf_ok(expected: str | None, given: str | None) -> bool:
    """Whether the form's token is the session's, compared in full and in constant time."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


class Guard:
    """Host allowlist and security headers around the whole application."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed = tuple(h.lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not host_allowed(header(scope, b"host"), self.allowed):
            await _plain(send, 421, b"This gateway does not answer to that host name.\n")
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = [
                    (k, v) for k, v in message.get("headers", [])
                    if k.lower() not in (b"cache-control", b"server")]
                headers.extend(HEADERS)
                headers.append(STATIC_CACHE if static else NO_STORE)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *HEADERS,
                            NO_STORE]})
    await send({"type": "http.response.body", "body": body})
