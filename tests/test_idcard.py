"""The ID-card module reader (SAM protocol, ``AA AA AA 96 69`` framing) over a real pty.

No emulator of these modules exists, so the peer here is a scripted module written from
the published protocol; nothing independent validates it. What pins it to reality is
that it answers with the published byte vectors themselves, checked byte for byte below:

- find card ``AA AA AA 96 69 00 03 20 01 22`` -> ``AA AA AA 96 69 00 08 00 00 9F 00 00 00
  00 97`` and select card ``AA AA AA 96 69 00 03 20 02 21`` -> ``AA AA AA 96 69 00 0C 00 00
  90 00 00 00 00 00 00 00 00 9C``: a Huashi CVR-100D exchange quoted in a 2022 blog post
  (yzsam.com, "C# 使用串口分析SAM协议"), the frames in docs/hardware.md;
- ``AA AA AA 96 69 00 04 00 00 41 45`` (SW3 41, read failure), quoted on softs.im;
- SW3 ``80`` (no card) and ``81`` (select failed) from the published status table, framed
  and checksummed here.

The one published select reply carries eight zero bytes, so the positive case uses a
serial built here, 01 23 45 67 89 AB CD EF, whose bytes XOR to zero: its frame ends in
the same checksum byte ``9C`` as the published one.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable, Iterator
from functools import reduce
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

from drivers.base import DeviceError
from drivers.idcard import (
    FIND_CARD,
    SELECT_CARD,
    IdCardOptions,
    IdCardReader,
    Rejected,
    Reply,
    ReplyDecoder,
)
from drivers.registry import DriverError, check_options, create
from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.conftest import PtyPeer


def hexbytes(text: str) -> bytes:
    """Bytes from hex written with spaces, as the protocol documents print frames."""
    return bytes.fromhex(text)


# Published frames, copied from the sources named in the module docstring.
FIND_CMD = hexbytes("AA AA AA 96 69 00 03 20 01 22")
FOUND = hexbytes("AA AA AA 96 69 00 08 00 00 9F 00 00 00 00 97")
SELECT_CMD = hexbytes("AA AA AA 96 69 00 03 20 02 21")
SELECTED_ZEROS = hexbytes("AA AA AA 96 69 00 0C 00 00 90 00 00 00 00 00 00 00 00 9C")
READ_FAILED = hexbytes("AA AA AA 96 69 00 04 00 00 41 45")
READ_CMD = hexbytes("AA AA AA 96 69 00 03 30 01 32")
"""Text + photo: the driver must never send it (nor 30 10, 30 03)."""

SERIAL = hexbytes("01 23 45 67 89 AB CD EF")
SERIAL_ID = "idcard:0123456789ABCDEF"
READ_TIMEOUT = 5.0
"""Generous: the peer answers in milliseconds; this only bounds a failure."""
FAST = {"poll_interval": 0.02, "reply_timeout": 0.5}
"""Poll quickly in tests; the reply timeout stays long enough for a loaded machine."""


def xor(data: bytes) -> int:
    """XOR of all bytes, written here independently of the driver."""
    return reduce(lambda a, b: a ^ b, data, 0)


def sam_reply(sw3: int, data: bytes = b"", *, length: int | None = None,
              chk: int | None = None) -> bytes:
    """A module reply built here from the protocol text; ``length`` and ``chk`` override
    the correct values to make corrupt frames."""
    body = bytes([0, 0, sw3]) + data
    n = len(body) + 1 if length is None else length
    head = n.to_bytes(2, "big")
    return (hexbytes("AA AA AA 96 69") + head + body
            + bytes([xor(head + body) if chk is None else chk]))


NO_CARD = sam_reply(0x80)
SELECT_FAILED = sam_reply(0x81)
SELECTED = sam_reply(0x90, SERIAL)


# --- the published frames themselves ----------------------------------------------------


def test_published_frames_have_consistent_lengths_and_checksums() -> None:
    """Every published frame's Len counts the bytes after it and its last byte is the XOR
    of the bytes between preamble and checksum."""
    for frame in (FIND_CMD, FOUND, SELECT_CMD, SELECTED_ZEROS, READ_FAILED, READ_CMD):
        assert frame[:5] == hexbytes("AA AA AA 96 69")
        assert int.from_bytes(frame[5:7], "big") == len(frame) - 7
        assert xor(frame[5:-1]) == frame[-1]


def test_driver_commands_are_the_published_frames() -> None:
    """The driver's find and select commands are byte for byte the published ones."""
    assert FIND_CARD == FIND_CMD
    assert SELECT_CARD == SELECT_CMD


