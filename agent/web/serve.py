"""The page's server process: ``python -m agent.web.serve`` with ``PERMITGATE_WEB_SETTINGS``.

Started by ``permitgate-web run`` (which validates the configuration first and then
replaces itself with this program), never by hand. uvicorn with its pure-Python h11
parser serves the application; with ``tls_cert`` set it serves HTTPS with the device
certificate, and without it plain HTTP on the loopback address only (Settings.check).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import uvicorn

from agent.web.app import WebApp, log
from agent.web.routes import create_app
from agent.web.settings import ENV_VAR, Settings, SettingsError

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024
"""glibc serves a large allocation with mmap and returns it on free, but after the first
such free it raises its threshold to that size and serves the next from the heap, which it
then keeps: each 19 MiB argon2 hash would stay in the process for good (measured: RSS 33
MB after four sign-ins instead of 14). A fixed threshold (glibc's own starting value)
keeps them, and the agent's replies of up to 256 KiB, mmapped."""
ARENAS = 2
"""Per-thread malloc arenas each keep their freed memory; the page's threads (argon2,
static files) need no more than two."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def tune_malloc() -> None:
    """Fix glibc's mmap threshold and cap its arenas (no-op where there is no glibc)."""
    libc = _libc()
    if libc is None:
        return
    try:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_ARENA_MAX, ARENAS)
    except AttributeError:
        return


def trim_malloc() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``): the page's
    housekeeping calls it every few seconds, so one big page rendered does not stay in
    the process's memory."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def server(settings: Settings) -> uvicorn.Server:
    """A uvicorn server for ``settings`` (not started)."""
    settings.check()
    app = create_app(WebApp(settings, housekeeping=trim_malloc))
    config = uvicorn.Config(
        app, host=settings.listen, port=settings.port, http="h11", loop="asyncio",
        ws="none", lifespan="on", access_log=False, log_config=None, server_header=False,
        proxy_headers=False, ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key,
        timeout_keep_alive=15, limit_concurrency=64, h11_max_incomplete_event_size=16 * 1024,
        # An open event stream (a capture being watched) would hold a graceful shutdown
        # for up to its capture's timeout; systemd's TimeoutStopSec is 10 s.
        timeout_graceful_shutdown=3)
    return uvicorn.Server(config)


def main() -> int:
    """Serve until SIGTERM or SIGINT."""
    text = os.environ.get(ENV_VAR)
    if not text:
        print(f"permitgate-web: {ENV_VAR} is not set: start the page with "
              "'permitgate-web run -c CONFIG'", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_json(text)
        settings.check()
    except (SettingsError, ValueError, TypeError, KeyError) as exc:
        print(f"permitgate-web: {exc}", file=sys.stderr)
        return 2
    from common.logs import configure  # noqa: PLC0415 - structlog set up once, here

    configure(settings.log_level, settings.log_format)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tune_malloc()
    srv = server(settings)
    log.info("web_starting", listen=settings.listen, port=settings.port, tls=settings.tls)
    # uvicorn re-raises SIGTERM once it has shut down (the exit status systemd expects of
    # a stop signal); the lifespan logs web_stopped before that.
    srv.run()
    return 0 if srv.started else 1


if __name__ == "__main__":
    sys.exit(main())
