"""Shared fixtures: a real pseudo-terminal standing in for a serial card reader, and real
Mosquitto brokers (tests/broker.py)."""

from __future__ import annotations

import os
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker import Broker, BrokerPool

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


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds
    (a bound on failure only: a passing test never waits that long)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
