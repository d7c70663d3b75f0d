"""The sync worker's inbox (agent/inbox.py): urgent before bulk, bulk bounded in memory."""

from __future__ import annotations

import threading
from pathlib import Path

from agent.inbox import Inbox
from common.memory import _malloc_trim, trim_heap


def test_urgent_items_come_before_bulk_ones_in_arrival_order(tmp_path: Path) -> None:
    """An urgent item put after bulk messages is taken first; each lane keeps its order."""
    inbox = Inbox(tmp_path / "spool")
    inbox.put_bulk("list", b"chunk-0")
    inbox.put_bulk("list", b"chunk-1")
    inbox.put(("message", "rev", b"revocation"))
    inbox.put(("connected", 1))
    taken = [inbox.get(0.01) for _ in range(5)]
    assert taken == [("message", "rev", b"revocation"), ("connected", 1),
                     ("message", "list", b"chunk-0"), ("message", "list", b"chunk-1"), None]


def test_bulk_beyond_the_memory_bound_is_spooled_and_read_back_in_order(
        tmp_path: Path) -> None:
    """Bulk payloads over the bound go to files (not memory) and come back byte for byte,
    in order, each file deleted once taken."""
    spool = tmp_path / "spool"
    inbox = Inbox(spool, memory_bytes=1000)
    payloads = [bytes([i]) * 400 for i in range(10)]
    for payload in payloads:
        inbox.put_bulk("list", payload)
    assert inbox.held_bytes() <= 1000
    assert inbox.spooled == 8
    assert len(list(spool.glob("*.msg"))) == 8
    assert [inbox.get(0.01) for _ in payloads] == [("message", "list", p) for p in payloads]
    assert list(spool.glob("*.msg")) == []
    assert inbox.held_bytes() == 0


def test_spool_files_of_an_earlier_run_are_deleted(tmp_path: Path) -> None:
    """Messages spooled before a crash are gone at the next start (their snapshot is asked
    for again), so they are never taken as new."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "000000000000.msg").write_bytes(b"stale chunk")
    inbox = Inbox(spool)
    assert list(spool.glob("*.msg")) == []
    assert inbox.get(0.01) is None


def test_a_spool_that_cannot_be_written_keeps_the_payload_in_memory(tmp_path: Path) -> None:
    """When the spool cannot take a file (here: its path is a file), the message is kept in
    memory rather than lost."""
    blocker = tmp_path / "spool"
    blocker.write_bytes(b"not a folder")
    inbox = Inbox(blocker, memory_bytes=10)
    inbox.put_bulk("list", b"x" * 100)
    assert inbox.spooled == 0
    assert inbox.get(0.01) == ("message", "list", b"x" * 100)


def test_take_urgent_returns_messages_but_leaves_connection_changes(tmp_path: Path) -> None:
    """Between the steps of a bulk item only urgent messages are taken: a connection change
    (which may end a snapshot) waits for the worker's loop."""
    inbox = Inbox(tmp_path / "spool")
    inbox.put(("message", "ack", b"ack"))
    inbox.put(("disconnected", 1, "gone"))
    inbox.put_bulk("list", b"chunk")
    assert inbox.take_urgent() == ("message", "ack", b"ack")
    assert inbox.take_urgent() is None
    assert inbox.pending() == (1, 1)


def test_get_wakes_when_an_item_arrives(tmp_path: Path) -> None:
    """A worker waiting in ``get`` is woken by a put from another thread, not by its
    timeout."""
    inbox = Inbox(tmp_path / "spool")
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(inbox.get(30.0)))
    waiter.start()
    inbox.put(("message", "cmd", b"lockdown"))
    waiter.join(30.0)
    assert not waiter.is_alive()
    assert got == [("message", "cmd", b"lockdown")]


def test_the_heap_can_be_trimmed_on_this_c_library() -> None:
    """``trim_heap`` reaches glibc's ``malloc_trim`` (the gateway's Debian has glibc), so
    the sync worker's trim after list work is not a silent no-op."""
    assert trim_heap() in (True, False)
    assert _malloc_trim() is not None


def test_bulk_messages_taken_are_counted(tmp_path: Path) -> None:
    """Each bulk message taken counts once (the worker trims the heap after new ones);
    urgent items do not count."""
    inbox = Inbox(tmp_path / "spool")
    inbox.put_bulk("list", b"chunk")
    inbox.put(("message", "ack", b"ack"))
    while inbox.get(0.01) is not None:
        pass
    assert inbox.bulk_taken == 1
