"""Benchmark: the landlord page on a real agent, as a landlord's phone uses it.

The agent (``python -m agent.cli run``, a serial EM4100 reader on a pseudo-terminal) and
the page (``permitgate-web run``, HTTPS with a self-signed certificate) run as child
processes (tests/web_site.py). ``--tenants`` enrollments are stored before the agent
starts. Then, over keep-alive HTTPS connections from this process:

- ``login_ms``: median of ``--logins`` sign-ins (POST /login to the redirect; argon2id
  m=19 MiB, t=2, p=1 is most of it);
- ``page_p95_ms`` (and ``page_p50_ms``): ``--requests`` GETs each of the tenant list
  (all ``--tenants`` of them, asked of the agent on every request) and the enrollment
  page, signed in, request sent to last byte read;
- ``tap_to_page_ms`` (median; ``tap_to_page_max_ms``): ``--taps`` captures; each opens
  the page's event stream, writes an EM4100 frame into the reader's pty, and times from
  the write to the ``capture`` event read from the stream (the serial driver, the
  agent's capture, the page's polling and the event included);
- ``web_rss_mb``: the page's resident memory at the end (``web_peak_rss_mb``: its high
  water mark, which includes one argon2 hash's 19 MiB while it ran).

Prints one JSON object as its last line. ``--quick`` is the CI-sized smoke run.
Targets (docs/landlord.md): page p95 <= 100 ms, tap to page <= 500 ms, login <= 300 ms,
web <= 45 MB.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.web_site

from agent.store import Store
from agent.tenants import Enrollment, TenantState
from tests.conftest import PtyPeer
from tests.web_site import HASHER, UNITS, Building

PASSWORD = "correct horse battery"  # noqa: S105 - the benchmark's own account


class Client:
    """One keep-alive HTTPS connection with a cookie jar of its own."""

    def __init__(self, port: int) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                                timeout=30)
        self.cookies: dict[str, str] = {}
        self.origin = f"https://127.0.0.1:{port}"

    def request(self, method: str, path: str, form: dict[str, str] | None = None
                ) -> tuple[int, str, http.client.HTTPResponse]:
        """Send a request, read the whole answer; status, body, response."""
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if form is not None:
            body = urlencode(form)
            headers |= {"Content-Type": "application/x-www-form-urlencoded",
                        "Origin": self.origin, "Sec-Fetch-Site": "same-origin"}
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        text = response.read().decode()
        for value in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return response.status, text, response

    def token(self, path: str) -> str:
        """The form token on ``path``."""
        _status, text, _r = self.request("GET", path)
        match = re.search(r'name="csrf" value="([^"]+)"', text)
        assert match, f"no form token on {path}"
        return match.group(1)


def seed(db: Path, count: int) -> None:
    """Store ``count`` pending enrollments (as the page would have made them)."""
    store = Store(db)
    now = time.time()
    try:
        for i in range(count):
            store.tenants.add(Enrollment(
                id=str(uuid.uuid4()), cred=HASHER.credential(f"em4100:{i:010X}"),
                unit=UNITS[i % len(UNITS)], lease_end=int(now) + 300 * 86400,
                provisional_until=int(now) + 72 * 3600, state=TenantState.PENDING,
                list_version=None, reason=None, account="bench",
                created_ms=int(now * 1000) + i, updated_ms=int(now * 1000) + i))
    finally:
        store.close()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def tap_to_page(building: Building, client: Client, value: str) -> float:
    """Milliseconds from the frame written to the pty to the capture event read."""
    status, _text, response = client.request("POST", "/enroll/capture", {
        "reader": "front-in", "csrf": client.token("/enroll")})
    assert status == 303, status
    events = Client(building.port)
    events.cookies = dict(client.cookies)
    path = response.headers["Location"] + "/events"
    events.conn.request("GET", path, headers={
        "Cookie": "; ".join(f"{k}={v}" for k, v in events.cookies.items())})
    stream = events.conn.getresponse()
    assert stream.status == 200, stream.status
    assert stream.readline().startswith(b"retry:")  # the stream is open and polling
    start = time.perf_counter()
    building.tap(value)
    while True:
        line = stream.readline()
        if not line:
            raise RuntimeError("the event stream ended without a capture event")
        if line.startswith(b"event: capture"):
            elapsed = (time.perf_counter() - start) * 1000
            break
    events.conn.close()
    return elapsed


def rss_mb(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM of ``pid`` in MB."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; its figures."""
    with tempfile.TemporaryDirectory(prefix="pg-bench-web-") as tmp:
        pty = PtyPeer()
        building = Building(Path(tmp), pty, capture_timeout_s=30)
        try:
            seed(building.db, args.tenants)
            building.start()
            building.add_user("bench", PASSWORD)
            logins: list[float] = []
            client = Client(building.port)
            for _ in range(args.logins):
                client.cookies.clear()
                token = client.token("/login")
                start = time.perf_counter()
                status, _t, _r = client.request("POST", "/login", {
                    "name": "bench", "password": PASSWORD, "csrf": token})
                logins.append((time.perf_counter() - start) * 1000)
                assert status == 303, status
            pages: list[float] = []
            for _ in range(args.requests):
                for path in ("/tenants", "/enroll"):
                    start = time.perf_counter()
                    status, _text, _r = client.request("GET", path)
                    pages.append((time.perf_counter() - start) * 1000)
                    assert status == 200, (path, status)
            _s, tenants_page, _r = client.request("GET", "/tenants")
            shown = tenants_page.count('class="tenant state-')
            taps = [tap_to_page(building, client, f"F{i:09X}") for i in range(args.taps)]
            assert building.web is not None
            rss, peak = rss_mb(building.web.pid)
            client.conn.close()
        finally:
            building.close()
            pty.close()
    return {"tenants": args.tenants, "tenants_shown": shown, "requests": len(pages),
            "page_p50_ms": round(statistics.median(pages), 1),
            "page_p95_ms": round(percentile(pages, 0.95), 1),
            "login_ms": round(statistics.median(logins), 1),
            "tap_to_page_ms": round(statistics.median(taps), 1),
            "tap_to_page_max_ms": round(max(taps), 1),
            "web_rss_mb": round(rss, 1), "web_peak_rss_mb": round(peak, 1)}


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", type=int, default=300)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--logins", type=int, default=10)
    parser.add_argument("--taps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smoke-sized run")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.logins, args.taps = 20, 3, 2
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
