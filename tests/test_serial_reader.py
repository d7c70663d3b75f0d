"""The serial card reader: EM4100 (RDM6300) frames and ASCII lines.

The driver is driven through a real pseudo-terminal (pyserial opens the slave, the test
writes the reader's bytes to the master). The third-party ``rdm6300`` package (0.1.1, MIT)
is an independent parser of the same frames; its test vectors are used here.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from functools import reduce
from typing import TYPE_CHECKING, Any

import pytest
import rdm6300
import serial
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

from drivers.base import DeviceError
from drivers.registry import DriverError, check_options
from drivers.serial_reader import (
    DEFAULT_PATTERN,
    Accepted,
    Em4100Decoder,
    LineDecoder,
    Rejected,
    SerialReader,
    SerialReaderOptions,
    em4100_frame,
)
from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.conftest import PtyPeer

VALID = ["67003B51C6CB", "67003BA86C98", "67003BA86793"]
"""Test vectors of the rdm6300 package: 10 hex characters + checksum, all valid."""
BAD_CHECKSUM = "68003B51C6CB"
"""rdm6300's vector that fails the checksum."""
READ_TIMEOUT = 5.0
"""Generous: bytes already written arrive in milliseconds; this only bounds a failure."""
PROPERTY = settings(deadline=None)
"""No per-example deadline: hypothesis must not turn a slow CI machine into a failure."""


def frame(body: str) -> bytes:
    """STX + ``body`` (hex characters as given, checksum included) + ETX."""
    return b"\x02" + body.encode("ascii") + b"\x03"


OpenReader = Callable[..., SerialReader]


class ReadProbe:
    """Watches the driver's calls into pyserial's ``Serial.read``: a call made once ``n``
    bytes have been handed back is the driver waiting for more after them, the hook a
    test acts on instead of a delay."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.handed = 0
        self._calls: list[int] = []
        self._lock = threading.Lock()
        real = serial.Serial.read

        def read(port: serial.Serial, size: int = 1) -> bytes:
            with self._lock:
                self._calls.append(self.handed)
            data = real(port, size)
            with self._lock:
                self.handed += len(data)
            return data

        monkeypatch.setattr(serial.Serial, "read", read)

    def then(self, after: int, action: Callable[[], object]) -> threading.Thread:
        """A started thread that runs ``action`` once the driver reads again after
        ``after`` bytes (join it when done)."""
        def waiting() -> bool:
            with self._lock:
                return any(handed >= after for handed in self._calls)

        def run() -> None:
            wait_for(waiting, f"the driver to read again after {after} bytes")
            action()

        thread = threading.Thread(target=run, name="read-probe")
        thread.start()
        return thread


@pytest.fixture
def open_reader(pty_peer: PtyPeer) -> Iterator[OpenReader]:
    """Open SerialReaders on the test's pty with the given options; all closed afterwards."""
    readers: list[SerialReader] = []

    def _open(**options: Any) -> SerialReader:
        reader = SerialReader("front", {"port": pty_peer.path, **options})
        reader.open()
        readers.append(reader)
        return reader

    yield _open
    for reader in readers:
        reader.close()


def read_ids(reader: SerialReader, count: int) -> list[str | None]:
    """The card ids of the next ``count`` reads (None for a read that timed out)."""
    reads = [reader.read(READ_TIMEOUT) for _ in range(count)]
    return [r.card_id if r else None for r in reads]


# --- options ---------------------------------------------------------------------------


def test_default_pattern_matches_a_hex_line() -> None:
    """The default ascii pattern validates and accepts a bare hex UID with blanks around it."""
    opts = SerialReaderOptions(port="/dev/ttyUSB0", format="ascii", pattern=DEFAULT_PATTERN)
    decoded = LineDecoder(re.compile(opts.pattern), True, 128).feed(b" 04a1b2 \n")
    assert decoded == [Accepted("04A1B2")]


