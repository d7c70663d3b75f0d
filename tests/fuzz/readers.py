"""Fuzz targets of the serial and GPIO reader drivers' frame parsers (pure decoders, no port).

Each stream decoder is fed the fuzz bytes in the pieces ``Cursor.chunks`` cuts, as a UART
hands them over, and must (1) return only its documented results, (2) give the same
results as when fed everything at once (a card read must not depend on how the kernel
split the bytes), (3) keep a bounded buffer, and (4) decode a frame re-built from each
result to that result again.
"""

from __future__ import annotations

import re

from hypothesis import strategies as st

from drivers import idcard, pn532, qr, serial_reader, wiegand
from drivers.serialport import CHUNK
from tests.fuzz.common import Cursor, Target, pack_chunks
from tests.fuzz.strategies import corrupt, noise, stream

# -- EM4100 (RDM6300) frames -----------------------------------------------------------------

EM4100_REASONS = {"restarted", "short", "not_hex", "no_end", "checksum"}
_EM4100_VALUE = re.compile(r"[0-9A-F]{10}")


def em4100(data: bytes) -> None:
    """RDM6300 frames in arbitrary pieces: valid reads are 10 upper-case hex characters
    that re-encode to a frame decoding the same; refusals have a known reason."""
    decoder = serial_reader.Em4100Decoder()
    got: list[serial_reader.Decoded] = []
    pieces = list(Cursor(data).chunks())
    for piece in pieces:
        got += decoder.feed(piece)
    assert got == serial_reader.Em4100Decoder().feed(b"".join(pieces))
    for item in got:
        if isinstance(item, serial_reader.Accepted):
            assert _EM4100_VALUE.fullmatch(item.value), item
            again = serial_reader.Em4100Decoder().feed(serial_reader.em4100_frame(item.value))
            assert again == [item]
        else:
            assert isinstance(item, serial_reader.Rejected)
            assert item.reason in EM4100_REASONS and item.length >= 1, item


# -- ASCII line readers ----------------------------------------------------------------------

LINE_REASONS = {"too_long", "not_ascii", "no_match", "empty_card"}
LINE_PATTERNS = (serial_reader.DEFAULT_PATTERN, r"(?P<card>[0-9]{1,10})",
                 r"ID=(?P<card>[0-9A-Za-z]*);", r"(?P<card>.*)")
"""The default pattern and three a site might configure (one that admits an empty card)."""


def ascii_lines(data: bytes) -> None:
    """ASCII lines in arbitrary pieces, under one of several configured patterns and line
    limits: reads are ASCII, upper-cased when configured, and never longer than a line."""
    cur = Cursor(data)
    mode = cur.byte()
    pattern = re.compile(LINE_PATTERNS[mode % len(LINE_PATTERNS)])
    uppercase = bool(mode & 0x10)
    max_line = 1 + cur.u16() % CHUNK
    decoder = serial_reader.LineDecoder(pattern, uppercase, max_line)
    pieces = list(cur.chunks())
    got: list[serial_reader.Decoded] = []
    for piece in pieces:
        got += decoder.feed(piece)
    whole = serial_reader.LineDecoder(pattern, uppercase, max_line).feed(b"".join(pieces))
    assert got == whole
    for item in got:
        if isinstance(item, serial_reader.Accepted):
            assert item.value and item.value.isascii() and len(item.value) <= max_line
            assert "\r" not in item.value and "\n" not in item.value
            if uppercase:
                assert item.value == item.value.upper()
        else:
            assert item.reason in LINE_REASONS and item.length >= 1, item


# -- QR / barcode scanners -----------------------------------------------------------------

QR_REASONS = {"too_long", "not_utf8", "control_char"}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def qr_lines(data: bytes) -> None:
    """Scanner lines in arbitrary pieces: a scan is only ever a SHA-256 digest (the text
    never leaves the driver), refusals have a known reason and a length within the limit."""
    cur = Cursor(data)
    max_len = 1 + cur.u16() % 4096
    pieces = list(cur.chunks())
    decoder = qr.QrLineDecoder(max_len)
    got: list[qr.Scanned | qr.Refused] = []
    for piece in pieces:
        got += decoder.feed(piece)
    assert got == qr.QrLineDecoder(max_len).feed(b"".join(pieces))
    for item in got:
        if isinstance(item, qr.Scanned):
            assert _SHA256_HEX.fullmatch(item.digest), item
        else:
            assert item.reason in QR_REASONS and 1 <= item.length <= max_len + 1, item


# -- PN532 frames ------------------------------------------------------------------------------

PN532_REASONS = {"length_checksum", "bad_length", "data_checksum", "bad_tfi", "short"}
LIST_REASONS = {"empty_list_response", "short_target", "bad_uid_length"}
PN532_BUFFER_MAX = 7 + pn532.MAX_FRAME_DATA + 2
"""The most a PN532 decoder may hold: an extended header, the longest data, DCS, postamble."""