def test_built_replies_match_the_published_ones() -> None:
    """This module's reply builder reproduces the published replies exactly, and the
    positive-case serial keeps the published select checksum 9C."""
    assert sam_reply(0x9F, bytes(4)) == FOUND
    assert sam_reply(0x90, bytes(8)) == SELECTED_ZEROS
    assert sam_reply(0x41) == READ_FAILED
    assert sam_reply(0x90, SERIAL) == hexbytes(
        "AA AA AA 96 69 00 0C 00 00 90 01 23 45 67 89 AB CD EF 9C")
    assert sam_reply(0x80) == hexbytes("AA AA AA 96 69 00 04 00 00 80 84")


# --- the scripted module ------------------------------------------------------------------


class SamPeer:
    """A scripted SAM module on the device end of a pty.

    It records every byte the driver writes, and answers each complete 10-byte command:
    with the next scripted reply if any, else with the published find/select replies
    while a card is present (``card`` holds the select reply to send), else with
    "no card" / "select failed".
    """

    def __init__(self, pty: PtyPeer) -> None:
        self.pty = pty
        self.received = bytearray()
        self.commands: list[bytes] = []
        self.sent: list[bytes] = []
        self.card: bytes | None = None
        self.script: deque[bytes] = deque()
        self.silent = False
        self.lock = threading.Lock()
        self._pending = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sam-peer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.pty.master], [], [], 0.02)
                if not ready:
                    continue
                data = os.read(self.pty.master, 4096)
            except OSError:
                return  # the device end was hung up
            with self.lock:
                self.received += data
                self._pending += data
                while len(self._pending) >= 10:
                    start = self._pending.find(hexbytes("AA AA AA 96 69"))
                    if start < 0:
                        self._pending.clear()
                        break
                    del self._pending[:start]
                    if len(self._pending) < 10:
                        break
                    cmd = bytes(self._pending[:10])
                    del self._pending[:10]
                    self.commands.append(cmd)
                    reply = self._answer(cmd)
                    if reply:
                        self.sent.append(reply)
                        self.pty.write(reply)

    def _answer(self, cmd: bytes) -> bytes:
        if self.silent:
            return b""
        if self.script:
            return self.script.popleft()
        if cmd == FIND_CMD:
            return FOUND if self.card is not None else NO_CARD
        if cmd == SELECT_CMD:
            return self.card if self.card is not None else SELECT_FAILED
        return sam_reply(0x21)  # "command error", per the status table

    def wait_commands(self, count: int, timeout: float = READ_TIMEOUT) -> None:
        """Block until at least ``count`` commands have arrived."""
        def arrived() -> bool:
            with self.lock:
                return len(self.commands) >= count

        wait_for(arrived, lambda: f"{count} commands; {len(self.commands)} arrived", timeout,
                 interval=0.01)

    def stop(self) -> None:
        """Stop answering."""
        self._stop.set()
        self._thread.join(2.0)


@pytest.fixture
def peer(pty_peer: PtyPeer) -> Iterator[SamPeer]:
    """A scripted module on the test's pty."""
    module = SamPeer(pty_peer)
    try:
        yield module
    finally:
        module.stop()


OpenReader = Callable[..., IdCardReader]


@pytest.fixture
def open_reader(pty_peer: PtyPeer) -> Iterator[OpenReader]:
    """Open IdCardReaders on the test's pty with fast polling; all closed afterwards."""
    readers: list[IdCardReader] = []

    def _open(**options: Any) -> IdCardReader:
        reader = IdCardReader("desk", {"port": pty_peer.path, **FAST, **options})
        reader.open()
        readers.append(reader)
        return reader

    yield _open
    for reader in readers:
        reader.close()


def frames_written(peer: SamPeer) -> list[bytes]:
    """Everything the driver wrote, cut into 10-byte command frames (all its commands
    are 10 bytes); a trailing partial frame would fail the comparison."""
    with peer.lock:
        raw = bytes(peer.received)
    assert len(raw) % 10 == 0, raw.hex()
    return [raw[i:i + 10] for i in range(0, len(raw), 10)]


# --- reading over the pty ---------------------------------------------------------------


def test_card_serial_is_read_with_find_then_select(
        open_reader: OpenReader, peer: SamPeer) -> None:
    """A present card is found, selected and reported as idcard:<serial>; the driver
    wrote exactly the published find and select frames, in that order."""
    peer.card = SELECTED
    reader = open_reader()
    got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == SERIAL_ID
    assert frames_written(peer)[:2] == [FIND_CMD, SELECT_CMD]
    assert peer.sent[:2] == [FOUND, SELECTED]
    assert reader.rejected == 0