@pytest.mark.parametrize("pattern", ["(?P<card>[0-9", "^[0-9A-F]+$", "(?P<uid>[0-9]+)"])
def test_invalid_pattern_is_a_validation_error_naming_pattern(pattern: str) -> None:
    """A pattern that does not compile or lacks the group ``card`` fails validation on it."""
    with pytest.raises(ValidationError) as info:
        SerialReader("front", {"port": "/dev/ttyUSB0", "format": "ascii", "pattern": pattern})
    assert [e["loc"] for e in info.value.errors()] == [("pattern",)]


def test_registry_check_names_the_pattern_key() -> None:
    """Config checking through the registry names the reader's pattern option."""
    with pytest.raises(DriverError, match=r"readers\[0\]\.options\.pattern"):
        check_options("reader", "serial", {"port": "/dev/ttyS0", "format": "ascii",
                                           "pattern": "no group"}, "readers[0]")


def test_ascii_only_option_refused_for_em4100() -> None:
    """An ascii-only option under format em4100 is an error on that key, not ignored."""
    with pytest.raises(ValidationError) as info:
        SerialReaderOptions.model_validate({"port": "/dev/ttyS0", "max_line": 64})
    assert [e["loc"] for e in info.value.errors()] == [("max_line",)]


def test_port_is_required() -> None:
    """A serial reader without a port fails validation on ``port``."""
    with pytest.raises(ValidationError) as info:
        SerialReaderOptions.model_validate({})
    assert [e["loc"] for e in info.value.errors()] == [("port",)]


# --- EM4100 over a pty ------------------------------------------------------------------


@pytest.mark.parametrize("body", VALID)
def test_valid_vectors_decode(open_reader: OpenReader, pty_peer: PtyPeer, body: str) -> None:
    """Each rdm6300 valid vector decodes to em4100: plus its 10 id characters."""
    reader = open_reader()
    pty_peer.write(frame(body))
    assert read_ids(reader, 1) == [f"em4100:{body[:10]}"]
    assert reader.rejected == 0