def chip_frame(code: int, data: bytes) -> bytes:
    """A chip-to-host frame carrying response ``code`` and ``data`` (the host frame with
    TFI ``D5``)."""
    host = pn532.command_frame(code, data)
    start = 5 if len(data) + 2 <= 255 else 8
    body = bytes([pn532.CHIP_TFI, code]) + data
    return host[:start] + body + bytes([-sum(body) & 0xFF, 0x00])


def pn532_frames(data: bytes) -> None:
    """Chip frames in arbitrary pieces: events of the documented kinds, a bounded buffer,
    responses that survive a re-encode, and InListPassiveTarget data that parses to a
    target or a ValueError naming a known reason."""
    decoder = pn532.FrameDecoder()
    pieces = list(Cursor(data).chunks())
    got: list[pn532.Event] = []
    for piece in pieces:
        got += decoder.feed(piece)
        # The buffer bound is the decoder's memory contract on a noisy line for years.
        assert len(vars(decoder)["_buffer"]) <= PN532_BUFFER_MAX
    assert got == pn532.FrameDecoder().feed(b"".join(pieces))
    for event in got:
        if isinstance(event, pn532.Rejected):
            assert event.reason in PN532_REASONS, event
        elif isinstance(event, pn532.Response):
            assert 0 <= event.code <= 255 and len(event.data) < pn532.MAX_FRAME_DATA
            assert pn532.FrameDecoder().feed(chip_frame(event.code, event.data)) == [event]
            _list_target(event.data)
        else:
            assert isinstance(event, pn532.Ack | pn532.Nack | pn532.ErrorFrame), event


def _list_target(data: bytes) -> None:
    try:
        target = pn532.parse_list_106a(data)
    except ValueError as exc:
        assert str(exc) in LIST_REASONS, exc
        return
    if target is not None:
        assert 1 <= len(target.uid) <= 10 and len(target.sens_res) == 2


def pn532_seeds() -> list[bytes]:
    """A wake-up exchange: ACK, the firmware version, an ACK and a one-target list."""
    uid = bytes.fromhex("04A1B2C3D4E5F6")
    listed = bytes([1, 1, 0x00, 0x44, 0x00, len(uid)]) + uid
    stream = (pn532.ACK + chip_frame(0x03, bytes.fromhex("32010607")) + pn532.ACK
              + chip_frame(0x4B, listed) + bytes.fromhex("0000ff01ff7f8100"))
    return [pack_chunks([stream]), pack_chunks([stream[:7], stream[7:20], stream[20:]]),
            pack_chunks([pn532.ACK + chip_frame(0x4B, b"\x00")])]


# -- ID-card (SAM) module replies ------------------------------------------------------------

IDCARD_REASONS = {"bad_length", "checksum"}


def idcard_reply(sw: bytes, data: bytes) -> bytes:
    """A module reply frame with status bytes ``sw`` and ``data``."""
    body = (len(sw) + len(data) + 1).to_bytes(2, "big") + sw + data
    return idcard.PREAMBLE + body + bytes([idcard.checksum(body)])


def idcard_replies(data: bytes) -> None:
    """Module replies in arbitrary pieces: replies with three status bytes that re-encode
    to themselves, known refusals, and at most one frame's worth of partial input held."""
    decoder = idcard.ReplyDecoder()
    pieces = list(Cursor(data).chunks())
    got: list[idcard.Reply | idcard.Rejected] = []
    for piece in pieces:
        got += decoder.feed(piece)
        assert decoder.partial() <= len(idcard.PREAMBLE) + 2 + idcard.MAX_REPLY_LEN
    assert got == idcard.ReplyDecoder().feed(b"".join(pieces))
    for item in got:
        if isinstance(item, idcard.Reply):
            assert len(item.sw) == 3 and len(item.data) <= idcard.MAX_REPLY_LEN - 4
            assert idcard.ReplyDecoder().feed(idcard_reply(item.sw, item.data)) == [item]
        else:
            assert item.reason in IDCARD_REASONS, item


def idcard_seeds() -> list[bytes]:
    """The published find and select replies, whole and split, and a no-card reply."""
    found = bytes.fromhex("AAAAAA9669000800009F0000000097")
    selected = idcard_reply(b"\x00\x00\x90", bytes.fromhex("0102030405060708"))
    return [pack_chunks([found + selected]), pack_chunks([found[:3], found[3:9], selected]),
            pack_chunks([idcard_reply(b"\x00\x00\x80", b"")])]


# -- Wiegand ---------------------------------------------------------------------------------

WIEGAND_REASONS = {"too_short", "too_long", "even_parity", "odd_parity", "glitch"}
FORMAT_NAMES = sorted(wiegand.FORMATS)