def test_only_find_and_select_are_ever_sent(open_reader: OpenReader, peer: SamPeer) -> None:
    """Across reads, empty polls and errors the driver writes nothing but the two
    published commands: no read of text, photo or fingerprints."""
    reader = open_reader()
    peer.card = SELECTED
    assert reader.read(READ_TIMEOUT) is not None
    peer.card = None
    assert reader.read(0.1) is None
    peer.script.extend([READ_FAILED, FOUND, sam_reply(0x90, SERIAL, chk=0)])
    peer.card = SELECTED
    assert reader.read(READ_TIMEOUT) is not None
    written = frames_written(peer)
    assert set(written) == {FIND_CMD, SELECT_CMD}
    assert all(frame[7] != 0x30 for frame in written)


def test_no_card_polls_quietly(open_reader: OpenReader, peer: SamPeer) -> None:
    """With no card the driver keeps asking "find card" and gets the "no card" status:
    no read, no refusal, no log entry, no select."""
    reader = open_reader()
    with capture_logs() as logs:
        assert reader.read(0.3) is None
    peer.wait_commands(3)
    assert set(frames_written(peer)) == {FIND_CMD}
    assert reader.rejected == 0
    assert logs == []


def test_card_removed_between_find_and_select_is_not_a_refusal(
        open_reader: OpenReader, peer: SamPeer) -> None:
    """A "select failed" status after "found" (the card left the field) is neither a read
    nor a refusal; the next poll reads the card when it is back."""
    peer.script.extend([FOUND, SELECT_FAILED])
    peer.card = SELECTED
    reader = open_reader()
    got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == SERIAL_ID
    assert frames_written(peer)[:4] == [FIND_CMD, SELECT_CMD, FIND_CMD, SELECT_CMD]
    assert reader.rejected == 0


def test_published_all_zero_select_reply_is_refused(
        open_reader: OpenReader, peer: SamPeer) -> None:
    """The published select reply (eight zero bytes) is refused as ``no_serial``: an
    all-zero serial would make every card the same credential."""
    peer.card = SELECTED_ZEROS
    reader = open_reader()
    with capture_logs() as logs:
        assert reader.read(0.3) is None
    assert peer.sent[:2] == [FOUND, SELECTED_ZEROS]
    assert reader.rejected >= 1
    assert {(e["event"], e["reason"], e["length"]) for e in logs} == {
        ("reader_frame_rejected", "no_serial", 19)}


def test_all_ff_serial_is_refused(open_reader: OpenReader, peer: SamPeer) -> None:
    """An all-FF serial (an unprogrammed or failed read) is refused like all zeros."""
    peer.script.extend([FOUND, sam_reply(0x90, b"\xff" * 8)])
    peer.card = SELECTED
    reader = open_reader()
    with capture_logs() as logs:
        got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == SERIAL_ID
    assert [e["reason"] for e in logs] == ["no_serial"]


def test_bad_checksum_refused_then_next_poll_reads(
        open_reader: OpenReader, peer: SamPeer) -> None:
    """A select reply with a wrong checksum is refused without logging its bytes; the next
    poll reads the card."""
    peer.script.extend([FOUND, sam_reply(0x90, SERIAL, chk=0x9D)])
    peer.card = SELECTED
    reader = open_reader()
    with capture_logs() as logs:
        got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == SERIAL_ID
    assert reader.rejected == 1
    assert logs == [{"event": "reader_frame_rejected", "log_level": "warning",
                     "reader": "desk", "reason": "checksum", "length": 19}]
    assert "0123" not in repr(logs)


@pytest.mark.parametrize(("bad", "reason"), [
    (sam_reply(0x90, SERIAL[:6]), "wrong_length"),
    (sam_reply(0x90, SERIAL + b"\x00"), "wrong_length"),
    (sam_reply(0x90, SERIAL, length=2), "bad_length"),
    (sam_reply(0x90, SERIAL, length=0x0508), "bad_length"),
])
def test_wrong_length_reply_refused(open_reader: OpenReader, peer: SamPeer,
                                    bad: bytes, reason: str) -> None:
    """A select reply whose data is not 8 bytes, or whose Len field is impossible (under
    4, or the 1,295-byte read reply's), is refused; the next poll reads the card."""
    peer.script.extend([FOUND, bad])
    peer.card = SELECTED
    reader = open_reader()
    with capture_logs() as logs:
        got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == SERIAL_ID
    assert logs[0]["reason"] == reason
    assert reader.rejected >= 1