def test_lower_case_hex_decodes_to_upper(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """A frame in lower-case hex is accepted and normalised to upper case."""
    reader = open_reader()
    pty_peer.write(frame(VALID[0].lower()))
    assert read_ids(reader, 1) == ["em4100:67003B51C6"]


def test_bad_checksum_rejected_then_next_frame_decodes(
        open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """A checksum failure is counted and logged by reason only; the next good frame decodes."""
    reader = open_reader()
    with capture_logs() as logs:
        pty_peer.write(frame(BAD_CHECKSUM) + frame(VALID[1]))
        assert read_ids(reader, 1) == ["em4100:67003BA86C"]
    assert reader.rejected == 1
    assert logs == [{"event": "reader_frame_rejected", "log_level": "warning",
                     "reader": "front", "reason": "checksum", "length": 14}]


def test_noise_before_and_between_frames_is_ignored(
        open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """Bytes outside frames (line noise, CR LF of clones, stray ETX) are skipped silently."""
    reader = open_reader()
    pty_peer.write(b"\xff\x00noise 67003B\x03\r\n" + frame(VALID[0]) + b"\r\n\x03\xfe\x80"
                   + frame(VALID[1]) + b"\r\n")
    assert read_ids(reader, 2) == ["em4100:67003B51C6", "em4100:67003BA86C"]
    assert reader.rejected == 0


def test_frame_split_across_writes(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """A frame arriving in pieces is held across reads and decoded once complete."""
    reader = open_reader()
    whole = frame(VALID[2])
    pty_peer.write(whole[:1])
    assert reader.read(0.05) is None
    pty_peer.write(whole[1:9])
    assert reader.read(0.05) is None
    pty_peer.write(whole[9:])
    assert read_ids(reader, 1) == ["em4100:67003BA867"]
    assert reader.rejected == 0


def test_read_waits_past_a_partial_frame(open_reader: OpenReader, pty_peer: PtyPeer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """read() does not give up when a partial frame arrives; it waits for the rest."""
    reader = open_reader()
    whole = frame(VALID[0])
    pty_peer.write(whole[:6])
    rest = ReadProbe(monkeypatch).then(6, lambda: pty_peer.write(whole[6:]))
    try:
        assert read_ids(reader, 1) == ["em4100:67003B51C6"]
    finally:
        rest.join()


def test_back_to_back_frames_in_one_write(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """Several frames in one chunk each come back, in order, repeats not debounced."""
    reader = open_reader()
    pty_peer.write(b"".join(frame(b) for b in [*VALID, VALID[0], VALID[0]]))
    assert read_ids(reader, 5) == [
        "em4100:67003B51C6", "em4100:67003BA86C", "em4100:67003BA867",
        "em4100:67003B51C6", "em4100:67003B51C6"]
    assert reader.read(0.05) is None


def test_stx_restarts_a_partial_frame(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """An STX inside a frame refuses the partial frame and starts a new one there."""
    reader = open_reader()
    with capture_logs() as logs:
        pty_peer.write(b"\x0267003B" + frame(VALID[0]))
        assert read_ids(reader, 1) == ["em4100:67003B51C6"]
    assert reader.rejected == 1
    assert [(e["reason"], e["length"]) for e in logs] == [("restarted", 7)]


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\x0267003B51CXCB\x03", "not_hex"),
    (b"\x0267003B51 C6CB\x03", "not_hex"),
    (b"\x0267003B51C6C\xcb\x03", "not_hex"),
    (b"\x0267003B51C6\x03", "short"),
    (b"\x0267003B51C6CBDA\x03", "no_end"),
])
def test_malformed_frame_rejected_then_next_decodes(
        open_reader: OpenReader, pty_peer: PtyPeer, raw: bytes, reason: str) -> None:
    """Non-hex characters, an early ETX or a missing ETX refuse the frame, then resync."""
    reader = open_reader()
    with capture_logs() as logs:
        pty_peer.write(raw + frame(VALID[1]))
        assert read_ids(reader, 1) == ["em4100:67003BA86C"]
    assert reader.rejected == 1
    assert [e["reason"] for e in logs] == [reason]


def test_rejection_logs_never_carry_card_digits(
        open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """Rejection log entries hold reader, reason and length only, never frame content."""
    reader = open_reader()
    with capture_logs() as logs:
        pty_peer.write(frame(BAD_CHECKSUM) + b"\x0267003B51" + frame("67003B51C6XX")
                       + frame(VALID[0]))
        assert read_ids(reader, 1) == ["em4100:67003B51C6"]
    assert reader.rejected == 3
    for entry in logs:
        assert set(entry) == {"event", "log_level", "reader", "reason", "length"}
        assert "3B51" not in repr(entry)


def test_reopen_resets_rejected_and_partial_frame(
        open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """open() after close() starts afresh: no rejections, no partial frame, no unread card
    from before (pyserial flushes the port's input buffer on open too)."""
    reader = open_reader()
    pty_peer.write(frame(BAD_CHECKSUM) + frame(VALID[0]) + frame(VALID[1]) + b"\x0267003B")
    assert read_ids(reader, 1) == ["em4100:67003B51C6"]
    assert reader.rejected == 1
    reader.close()
    reader.open()
    assert reader.rejected == 0
    assert reader.read(0.05) is None
    pty_peer.write(b"A86C98\x03" + frame(VALID[2]))
    assert read_ids(reader, 1) == ["em4100:67003BA867"]
    assert reader.rejected == 0


def test_idle_read_returns_none(open_reader: OpenReader) -> None:
    """With nothing arriving, read(timeout) returns None, also for a zero timeout."""
    reader = open_reader()
    assert reader.read(0.05) is None
    assert reader.read(0) is None


def test_read_before_open_raises_device_error() -> None:
    """Reading a reader that was never opened is a DeviceError naming the port."""
    reader = SerialReader("front", {"port": "/dev/ttyUSB7"})
    with pytest.raises(DeviceError, match="/dev/ttyUSB7"):
        reader.read(0)


# --- ASCII lines over a pty -------------------------------------------------------------


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"], ids=["CR", "LF", "CRLF"])
def test_ascii_line_endings(open_reader: OpenReader, pty_peer: PtyPeer, ending: bytes) -> None:
    """CR, LF and CRLF each end a line; the hex id is upper-cased under kind ``text``."""
    reader = open_reader(format="ascii")
    pty_peer.write(b"0a1b2c3d" + ending + b"DEADBEEF" + ending)
    assert read_ids(reader, 2) == ["text:0A1B2C3D", "text:DEADBEEF"]
    assert reader.rejected == 0


def test_ascii_line_split_across_writes(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """A line arriving in pieces is decoded when its line end arrives."""
    reader = open_reader(format="ascii")
    pty_peer.write(b"CAFE")
    assert reader.read(0.05) is None
    pty_peer.write(b"F00D\r")
    assert read_ids(reader, 1) == ["text:CAFEF00D"]


def test_ascii_too_long_line_rejected_once(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """A line over max_line is refused once, skipped up to its line end, then reading goes on."""
    reader = open_reader(format="ascii", max_line=8)
    with capture_logs() as logs:
        pty_peer.write(b"0123456789ABCDEF")
        assert reader.read(0.05) is None
        pty_peer.write(b"0123456789ABCDEF\r\n12345678\n")
        assert read_ids(reader, 1) == ["text:12345678"]
    assert reader.rejected == 1
    assert [(e["reason"], e["length"]) for e in logs] == [("too_long", 9)]


def test_ascii_non_matching_line_rejected(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """A line the pattern does not match as a whole is refused; the next line still reads."""
    reader = open_reader(format="ascii")
    with capture_logs() as logs:
        pty_peer.write(b"hello world\nID CAFE\nCAFE\n")
        assert read_ids(reader, 1) == ["text:CAFE"]
    assert reader.rejected == 2
    assert [e["reason"] for e in logs] == ["no_match", "no_match"]


def test_ascii_non_ascii_bytes_rejected(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """A line with bytes above 0x7F is refused as not ASCII; the next line still reads."""
    reader = open_reader(format="ascii")
    with capture_logs() as logs:
        pty_peer.write(b"CAF\xc9\r\n\xff\xfe\r\nBEEF\r\n")
        assert read_ids(reader, 1) == ["text:BEEF"]
    assert reader.rejected == 2
    assert [e["reason"] for e in logs] == ["not_ascii", "not_ascii"]


def test_ascii_blank_lines_are_skipped(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """Empty and blank lines are neither reads nor rejections."""
    reader = open_reader(format="ascii")
    pty_peer.write(b"\r\n\r\n  \t\n\rBEEF\n")
    assert read_ids(reader, 1) == ["text:BEEF"]
    assert reader.rejected == 0


def test_ascii_custom_pattern_kind_and_case(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """A custom pattern must match the whole line; id_kind and uppercase=False shape the id."""
    reader = open_reader(format="ascii", pattern=r"ID=(?P<card>[0-9a-z]+);", id_kind="uid",
                         uppercase=False)
    pty_peer.write(b"ID=04ab12;\nID=04AB12;\nID=04ab12;tail\n")
    assert read_ids(reader, 1) == ["uid:04ab12"]
    assert reader.read(0.05) is None
    assert reader.rejected == 2


# --- device errors ----------------------------------------------------------------------


def test_open_nonexistent_port_raises_device_error_naming_it() -> None:
    """Opening a port that does not exist is a DeviceError naming it; close() is then safe."""
    port = "/dev/serial/by-id/usb-no-such-reader-if00-port0"
    reader = SerialReader("front", {"port": port})
    with pytest.raises(DeviceError, match=port):
        reader.open()
    reader.close()
    reader.close()


def test_second_reader_on_the_same_port_is_refused(
        open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """The port is opened exclusively, so a second reader on it fails with DeviceError."""
    open_reader()
    other = SerialReader("other", {"port": pty_peer.path})
    with pytest.raises(DeviceError, match=pty_peer.path):
        other.open()
    other.close()


def test_peer_hang_up_raises_device_error(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """When the device end goes away, read() raises DeviceError naming the port, and so does
    a reopen, as with an unplugged USB reader."""
    reader = open_reader()
    pty_peer.hang_up()
    with pytest.raises(DeviceError, match=pty_peer.path):
        reader.read(1.0)
    with pytest.raises(DeviceError, match="not open"):
        reader.read(0)
    with pytest.raises(DeviceError, match=pty_peer.path):
        reader.open()
    reader.close()


def test_hang_up_during_a_blocked_read_raises_device_error(
        open_reader: OpenReader, pty_peer: PtyPeer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read already waiting for bytes raises DeviceError when the device end goes away."""
    reader = open_reader()
    hang_up = ReadProbe(monkeypatch).then(0, pty_peer.hang_up)
    try:
        with pytest.raises(DeviceError, match=pty_peer.path):
            reader.read(60.0)
    finally:
        hang_up.join()


# --- cross-check with the rdm6300 package -----------------------------------------------


class _Rdm6300Collector(rdm6300.BaseReader):  # type: ignore[misc]
    """rdm6300's own event loop, recording every valid and invalid card it reports."""

    def __init__(self, port: str, expected: int) -> None:
        super().__init__(port, heartbeat_interval=None)
        self.events: list[Any] = []
        self._expected = expected
        self._give_up = time.monotonic() + 30  # bounds a failure; not a timing assertion

    def card_inserted(self, card: Any) -> None:
        self.events.append(card)

    def invalid_card(self, card: Any) -> None:
        self.events.append(card)

    def tick(self) -> None:
        if len(self.events) >= self._expected or time.monotonic() > self._give_up:
            self.stop()


def test_rdm6300_agrees_over_a_pty(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """The same bytes on two ptys: rdm6300 and our reader agree on validity and card value."""
    stream = b"".join(frame(b) for b in [VALID[0], VALID[1], BAD_CHECKSUM, VALID[2], VALID[0]])
    ours = open_reader()
    theirs_pty = type(pty_peer)()
    try:
        theirs = _Rdm6300Collector(theirs_pty.path, expected=5)
        try:
            theirs_pty.write(stream)
            pty_peer.write(stream)
            theirs.start()
        finally:
            theirs.close()
    finally:
        theirs_pty.close()
    our_ids = read_ids(ours, 4)
    assert [c.is_valid for c in theirs.events] == [True, True, False, True, True]
    valid = [c for c in theirs.events if c.is_valid]
    assert our_ids == [f"em4100:{c.type:02X}{c.value:08X}" for c in valid]
    assert ours.rejected == 1


HEX = "0123456789abcdefABCDEF"


@PROPERTY
@given(body=st.text(alphabet=HEX, min_size=12, max_size=12))
def test_decoder_matches_rdm6300_parser(body: str) -> None:
    """For any 12 hex characters, our decoder and rdm6300's agree on validity and value."""
    theirs = rdm6300.BaseReader._parse_fragment(  # noqa: SLF001 - its parser, pinned at 0.1.1
        [int(c, 16) for c in body])
    ours = Em4100Decoder().feed(frame(body))
    assert ours == ([Accepted(body[:10].upper())] if theirs.is_valid
                    else [Rejected("checksum", 14)])
    assert (theirs.type, theirs.value) == (int(body[:2], 16), int(body[2:10], 16))


@PROPERTY
@given(data=st.binary(min_size=5, max_size=5))
def test_encoded_frames_are_valid_for_rdm6300(data: bytes) -> None:
    """Every frame em4100_frame builds passes rdm6300's checksum and decodes back to itself."""
    raw = em4100_frame(data.hex().upper())
    theirs = rdm6300.BaseReader._parse_fragment(  # noqa: SLF001 - its parser, pinned at 0.1.1
        [int(chr(c), 16) for c in raw[1:13]])
    assert theirs.is_valid
    assert theirs.value == int.from_bytes(data[1:], "big")
    assert Em4100Decoder().feed(raw) == [Accepted(data.hex().upper())]


# --- properties of the pure decoders ----------------------------------------------------


def _independent_frame(data: bytes, lower: bool) -> bytes:
    """An EM4100 frame built here, not by the driver: hex of data + XOR, in either case."""
    text = (data + bytes([reduce(lambda a, b: a ^ b, data)])).hex()
    return b"\x02" + (text if lower else text.upper()).encode("ascii") + b"\x03"


_noise = st.binary(max_size=40).map(lambda b: b.replace(b"\x02", b""))
_card = st.tuples(st.binary(min_size=5, max_size=5), st.booleans())


def _feed_in_chunks(decoder: Em4100Decoder | LineDecoder, stream: bytes,
                    cuts: list[int]) -> list[Accepted | Rejected]:
    out: list[Accepted | Rejected] = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        out.extend(decoder.feed(stream[start:cut]))
        start = cut
    return out


@PROPERTY
@given(lead=_noise, cards=st.lists(st.tuples(_card, _noise), max_size=8),
       cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_frames_among_noise_yield_exactly_their_ids(
        lead: bytes, cards: list[tuple[tuple[bytes, bool], bytes]], cuts: list[int]) -> None:
    """Valid frames with STX-free noise around them decode to exactly their ids, in order,
    however the stream is chunked."""
    stream = lead + b"".join(_independent_frame(d, low) + noise for (d, low), noise in cards)
    got = _feed_in_chunks(Em4100Decoder(), stream, cuts)
    assert got == [Accepted(d.hex().upper()) for (d, _), _ in cards]


@PROPERTY
@given(stream=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_em4100_decoder_total_on_arbitrary_bytes(stream: bytes, cuts: list[int]) -> None:
    """Any bytes, in any chunks, decode without raising, exactly as in one chunk; every
    accepted id is 10 upper-case hex characters, and each outcome needs its own STX."""
    got = _feed_in_chunks(Em4100Decoder(), stream, cuts)
    assert got == Em4100Decoder().feed(stream)
    assert all(len(a.value) == 10 and a.value == a.value.upper()
               for a in got if isinstance(a, Accepted))
    assert len(got) <= stream.count(b"\x02")


_hex_id = st.text(alphabet=HEX, min_size=4, max_size=32)
_ending = st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n"])


@PROPERTY
@given(lines=st.lists(st.tuples(_hex_id, _ending), max_size=8),
       cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_hex_lines_yield_exactly_their_ids(lines: list[tuple[str, bytes]],
                                           cuts: list[int]) -> None:
    """Hex lines with any mix of CR, LF and CRLF endings decode to their upper-cased ids,
    in order, however the stream is chunked."""
    stream = b"".join(text.encode("ascii") + end for text, end in lines)
    decoder = LineDecoder(re.compile(DEFAULT_PATTERN), True, 128)
    assert _feed_in_chunks(decoder, stream, cuts) == [Accepted(t.upper()) for t, _ in lines]


@PROPERTY
@given(stream=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_line_decoder_total_on_arbitrary_bytes(stream: bytes, cuts: list[int]) -> None:
    """Any bytes, in any chunks, decode without raising, exactly as in one chunk."""
    def fresh() -> LineDecoder:
        return LineDecoder(re.compile(DEFAULT_PATTERN), True, 16)

    assert _feed_in_chunks(fresh(), stream, cuts) == fresh().feed(stream)
