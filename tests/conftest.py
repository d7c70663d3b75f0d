"""Shared fixtures: a real pseudo-terminal standing in for a serial card reader, and real
Mosquitto brokers (tests/broker.py); the one ``wait_for``; the hypothesis profiles."""

from __future__ import annotations

import os
import select
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import settings

from tests.broker import Broker, BrokerPool
from tests.waiting import wait_for as wait_for  # noqa: PLC0414 - tests import it from here

# Hypothesis profiles. "dev", the default on a workstation, runs few examples per
# property so the whole suite stays quick to run while working; "ci" runs the full count
# and is chosen whenever the environment variable CI is set to anything but "", "0" or
# "false" (CI runs with CI=true). Either can be forced with --hypothesis-profile=dev|ci.
# Property tests set no max_examples of their own (a test that wants more asks for a
# multiple of the profile's), so the profile decides; none has a per-example deadline,
# which would turn a slow machine into a failure.
settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(
    "ci" if os.environ.get("CI", "").strip().lower() not in {"", "0", "false"} else "dev")

# Files the tests create (site keys above all) are private, as on an installed gateway
# whose service runs with UMask=0077: the agent refuses a site key that its group or other
# users can read. Tests of that refusal set the mode explicitly.
os.umask(0o077)


class PtyPeer:
    """The device end of a pseudo-terminal; the driver opens ``path`` with pyserial.

    The test keeps its own slave descriptor open so the pty outlives the driver's close
    and reopen. Bytes written before the driver opens the port are lost: pyserial flushes
    the input buffer on open.
    """

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        # Raw at once, so nothing written before pyserial configures the port is echoed
        # back or has CR turned into LF by the line discipline.
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self._master_open = True

    def write(self, data: bytes) -> None:
        """Send ``data`` as if the reader had transmitted it."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def host_write(self, data: bytes) -> None:
        """Write ``data`` on the driver's end of the pty, as the driver itself would: it
        reaches the device end after everything the driver wrote before it (one tty, one
        output queue), so a test can send a marker to show that nothing came before."""
        os.write(self._slave, data)

    def unread(self, timeout: float = 10.0) -> bytes:
        """Every byte the driver wrote that the test has not read yet, known without
        waiting on a clock: a marker written after it (``host_write``) arrives after it,
        so what comes before the marker is all there is."""
        marker = b"\x00permitgate-test-marker\x00"
        self.host_write(marker)
        got = bytearray()

        def marked() -> bool:
            while select.select([self.master], [], [], 0)[0]:
                got.extend(os.read(self.master, 4096))
            return got.endswith(marker)

        wait_for(marked, f"the marker at the device end of {self.path}", timeout)
        return bytes(got[:-len(marker)])

    def hang_up(self) -> None:
        """Close the device end, as when a USB reader is unplugged."""
        if self._master_open:
            self._master_open = False
            os.close(self.master)

    def close(self) -> None:
        """Release both ends."""
        self.hang_up()
        os.close(self._slave)


@pytest.fixture
def pty_peer() -> Iterator[PtyPeer]:
    """A fresh pseudo-terminal whose device end the test drives."""
    peer = PtyPeer()
    try:
        yield peer
    finally:
        peer.close()


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[BrokerPool]:
    """Starts Mosquitto brokers on demand (``brokers.start(tls=..., acl_file=...)``) and
    stops every one of them at teardown, whatever the test did."""
    pool = BrokerPool(tmp_path / "brokers")
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def broker(brokers: BrokerPool) -> Broker:
    """A running Mosquitto with one plain, anonymous listener on 127.0.0.1."""
    return brokers.start()


@pytest.fixture(autouse=True)
def _structlog_restored() -> Iterator[None]:
    """Every test starts with the logging configuration the one before it found: a command
    run in-process (``main([...])``) configures structlog for a terminal, level filter
    included, and ``capture_logs`` in a later test would miss what that filter drops."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
