"""The one way tests wait: poll a real condition until it holds, with a bound on failure.

Test modules import it as ``tests.conftest.wait_for``. It lives in this module of its own
so that the helper modules (tests/broker.py, which conftest itself imports, vcard.py,
harness.py) use the same one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], what: str | Callable[[], str],
             timeout: float = 30.0, *, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns a true value, and return that value; fail with
    an AssertionError naming ``what`` after ``timeout`` seconds.

    ``timeout`` bounds a failure only: a passing test never waits that long, and nothing
    is asserted about how long the condition took. ``what`` may be a callable, evaluated
    only on failure (to show a log tail or the events seen so far). An exception raised by
    ``condition`` (a process that exited, a read that must return nothing) ends the wait
    at once. ``interval`` is the pause between polls; 0 suits a condition that blocks by
    itself (a ``read(timeout)``).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {described}")
        time.sleep(interval)
