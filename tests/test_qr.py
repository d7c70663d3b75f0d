"""The serial QR / barcode scanner reader, over a real pseudo-terminal.

The test writes what a scanner in serial mode sends (text + CR, LF or CRLF) to the device
end of a pty; no scanner emulator exists, and none is needed: the wire format is a line of
text. Expected ids are computed here with hashlib from the bytes written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from drivers.base import DeviceError
from drivers.qr import QrLineDecoder, QrOptions, QrReader, Refused, Scanned
from drivers.registry import DriverError, check_options, create

if TYPE_CHECKING:
    from tests.conftest import PtyPeer

READ_TIMEOUT = 5.0
"""Generous: bytes already written arrive in milliseconds; this only bounds a failure."""
URL = "https://example.invalid/permit?c=4401-2026-000123&sig=Zm9vYmFy"
"""A made-up residence-permit-style code: a URL with an id and a signature."""
CHINESE = "粤居码:张三|440106199001011234"
"""A made-up text with a name and an ID-number-shaped field: it must never be logged."""


def qr_id(text: bytes) -> str:
    """The id the driver must report for the scanned bytes ``text``."""
    return "qr:" + hashlib.sha256(text).hexdigest()


OpenReader = Callable[..., QrReader]


@pytest.fixture
def open_reader(pty_peer: PtyPeer) -> Iterator[OpenReader]:
    """Open QrReaders on the test's pty with the given options; all closed afterwards."""
    readers: list[QrReader] = []

    def _open(**options: Any) -> QrReader:
        reader = QrReader("lobby", {"port": pty_peer.path, **options})
        reader.open()
        readers.append(reader)
        return reader

    yield _open
    for reader in readers:
        reader.close()


def read_ids(reader: QrReader, count: int) -> list[str | None]:
    """The card ids of the next ``count`` reads (None for a read that timed out)."""
    reads = [reader.read(READ_TIMEOUT) for _ in range(count)]
    return [r.card_id if r else None for r in reads]


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"], ids=["CR", "LF", "CRLF"])
def test_scan_is_reported_as_sha256_of_the_text(
        open_reader: OpenReader, pty_peer: PtyPeer, ending: bytes) -> None:
    """A scanned line becomes qr:<sha256 of its bytes>, whatever the line end."""
    reader = open_reader()
    pty_peer.write(URL.encode() + ending + b"ABC-123" + ending)
    assert read_ids(reader, 2) == [qr_id(URL.encode()), qr_id(b"ABC-123")]
    assert reader.read(0.05) is None
    assert reader.rejected == 0


