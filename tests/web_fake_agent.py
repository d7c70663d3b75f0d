"""A stand-in for the agent's ``web.sock``, for unit tests of the page's own code only
(the page's end-to-end tests run against the real agent: tests/test_web_browser.py).

It answers each request from a table of canned replies by ``op`` and keeps every request
it got, so a test can check what the page asked for.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

Reply = dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]

SITE: dict[str, Any] = {
    "ok": True, "site": "test-site", "timezone": "Asia/Shanghai",
    "units": ["101", "102"], "readers": [{"id": "front-in", "door": "front",
                                          "direction": "entry"}],
    "provisional_h": 72, "capture_timeout_s": 60}


class FakeAgent:
    """Serves ``path`` on a thread until ``close``."""

    def __init__(self, path: Path, replies: dict[str, Reply] | None = None) -> None:
        self.path = path
        self.replies: dict[str, Reply] = {"site": SITE, "audit": {"ok": True},
                                          "tenants": {"ok": True, "tenants": []},
                                          **(replies or {})}
        self.requests: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            request = json.loads(data)
            self.requests.append(request)
            reply = self.replies.get(request.get("op"), {"ok": False, "error": "unknown_op",
                                                          "message": "no such op"})
            if callable(reply):
                reply = reply(request)
            if sender:
                self._sock.sendto(json.dumps(reply).encode(), sender)

    def ops(self) -> list[str]:
        """The ``op`` of every request so far, in order."""
        return [str(r.get("op")) for r in self.requests]

    def close(self) -> None:
        """Stop serving and remove the socket."""
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self.path.unlink(missing_ok=True)
