"""Fuzz targets of the OSDP driver's pure parts: the frame assembler that stands between
the RS-485 line and libosdp, the frame scanner and parser that read what crossed the
wire, card ids from card-read events, and keypad entry. No libosdp, no port.
"""

from __future__ import annotations

import re

from hypothesis import strategies as st

from drivers.osdp import credentials, frames
from drivers.osdp.evidence import LinkEvidence, diagnose
from drivers.osdp.link import CARD_ASCII, CARD_RAW_UNSPECIFIED, CARD_RAW_WIEGAND
from tests.fuzz.common import Cursor, Target, pack_chunks
from tests.fuzz.strategies import corrupt, noise, stream

GAP_S = frames.interchar_gap_s(9600, 0.020)
"""The assembler's inter-character gap as the link sets it at 9600 baud (73 ms)."""


def packet(address: int, code: int, data: bytes = b"", *, crc: bool = True,
           scb: bytes = b"") -> bytes:
    """A checked OSDP packet (SOM to CRC or checksum), with an optional security block."""
    ctrl = (0x04 if crc else 0) | (0x08 if scb else 0)
    length = 5 + len(scb) + 1 + len(data) + (2 if crc else 1)
    head = bytes([frames.SOM, address, length & 0xFF, length >> 8, ctrl]) + scb
    body = head + bytes([code]) + data
    if crc:
        return body + frames.crc16(body).to_bytes(2, "little")
    return body + bytes([-sum(body) & 0xFF])


def _check_frame(frame: frames.Frame) -> None:
    assert 0 <= frame.address <= 0x7F and 0 <= frame.code <= 0xFF
    if frame.scb_type is not None:
        assert 0 <= frame.scb_type <= 0xFF
    # What the bus does with every frame it sees (drivers/osdp/bus.py _on_rx, _on_tx).
    evidence = LinkEvidence()
    if frame.reply:
        evidence.reply(frame, 1.0)
    else:
        evidence.command(frame)
    assert isinstance(diagnose(evidence, secure=True, online=False, now=2.0), str)
    if frame.readable:
        assert isinstance(frames.offers_secure_channel(frame), bool)


def osdp_assembler(data: bytes) -> None:
    """Bytes arriving in pieces with gaps between them: every frame handed on starts at
    SOM (or a mark before it), is as long as its length field, has a right check and
    fits libosdp's buffer; parsing it, as the bus does, never fails; at most one
    buffer's worth is held; with no gaps, the cut of the pieces does not matter."""
    cur = Cursor(data)
    assembler = frames.FrameAssembler(GAP_S)
    now = 0.0
    pieces: list[bytes] = []
    got: list[bytes] = []
    while cur.remaining:
        now += cur.byte() * 0.001  # 0 to 255 ms: both sides of the 73 ms gap
        piece = cur.take(cur.byte())
        pieces.append(piece)
        got += assembler.feed(piece, now)
        assert assembler.pending <= frames.LIBOSDP_MAX_PACKET
    got += assembler.feed(b"", now + 10.0)
    assert assembler.pending <= 1  # at most a mark byte whose SOM never came
    for out in got:
        mark = 1 if out[0] == frames.MARK else 0
        packet_ = out[mark:]
        assert packet_[0] == frames.SOM and len(out) <= frames.LIBOSDP_MAX_PACKET
        assert len(packet_) == packet_[2] | packet_[3] << 8
        assert frames.check_ok(packet_)
        frame = frames.parse_frame(packet_)  # as bus._on_rx does with every frame
        if frame is not None:
            _check_frame(frame)
    whole = frames.FrameAssembler(GAP_S)
    together = frames.FrameAssembler(GAP_S)
    at_once = whole.feed(b"".join(pieces), 0.0)
    piecewise = [f for piece in pieces for f in together.feed(piece, 0.0)]
    assert at_once == piecewise
    assert whole.refused == together.refused and whole.noise == together.noise