def wiegand_codec(data: bytes) -> None:
    """Any bit string under any format decodes to a card that re-encodes to the same bits,
    or to a refusal with a known reason."""
    cur = Cursor(data)
    fmt = wiegand.FORMATS[FORMAT_NAMES[cur.byte() % len(FORMAT_NAMES)]]
    bits = "".join("1" if b & 1 else "0" for b in cur.take(wiegand.MAX_BITS))
    result = wiegand.decode(bits, fmt)
    if isinstance(result, wiegand.WiegandCard):
        assert wiegand.encode(fmt, result.number, result.facility) == bits
        assert result.card_id.startswith("wiegand")
    else:
        assert result.reason in WIEGAND_REASONS and result.bits == len(bits), result


def wiegand_edges(data: bytes) -> None:
    """Edges with arbitrary lines and gaps (kernel timestamps never go back): frames are
    at most ``MAX_BITS`` long, ordered in time, and each judges to a card or a refusal;
    nothing is left pending once a frame gap has passed."""
    cur = Cursor(data)
    fmt = FORMAT_NAMES[cur.byte() % len(FORMAT_NAMES)]
    assembler = wiegand.FrameAssembler()
    now = 1_000_000_000
    frames: list[wiegand.Frame] = []
    while cur.remaining:
        step = cur.byte()
        # Gaps from 0 to ~33 ms in 1 us steps, or (high bit) in 1 ms steps: both sides of
        # the 100 us glitch bound and the 25 ms frame gap.
        gap_ns = cur.u16() * (1_000_000 if step & 0x80 else 1_000) // 2
        now += gap_ns
        frames += assembler.feed(wiegand.D1 if step & 1 else wiegand.D0, now)
        if step & 0x40:
            frames += assembler.expire(now + (step & 0x3F) * 1_000_000)
    frames += assembler.expire(now + wiegand.FRAME_GAP_NS)
    assert not assembler.pending
    last_end = 0
    for frame in frames:
        assert 1 <= len(frame.bits) <= wiegand.MAX_BITS and set(frame.bits) <= {"0", "1"}
        assert last_end <= frame.start_ns <= frame.end_ns
        last_end = frame.end_ns
        result = wiegand.judge(frame, fmt)
        if isinstance(result, wiegand.Refused):
            assert result.reason in WIEGAND_REASONS, result


def wiegand_codec_seeds() -> list[bytes]:
    """One valid frame of every format."""
    out = []
    for i, name in enumerate(FORMAT_NAMES):
        fmt = wiegand.FORMATS[name]
        number = 1603 if fmt.number[1] < 32 else 0x1234567
        bits = wiegand.encode(fmt, number, 118 if fmt.facility else None)
        out.append(bytes([i]) + bytes(1 if b == "1" else 0 for b in bits))
    return out


def wiegand_edges_seeds() -> list[bytes]:
    """A 26-bit h10301 card pulsed every 2 ms, then the same card twice back to back."""
    bits = wiegand.encode("h10301", 1603, 118)
    one = b"".join(bytes([int(b)]) + (4000).to_bytes(2, "big") for b in bits)
    again = b"".join(bytes([0x80 | int(b) if i == 0 else int(b)])
                     + (60 if i == 0 else 4000).to_bytes(2, "big")
                     for i, b in enumerate(bits))
    index = FORMAT_NAMES.index("h10301")
    return [bytes([index]) + one, bytes([index]) + one + again]


def _em4100_seeds() -> list[bytes]:
    frames = [serial_reader.em4100_frame(v) for v in ("67003B51C6", "67003BA86C")]
    return [pack_chunks([frames[0] + b"\r\n" + frames[1]]),
            pack_chunks([frames[0][:5], frames[0][5:], b"\x02\x03", frames[1]])]


def _ascii_seeds() -> list[bytes]:
    lines = b"0A1B2C3D\r\n  deadbeef \rID=42;\n\n"
    return [bytes([m, 0, 128]) + pack_chunks([lines[:9], lines[9:]]) for m in (0, 0x10, 2)]


def _qr_seeds() -> list[bytes]:
    text = "P301-2027-12-31 居住证\r\n".encode()
    return [bytes([1, 0]) + pack_chunks([text]),
            bytes([0, 8]) + pack_chunks([text[:4], text[4:], b"\t\r\n"])]


# -- structure-aware inputs ------------------------------------------------------------------

HEX = st.text(alphabet="0123456789ABCDEFabcdef", min_size=10, max_size=10)


def _em4100_structured() -> st.SearchStrategy[bytes]:
    frames = HEX.map(lambda v: serial_reader.em4100_frame(v.upper()))
    return stream(st.one_of(corrupt(frames), noise(), st.just(b"\r\n")))