def test_utf8_text_is_hashed_as_utf8(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """Non-ASCII text is hashed as its UTF-8 bytes, and the id shows none of it."""
    reader = open_reader()
    with capture_logs() as logs:
        pty_peer.write(CHINESE.encode("utf-8") + b"\r\n")
        got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == qr_id(CHINESE.encode("utf-8"))
    assert "4401" not in got.card_id
    assert logs == []


def test_text_is_taken_exactly(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """No trimming or case folding: texts that differ in case or spaces differ as ids."""
    reader = open_reader()
    pty_peer.write(b"abc\n ABC\nABC \n")
    assert read_ids(reader, 3) == [qr_id(b"abc"), qr_id(b" ABC"), qr_id(b"ABC ")]


def test_default_max_len_is_256_bytes(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """256 bytes are accepted by default, 257 refused as too long, once."""
    reader = open_reader()
    with capture_logs() as logs:
        pty_peer.write(b"x" * 257 + b"\r\n" + b"y" * 256 + b"\r\n")
        assert read_ids(reader, 1) == [qr_id(b"y" * 256)]
    assert reader.rejected == 1
    assert logs == [{"event": "reader_frame_rejected", "log_level": "warning",
                     "reader": "lobby", "reason": "too_long", "length": 257}]


def test_too_long_line_is_skipped_to_its_end(open_reader: OpenReader,
                                             pty_peer: PtyPeer) -> None:
    """A line over max_len is refused once, even when it arrives in pieces, and reading
    resumes after its line end."""
    reader = open_reader(max_len=16)
    pty_peer.write(b"0123456789ABCDEF0123")
    assert reader.read(0.05) is None
    pty_peer.write(b"456789\r\n0123456789ABCDEF\n")
    assert read_ids(reader, 1) == [qr_id(b"0123456789ABCDEF")]
    assert reader.rejected == 1


@pytest.mark.parametrize("line", [
    b"ABC\x1b[2JDEF",          # ESC: a terminal escape sequence
    b"ABC\tDEF",               # TAB (scanners can be set to send it as a suffix)
    b"\x00ABC",                # NUL
    b"ABC\x7f",                # DEL
    "ABC\u0085DEF".encode(),   # C1 NEL, encoded as UTF-8
    b"\x02ABC\x03",            # STX/ETX framing some scanners add
], ids=["esc", "tab", "nul", "del", "c1-nel", "stx-etx"])
def test_control_characters_are_refused(open_reader: OpenReader, pty_peer: PtyPeer,
                                        line: bytes) -> None:
    """A line holding any control character is refused; the next line still reads."""
    reader = open_reader()
    with capture_logs() as logs:
        pty_peer.write(line + b"\r\nOK\r\n")
        assert read_ids(reader, 1) == [qr_id(b"OK")]
    assert reader.rejected == 1
    assert [(e["reason"], e["length"]) for e in logs] == [("control_char", len(line))]


def test_non_utf8_text_is_refused(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """Bytes that are not UTF-8 (a scanner left on GBK output) are refused."""
    reader = open_reader()
    with capture_logs() as logs:
        pty_peer.write("粤居码".encode("gbk") + b"\r\n\xff\xfe\r\nOK\n")
        assert read_ids(reader, 1) == [qr_id(b"OK")]
    assert reader.rejected == 2
    assert [e["reason"] for e in logs] == ["not_utf8", "not_utf8"]


def test_rejection_logs_carry_no_text(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """Refusal log entries hold reader, reason and length only, never the scanned text."""
    reader = open_reader(max_len=20)
    with capture_logs() as logs:
        pty_peer.write(CHINESE.encode() + b"\n" + CHINESE.encode() + b"\x07\n"
                       + "粤居码".encode("gbk") + b"\nOK\n")
        assert read_ids(reader, 1) == [qr_id(b"OK")]
    assert reader.rejected == 3
    for entry in logs:
        assert set(entry) == {"event", "log_level", "reader", "reason", "length"}
        for fragment in ("4401", "张三", "粤"):
            assert fragment not in repr(entry)


def test_blank_lines_are_skipped(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """Empty and all-space lines are neither scans nor refusals."""
    reader = open_reader()
    pty_peer.write(b"\r\n\n   \r\nOK\r\n")
    assert read_ids(reader, 1) == [qr_id(b"OK")]
    assert reader.rejected == 0


def test_scan_split_across_writes(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """A line arriving in pieces (a UTF-8 character split too) is read at its line end."""
    reader = open_reader()
    data = CHINESE.encode()
    pty_peer.write(data[:4])
    assert reader.read(0.05) is None
    pty_peer.write(data[4:] + b"\r")
    assert read_ids(reader, 1) == [qr_id(data)]


def test_idle_read_returns_none_also_for_zero_timeout(open_reader: OpenReader) -> None:
    """With nothing scanned, read(timeout) returns None, also for a zero timeout."""
    reader = open_reader()
    assert reader.read(0.05) is None
    assert reader.read(0) is None


def test_reopen_drops_a_partial_line(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """close() then open() starts afresh: a half line from before is not glued to the next."""
    reader = open_reader()
    pty_peer.write(b"HALF")
    assert reader.read(0.05) is None
    reader.close()
    reader.close()
    reader.open()
    pty_peer.write(b"WHOLE\n")
    assert read_ids(reader, 1) == [qr_id(b"WHOLE")]


def test_peer_hang_up_raises_device_error(open_reader: OpenReader, pty_peer: PtyPeer) -> None:
    """When the device end goes away (scanner unplugged), read() raises DeviceError
    naming the port, and further reads say it is not open."""
    reader = open_reader()
    pty_peer.hang_up()
    with pytest.raises(DeviceError, match=pty_peer.path):
        reader.read(1.0)
    with pytest.raises(DeviceError, match="not open"):
        reader.read(0)


def test_open_missing_port_raises_device_error_naming_it() -> None:
    """Opening a port that does not exist is a DeviceError naming it; close() is safe."""
    reader = QrReader("lobby", {"port": "/dev/ttyACM7"})
    with pytest.raises(DeviceError, match="/dev/ttyACM7"):
        reader.open()
    reader.close()


@pytest.mark.parametrize(("options", "key"), [
    ({}, "port"),
    ({"port": "/dev/ttyACM0", "max_len": 0}, "max_len"),
    ({"port": "/dev/ttyACM0", "max_len": 100_000}, "max_len"),
    ({"port": "/dev/ttyACM0", "max_len": "256"}, "max_len"),
    ({"port": "/dev/ttyACM0", "pattern": ".*"}, "pattern"),
])
def test_registry_check_names_the_bad_option(options: dict[str, Any], key: str) -> None:
    """Config checking through the registry names a missing, out-of-range, wrong-typed or
    unknown option of a qr reader."""
    with pytest.raises(DriverError, match=rf"readers\[0\]\.options\.{key}"):
        check_options("reader", "qr", options, "readers[0]")


def test_registry_creates_a_qr_reader_with_defaults() -> None:
    """The registry knows the driver as "qr"; defaults are 9600 baud and 256 bytes."""
    reader = create("reader", "qr", "lobby", {"port": "/dev/ttyACM0"})
    assert isinstance(reader, QrReader)
    assert (reader.options.baudrate, reader.options.max_len) == (9600, 256)
    assert QrOptions.model_validate({"port": "x"}).max_len == 256


_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1,
                max_size=60).filter(lambda t: t.strip() != "")


@settings(deadline=None)
@given(texts=st.lists(_text, max_size=6),
       ending=st.sampled_from([b"\r", b"\n", b"\r\n"]),
       cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_any_printable_lines_hash_exactly(texts: list[str], ending: bytes,
                                          cuts: list[int]) -> None:
    """Any texts without control characters come out as the SHA-256 of their UTF-8
    bytes, in order, however the stream is chunked."""
    stream = b"".join(t.encode() + ending for t in texts)
    decoder = QrLineDecoder(4096)
    out: list[Scanned | Refused] = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        out.extend(decoder.feed(stream[start:cut]))
        start = cut
    assert out == [Scanned(hashlib.sha256(t.encode()).hexdigest()) for t in texts]