def test_len_field_longer_than_the_frame(open_reader: OpenReader, peer: SamPeer) -> None:
    """A reply whose Len claims one byte more than is sent is waited for until the reply
    timeout, then refused as incomplete; the next poll reads the card."""
    peer.script.extend([FOUND, sam_reply(0x90, SERIAL, length=13)])
    peer.card = SELECTED
    reader = open_reader(reply_timeout=0.1)
    with capture_logs() as logs:
        got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == SERIAL_ID
    assert [(e["reason"], e["length"]) for e in logs] == [("incomplete", 19)]


def test_garbage_around_replies_is_skipped(open_reader: OpenReader, peer: SamPeer) -> None:
    """Line noise, a lone partial preamble and stray bytes around the replies are skipped."""
    peer.script.extend([b"\x00\xff\xaa\xaa" + FOUND + b"\x96\x69\x13",
                        b"\xaa\xaa\xaa\x96" + SELECTED + b"\xaa"])
    reader = open_reader()
    got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == SERIAL_ID
    assert reader.rejected == 0


def test_error_status_is_refused_by_its_code(open_reader: OpenReader, peer: SamPeer) -> None:
    """The published error reply (SW3 41) to "find card" is refused with its status code;
    polling goes on and reads the card."""
    peer.script.append(READ_FAILED)
    peer.card = SELECTED
    reader = open_reader()
    with capture_logs() as logs:
        got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert [e["reason"] for e in logs] == ["status_41"]
    assert reader.rejected == 1


def test_unrequested_reply_is_refused(open_reader: OpenReader, peer: SamPeer) -> None:
    """A second reply to one select (nothing is awaited any more) is refused as
    unexpected, after the first one was read."""
    peer.script.extend([FOUND, SELECTED + SELECTED])
    reader = open_reader()
    with capture_logs() as logs:
        got = reader.read(READ_TIMEOUT)
        assert got is not None
        reader.read(0.05)
    assert "unexpected" in [e["reason"] for e in logs]


def test_reply_split_across_reads(open_reader: OpenReader, peer: SamPeer) -> None:
    """Replies arriving a few bytes at a time are put together."""
    peer.silent = True
    reader = open_reader()
    assert reader.read(0.05) is None
    for i in range(0, len(FOUND), 4):
        peer.pty.write(FOUND[i:i + 4])
        reader.read(0)
    peer.wait_commands(2)
    assert frames_written(peer)[:2] == [FIND_CMD, SELECT_CMD]
    for i in range(0, len(SELECTED), 3):
        peer.pty.write(SELECTED[i:i + 3])
    got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == SERIAL_ID


def test_silent_module_raises_device_error(open_reader: OpenReader, peer: SamPeer) -> None:
    """A module that answers nothing (powered off, wrong baud rate) raises DeviceError
    after max_unanswered requests, so the agent marks the reader offline."""
    peer.silent = True
    reader = open_reader(reply_timeout=0.1, max_unanswered=2)
    with pytest.raises(DeviceError, match=r"no answer from the module on .* to 2 requests"):
        reader.read(READ_TIMEOUT)
    with pytest.raises(DeviceError, match="not open"):
        reader.read(0)


def test_idle_read_returns_none_also_for_zero_timeout(
        open_reader: OpenReader, peer: SamPeer) -> None:
    """With no card, read(timeout) returns None, also for a zero timeout."""
    reader = open_reader()
    assert reader.read(0.05) is None
    assert reader.read(0) is None


def test_reopen_after_close_reads_again(open_reader: OpenReader, peer: SamPeer) -> None:
    """A closed reader opens again and reads a card presented after the reopen."""
    reader = open_reader()
    assert reader.read(0.05) is None
    reader.close()
    reader.close()
    reader.open()
    peer.card = SELECTED
    got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == SERIAL_ID


def test_peer_hang_up_raises_device_error(open_reader: OpenReader, peer: SamPeer) -> None:
    """When the device end goes away (USB module unplugged), read() raises DeviceError
    naming the port."""
    reader = open_reader()
    peer.stop()
    peer.pty.hang_up()
    with pytest.raises(DeviceError, match=peer.pty.path):
        reader.read(1.0)


def test_open_missing_port_raises_device_error_naming_it() -> None:
    """Opening a port that does not exist is a DeviceError naming it; close() is safe."""
    reader = IdCardReader("desk", {"port": "/dev/ttyUSB9"})
    with pytest.raises(DeviceError, match="/dev/ttyUSB9"):
        reader.open()
    reader.close()