def osdp_scanner(data: bytes) -> None:
    """What crossed the wire, scanned in pieces (as the bus reads its own commands):
    valid frames only, the same whatever the cut, each one safe to take as evidence."""
    pieces = list(Cursor(data).chunks())
    scanner = frames.FrameScanner()
    got: list[frames.Frame] = []
    for piece in pieces:
        got += scanner.feed(piece)
    assert got == frames.FrameScanner().feed(b"".join(pieces))
    for frame in got:
        _check_frame(frame)


def osdp_parse(data: bytes) -> None:
    """One packet, as the bus hands it on: a Frame or None, never an exception."""
    frame = frames.parse_frame(data)
    if frame is not None:
        _check_frame(frame)


_CARD_REASONS = {"no_data", "bad_bit_count", "length_mismatch", "not_printable",
                 "unknown_format"}
_CARD_ID = re.compile(r"osdp:([0-9]+:[0-9A-F]+|fmt:[ -9;-~]+)")
_FORMATS = (CARD_RAW_UNSPECIFIED, CARD_RAW_WIEGAND, CARD_ASCII, 3, None, "ascii")


def osdp_card(data: bytes) -> None:
    """A card-read event as libosdp reports it (format, bit length, data from the
    reader): a card id ``osdp:...`` of printable ASCII, or a ValueError naming a reason."""
    cur = Cursor(data)
    head = cur.byte()
    fmt = _FORMATS[head % len(_FORMATS)]
    length: object = cur.u16() - (256 if head & 0x80 else 0)
    if head & 0x40:
        length = None
    event = {"event": 1, "reader_no": 0, "format": fmt, "length": length,
             "data": cur.rest() if not head & 0x20 else cur.rest().decode("latin-1")}
    try:
        card = credentials.card_id(event)
    except ValueError as exc:
        assert str(exc) in _CARD_REASONS, exc
        return
    assert _CARD_ID.fullmatch(card), card


def osdp_keypad(data: bytes) -> None:
    """Key presses in pieces with gaps: PINs of at most the configured digits, refusals
    with a known reason and a count of keys."""
    cur = Cursor(data)
    max_digits = 1 + cur.byte() % 16
    pins = credentials.PinAssembler(max_digits, timeout_s=5.0)
    now = 0.0
    while cur.remaining:
        now += cur.byte() * 0.05  # 0 to 12.75 s: both sides of the 5 s timeout
        for entry in pins.feed(cur.take(cur.byte()), now):
            if isinstance(entry, credentials.Pin):
                assert entry.digits.isdigit() and 1 <= len(entry.digits) <= max_digits
            else:
                assert entry.reason in {"timeout", "not_digit", "too_long"}, entry
                assert entry.length >= 1


def _stream_seeds() -> list[bytes]:
    poll = packet(0x00, frames.CMD_POLL, crc=True)
    pdid = packet(0x80, frames.REPLY_PDID, bytes(12))
    pdcap = packet(0x80, frames.REPLY_PDCAP, bytes([9, 1, 1, 10, 0, 0]), crc=False)
    secure = packet(0x80, 0x50, bytes(4) + bytes(4), scb=bytes([3, 0x16, 1]))
    return [pack_chunks([b"\xff" + poll, pdid]), pack_chunks([pdcap[:3], pdcap[3:], secure]),
            pack_chunks([b"\x00\x53\x53" + pdid])]


def _assembler_seeds() -> list[bytes]:
    poll = packet(0x00, frames.CMD_POLL)
    pdid = packet(0x80, frames.REPLY_PDID, bytes(12))
    return [bytes([0, len(poll)]) + poll + bytes([0, len(pdid)]) + pdid,
            bytes([0, 5]) + pdid[:5] + bytes([100, len(pdid) - 5]) + pdid[5:],
            bytes([0, 1, 0xFF, 3, len(poll)]) + poll]


# -- structure-aware inputs ------------------------------------------------------------------