def _ascii_structured() -> st.SearchStrategy[bytes]:
    line = st.one_of(st.text(alphabet="0123456789ABCDEFabcdef ID=;", max_size=40),
                     st.text(max_size=20)).map(lambda t: t.encode("utf-8"))
    end = st.sampled_from([b"\r", b"\n", b"\r\n", b""])
    lines = st.tuples(line, end).map(lambda p: p[0] + p[1])
    return st.tuples(st.integers(0, 255), st.integers(0, 300), stream(lines, 8)).map(
        lambda t: bytes([t[0]]) + t[1].to_bytes(2, "big") + t[2])


def _qr_structured() -> st.SearchStrategy[bytes]:
    line = st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))
    end = st.sampled_from([b"\r", b"\n", b"\r\n"])
    lines = st.tuples(line, end).map(lambda p: p[0] + p[1])
    return st.tuples(st.integers(0, 300), stream(corrupt(lines), 8)).map(
        lambda t: t[0].to_bytes(2, "big") + t[1])


def _pn532_structured() -> st.SearchStrategy[bytes]:
    uid = st.binary(min_size=1, max_size=10)
    listed = st.one_of(
        st.builds(lambda u, tg: bytes([1, tg, 0, 0x44, 0, len(u)]) + u, uid,
                  st.integers(0, 255)),
        st.binary(max_size=20))
    response = st.one_of(
        st.builds(lambda d: chip_frame(0x4B, d), listed),
        st.builds(chip_frame, st.integers(0, 255), st.binary(max_size=300)))
    special = st.sampled_from([pn532.ACK, pn532.NACK, bytes.fromhex("0000ff01ff7f8100")])
    return stream(st.one_of(corrupt(response), special, noise()))


def _idcard_structured() -> st.SearchStrategy[bytes]:
    reply = st.builds(idcard_reply, st.binary(min_size=3, max_size=3), st.binary(max_size=70))
    return stream(st.one_of(corrupt(reply), noise(), st.just(idcard.PREAMBLE)))


def _wiegand_codec_structured() -> st.SearchStrategy[bytes]:
    @st.composite
    def frame(draw: st.DrawFn) -> bytes:
        index = draw(st.integers(0, len(FORMAT_NAMES) - 1))
        fmt = wiegand.FORMATS[FORMAT_NAMES[index]]
        number = draw(st.integers(0, (1 << fmt.number[1]) - 1))
        facility = (draw(st.integers(0, (1 << fmt.facility[1]) - 1)) if fmt.facility
                    else None)
        bits = bytearray(1 if b == "1" else 0 for b in wiegand.encode(fmt, number, facility))
        for flip in draw(st.lists(st.integers(0, len(bits) - 1), max_size=2)):
            bits[flip] ^= 1
        return bytes([draw(st.integers(0, 255))]) + bytes(bits)
    return frame()


def _wiegand_edges_structured() -> st.SearchStrategy[bytes]:
    @st.composite
    def edges(draw: st.DrawFn) -> bytes:
        out = bytearray([draw(st.integers(0, 255))])
        for _ in range(draw(st.integers(0, 3))):
            bits = wiegand.encode("h10301", draw(st.integers(0, 65535)), 118)
            pulse = draw(st.sampled_from([200, 400, 1000, 2000, 20000, 60]))  # 0.1 to 10 ms
            for i, bit in enumerate(bits):
                first = i == 0
                out += bytes([(0x80 if first else 0) | int(bit)])
                out += (60 if first else pulse).to_bytes(2, "big")
            if draw(st.booleans()):  # ringing or a crossed line
                out += bytes([draw(st.integers(0, 1))]) + draw(st.integers(0, 300)).to_bytes(
                    2, "big")
        return bytes(out)
    return edges()


TARGETS: list[Target] = [
    Target("em4100", em4100, 1024, "serial_reader.Em4100Decoder", _em4100_seeds,
           _em4100_structured),
    Target("ascii_lines", ascii_lines, 2048, "serial_reader.LineDecoder", _ascii_seeds,
           _ascii_structured),
    Target("qr", qr_lines, 2048, "qr.QrLineDecoder", _qr_seeds, _qr_structured),
    Target("pn532", pn532_frames, 2048, "pn532.FrameDecoder, parse_list_106a", pn532_seeds,
           _pn532_structured),
    Target("idcard", idcard_replies, 1024, "idcard.ReplyDecoder", idcard_seeds,
           _idcard_structured),
    Target("wiegand_codec", wiegand_codec, 256, "wiegand.decode / encode",
           wiegand_codec_seeds, _wiegand_codec_structured),
    Target("wiegand_edges", wiegand_edges, 4096, "wiegand.FrameAssembler, judge",
           wiegand_edges_seeds, _wiegand_edges_structured),
]
