"""The card path first (agent/yielding.py): the sync worker steps aside, for a bounded
time, while a card is being decided."""

from __future__ import annotations

import threading
import time

from agent.yielding import CardPath


def test_an_idle_card_path_costs_the_worker_nothing() -> None:
    """With no read in progress the worker does not wait at all."""
    path = CardPath()
    assert not path.busy
    assert path.wait_idle(1.0) == 0.0


def test_the_worker_waits_for_a_read_and_goes_on_when_it_ends() -> None:
    """While a read is being decided the worker sleeps; it goes on as soon as the read
    ends, well before its limit."""
    path = CardPath()
    entered = threading.Event()

    def read() -> None:
        with path:
            entered.set()
            time.sleep(0.05)

    thread = threading.Thread(target=read)
    thread.start()
    entered.wait(1.0)
    assert path.busy
    waited = path.wait_idle(5.0)
    thread.join()
    assert 0.0 < waited < 5.0
    assert not path.busy


def test_a_stream_of_reads_cannot_stall_the_worker_past_its_limit() -> None:
    """A read that never ends holds the worker back for the limit only, and nested reads
    are counted until the last one leaves."""
    path = CardPath()
    with path, path:
        assert path.busy
        started = time.monotonic()
        path.wait_idle(0.02)
        assert time.monotonic() - started >= 0.02
    assert not path.busy