def packets() -> st.SearchStrategy[bytes]:
    """Checked packets of any address and code, plain or with a security block of any
    length (a block of length 0 or 1 included), with CRC or checksum."""
    scb = st.one_of(st.just(b""), st.builds(lambda kind, data: bytes([2 + len(data), kind])
                                            + data, st.integers(0x11, 0x18),
                                            st.binary(max_size=4)))
    return st.builds(packet, st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40),
                     crc=st.booleans(), scb=scb)


@st.composite
def odd_packets(draw: st.DrawFn) -> bytes:
    """Checked packets whose control byte claims whatever it likes (a security block in a
    packet too short to hold one), as a faulty or hostile device on the bus could send."""
    ctrl = draw(st.integers(0, 255))
    body = bytes([frames.SOM, draw(st.integers(0, 255))])
    rest = draw(st.binary(max_size=6))
    crc = bool(ctrl & 0x04)
    length = 5 + len(rest) + (2 if crc else 1)
    head = body + bytes([length & 0xFF, length >> 8, ctrl]) + rest
    if crc:
        return head + frames.crc16(head).to_bytes(2, "little")
    return head + bytes([-sum(head) & 0xFF])


def _scanner_structured() -> st.SearchStrategy[bytes]:
    return stream(st.one_of(corrupt(packets()), odd_packets(), noise(), st.just(b"\xff")))


@st.composite
def _timed(draw: st.DrawFn) -> bytes:
    data = b"".join(draw(st.lists(st.one_of(corrupt(packets()), odd_packets(), noise()),
                                  max_size=5)))
    out = bytearray()
    while data:
        size = draw(st.integers(1, 40))
        out += bytes([draw(st.sampled_from([0, 1, 20, 80, 200]))]) + bytes([len(data[:size])])
        out += data[:size]
        data = data[size:]
    return bytes(out)


def _card_structured() -> st.SearchStrategy[bytes]:
    raw = st.binary(min_size=1, max_size=16).flatmap(lambda d: st.tuples(
        st.integers(0, 255), st.integers(max(len(d) * 8 - 7, 0), len(d) * 8 + 1),
        st.just(d)))
    return raw.map(lambda t: bytes([t[0] & 0xDF]) + t[1].to_bytes(2, "big") + t[2])


def _keypad_structured() -> st.SearchStrategy[bytes]:
    keys = st.text(alphabet="0123456789#*\r\x7fA", max_size=12).map(str.encode)
    pieces = st.lists(st.tuples(st.sampled_from([0, 1, 60, 120, 255]), keys), max_size=6)
    return st.tuples(st.integers(0, 255), pieces).map(
        lambda t: bytes([t[0]]) + b"".join(bytes([dt, len(k)]) + k for dt, k in t[1]))


TARGETS: list[Target] = [
    Target("osdp_assembler", osdp_assembler, 4096, "osdp.frames.FrameAssembler",
           _assembler_seeds, _timed),
    Target("osdp", osdp_scanner, 4096, "osdp.frames.FrameScanner, parse_frame, evidence",
           _stream_seeds, _scanner_structured),
    Target("osdp_parse", osdp_parse, 1500, "osdp.frames.parse_frame",
           lambda: [packet(0x80, frames.REPLY_PDID, bytes(12)),
                    packet(0x00, frames.CMD_CHLNG, bytes(8), scb=bytes([3, 0x11, 0]))],
           lambda: st.one_of(packets(), odd_packets())),
    Target("osdp_card", osdp_card, 512, "osdp.credentials.card_id",
           lambda: [bytes([1, 0, 26]) + bytes.fromhex("1D5E1A40"),
                    bytes([2, 0, 0]) + b"12345678"], _card_structured),
    Target("osdp_keypad", osdp_keypad, 1024, "osdp.credentials.PinAssembler",
           lambda: [bytes([6, 0, 5]) + b"1234#", bytes([4, 0, 3]) + b"12*" + bytes([200, 2])
                    + b"9#"], _keypad_structured),
]