def test_read_before_open_raises_device_error() -> None:
    """Reading a reader that was never opened is a DeviceError naming the port."""
    with pytest.raises(DeviceError, match="/dev/ttyUSB9 is not open"):
        IdCardReader("desk", {"port": "/dev/ttyUSB9"}).read(0)


# --- options -------------------------------------------------------------------------------


def test_options_defaults() -> None:
    """The defaults follow the modules' documented UART settings (115200 8N1)."""
    opts = IdCardOptions.model_validate({"port": "/dev/ttyUSB0"})
    assert (opts.baudrate, opts.poll_interval, opts.reply_timeout, opts.max_unanswered) == (
        115200, 0.25, 1.0, 3)


@pytest.mark.parametrize(("options", "key"), [
    ({}, "port"),
    ({"port": "/dev/ttyUSB0", "baudrate": "115200"}, "baudrate"),
    ({"port": "/dev/ttyUSB0", "poll_interval": 0.001}, "poll_interval"),
    ({"port": "/dev/ttyUSB0", "reply_timeout": 60.0}, "reply_timeout"),
    ({"port": "/dev/ttyUSB0", "read_text": True}, "read_text"),
])
def test_registry_check_names_the_bad_option(options: dict[str, Any], key: str) -> None:
    """Config checking through the registry names a missing, wrong-typed, out-of-range or
    unknown option of an idcard reader."""
    with pytest.raises(DriverError, match=rf"readers\[1\]\.options\.{key}"):
        check_options("reader", "idcard", options, "readers[1]")


def test_registry_creates_an_idcard_reader() -> None:
    """The registry knows the driver as "idcard"; creating it opens nothing."""
    assert isinstance(create("reader", "idcard", "desk", {"port": "/dev/ttyUSB0"}),
                      IdCardReader)


def test_options_are_strict() -> None:
    """Options are validated as given: a float where an int belongs is an error."""
    with pytest.raises(ValidationError):
        IdCardOptions.model_validate({"port": "/dev/ttyUSB0", "max_unanswered": 2.5})


# --- the pure reply decoder ------------------------------------------------------------------


def test_decoder_takes_a_reply_byte_by_byte() -> None:
    """A reply fed one byte at a time comes out once, after its last byte."""
    decoder = ReplyDecoder()
    out = [item for b in FOUND for item in decoder.feed(bytes([b]))]
    assert out == [Reply(hexbytes("00 00 9F"), bytes(4))]


def test_decoder_reports_a_partial_frame() -> None:
    """A frame begun but not complete is held and its length reported for the timeout."""
    decoder = ReplyDecoder()
    assert decoder.feed(b"\x00\x01" + SELECTED[:12]) == []
    assert decoder.partial() == 12
    decoder.clear()
    assert decoder.partial() == 0


def test_decoder_resyncs_after_a_truncated_reply() -> None:
    """A reply cut short and followed by a whole one costs only the cut one."""
    out = ReplyDecoder().feed(SELECTED[:12] + FOUND)
    assert out == [Rejected("checksum", 19), Reply(hexbytes("00 00 9F"), bytes(4))]


_noise = st.binary(max_size=30).map(lambda b: b.replace(b"\xaa", b""))
_reply = st.tuples(st.sampled_from([0x90, 0x9F, 0x80, 0x81, 0x41]),
                   st.binary(max_size=20))


def _feed_in_chunks(stream: bytes, cuts: list[int]) -> list[Reply | Rejected]:
    decoder = ReplyDecoder()
    out: list[Reply | Rejected] = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        out.extend(decoder.feed(stream[start:cut]))
        start = cut
    return out


@settings(deadline=None)
@given(lead=_noise, replies=st.lists(st.tuples(_reply, _noise), max_size=6),
       cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_replies_among_noise_come_out_exactly(
        lead: bytes, replies: list[tuple[tuple[int, bytes], bytes]], cuts: list[int]) -> None:
    """Valid replies with 0xAA-free noise around them decode to exactly themselves, in
    order, however the stream is chunked."""
    stream = lead + b"".join(sam_reply(sw3, data) + noise for (sw3, data), noise in replies)
    assert _feed_in_chunks(stream, cuts) == [
        Reply(bytes([0, 0, sw3]), data) for (sw3, data), _ in replies]


@settings(deadline=None)
@given(stream=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_decoder_total_and_chunking_invariant(stream: bytes, cuts: list[int]) -> None:
    """Any bytes, in any chunks, decode without raising, exactly as in one chunk."""
    assert _feed_in_chunks(stream, cuts) == ReplyDecoder().feed(stream)
