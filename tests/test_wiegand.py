"""The Wiegand codec, the edge-to-frame assembler and the gpiod reader around them.

GPIO cannot be simulated on this kernel (no GPIOLIB, no gpio-sim: docs/hardware.md), so:

- the codec is checked against published Proxmark3 outputs (its own help-text vector,
  ``lf hid read`` output quoted in a KringleCon 2020 write-up, and ``lf hid decode`` /
  ``lf hid encode`` output for 37-bit cards quoted in a public cheat-sheet), against a
  parity check written here from the format sheets, and by hypothesis round trips;
- the assembler is fed edge lists built the way the kernel reports them, ``(line,
  timestamp_ns)`` on CLOCK_MONOTONIC, at the SIA AC-01 timing limits and typical reader
  timings, with ringing, crossed-line glitches, noise, short and back-to-back frames;
- ``WiegandReader`` runs with the real gpiod for option checks and a missing chip, and
  with a recorded edge source (real ``gpiod.EdgeEvent`` objects) for its read loop.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import gpiod
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

from drivers.base import DeviceError
from drivers.registry import DriverError, check_options, create
from drivers.wiegand import (
    D0,
    D1,
    FORMATS,
    FRAME_GAP_NS,
    MAX_BITS,
    EdgeSource,
    Frame,
    FrameAssembler,
    Refused,
    WiegandCard,
    WiegandOptions,
    WiegandReader,
    decode,
    encode,
    judge,
)
from tests.conftest import wait_for

PROPERTY = settings(deadline=None)
"""No per-example deadline: hypothesis must not turn a slow CI machine into a failure."""
MS = 1_000_000
US = 1_000
T0 = 10_000 * MS
"""An arbitrary CLOCK_MONOTONIC time for recorded edges to start at."""
READ_TIMEOUT = 5.0
"""Generous: a recorded frame completes 25 ms after its last edge; this bounds a failure."""


def raw_bits(raw_hex: str, length: int) -> str:
    """The low ``length`` bits of a Proxmark raw HID value, in transmission order."""
    return format(int(raw_hex, 16) & ((1 << length) - 1), f"0{length}b")


def sheet_parity_ok(bits: str, even: tuple[int, int], odd: tuple[int, int]) -> bool:
    """Parity as the format sheets state it, written independently of the driver: bit 1
    plus the even range has an even count of ones, the odd range plus the last bit odd."""
    ones = [i + 1 for i, b in enumerate(bits) if b == "1"]
    even_count = sum(1 for i in ones if i == 1 or even[0] <= i <= even[1])
    odd_count = sum(1 for i in ones if i == len(bits) or odd[0] <= i <= odd[1])
    return even_count % 2 == 0 and odd_count % 2 == 1


def edges(bits: str, start: int = T0, interval: int = 2 * MS) -> list[tuple[int, int]]:
    """The falling edges a reader makes for ``bits``: one pulse per bit, every
    ``interval`` ns, on D1 for a 1 and on D0 for a 0."""
    return [(D1 if b == "1" else D0, start + i * interval) for i, b in enumerate(bits)]


# --- codec: published vectors ------------------------------------------------------------

PROXMARK_26 = [
    # Proxmark3 `lf hid sim` help text: "lf hid sim -r 2006ec0c86 -> HID 10301 26 bit".
    ("2006ec0c86", 118, 1603),
    # `lf hid read` output quoted in a KringleCon 2020 write-up:
    # "TAG ID: 2006e22f13 (6025) - Format Len: 26 bit - FC: 113 - Card: 6025".
    ("2006e22f13", 113, 6025),
    ("2006e22ee1", 113, 6000),
]


@pytest.mark.parametrize(("raw", "fc", "cn"), PROXMARK_26)
def test_proxmark_26_bit_vectors_decode(raw: str, fc: int, cn: int) -> None:
    """Proxmark3's H10301 raw values decode to its facility code and card number."""
    got = decode(raw_bits(raw, 26), "h10301")
    assert got == WiegandCard("h10301", fc, cn, f"wiegand26:{fc}:{cn}")


@pytest.mark.parametrize(("raw", "fc", "cn"), PROXMARK_26)
def test_encode_reproduces_proxmark_26_bit_frames(raw: str, fc: int, cn: int) -> None:
    """encode() builds exactly the 26 frame bits Proxmark3 printed for the card."""
    assert encode("h10301", cn, fc) == raw_bits(raw, 26)


def test_proxmark_help_vector_is_fc_118_cn_1603() -> None:
    """The vector the hardware notes quote, 2006ec0c86, is FC 118 / CN 1603 with valid
    parity by the sheet's rule as well."""
    bits = raw_bits("2006ec0c86", 26)
    assert bits == "10111011000000110010000110"
    assert sheet_parity_ok(bits, (2, 13), (14, 25))
    card = decode(bits, "h10301")
    assert isinstance(card, WiegandCard)
    assert card.card_id == "wiegand26:118:1603"


# `lf hid decode` / `lf hid encode` output of an older Proxmark3 client, quoted in a public
# cheat-sheet: 10001fc656 is H10302 CN 1041195 and H10304 FC 1 / CN 516907, both with
# valid parity; `encode H10304 f 49153 c 516907` gave 1c001fc656, `encode H10302 c 220577`
# 100006bb43, and `decode 1c0006bb43` H10304 FC 49152 / CN 220577. (That client also
# printed "H10302 220577" for 1c0006bb43, dropping the card number's top bits; the 35-bit
# value is 25770024353, which the layout and this decoder give.)
PROXMARK_37 = [
    ("10001fc656", "h10302", None, 1041195),
    ("10001fc656", "h10304", 1, 516907),
    ("1c001fc656", "h10304", 49153, 516907),
    ("100006bb43", "h10302", None, 220577),
    ("1c0006bb43", "h10304", 49152, 220577),
]


@pytest.mark.parametrize(("raw", "fmt", "fc", "cn"), PROXMARK_37)
def test_proxmark_37_bit_vectors(raw: str, fmt: str, fc: int | None, cn: int) -> None:
    """Proxmark3's 37-bit raw values decode, and encode back, under the configured format."""
    bits = raw_bits(raw, 37)
    card = decode(bits, fmt)
    assert isinstance(card, WiegandCard)
    assert (card.facility, card.number) == (fc, cn)
    assert encode(fmt, cn, fc) == bits
    assert sheet_parity_ok(bits, (2, 19), (19, 36))


def test_a_37_bit_frame_means_what_the_configuration_says() -> None:
    """The same 37 bits are a different card under H10302 and H10304: the format is set,
    never guessed from the frame."""
    bits = raw_bits("10001fc656", 37)
    assert [c.card_id for c in (decode(bits, "h10302"), decode(bits, "h10304"))
            if isinstance(c, WiegandCard)] == ["wiegand37:1041195", "wiegand37:1:516907"]


def test_34_bit_frame_as_h10306_and_as_uid34() -> None:
    """34 bits carry FC 16 / CN 16 (H10306) or a 32-bit UID (uid34), by configuration."""
    bits = encode("uid34", 0xDEADBEEF)
    assert sheet_parity_ok(bits, (2, 17), (18, 33))
    assert bits[1:33] == format(0xDEADBEEF, "032b")
    assert decode(bits, "uid34") == WiegandCard("uid34", None, 0xDEADBEEF,
                                                "wiegand:34:DEADBEEF")
    assert decode(bits, "h10306") == WiegandCard("h10306", 0xDEAD, 0xBEEF,
                                                 "wiegand34:57005:48879")
    assert encode("h10306", 0xBEEF, 0xDEAD) == bits


def test_uid34_id_keeps_leading_zeros() -> None:
    """A uid34 id always has 8 hex digits, so small UIDs compare by their full width."""
    card = decode(encode("uid34", 0x1F), "uid34")
    assert isinstance(card, WiegandCard)
    assert card.card_id == "wiegand:34:0000001F"


# --- codec: refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_single_bit_flip_is_refused(fmt: str) -> None:
    """Flipping any one bit of a valid frame breaks a parity, for every format."""
    layout = FORMATS[fmt]
    bits = encode(fmt, 12345, 77 if layout.facility else None)
    for i in range(len(bits)):
        flipped = bits[:i] + ("1" if bits[i] == "0" else "0") + bits[i + 1:]
        got = decode(flipped, fmt)
        assert isinstance(got, Refused), i
        assert got.reason in {"even_parity", "odd_parity"}


def test_parity_refusal_names_the_half() -> None:
    """A flip in the first half fails even parity, one in the second half odd parity."""
    bits = raw_bits("2006ec0c86", 26)
    def flip(i: int) -> str:
        return bits[:i] + ("1" if bits[i] == "0" else "0") + bits[i + 1:]
    assert decode(flip(0), "h10301") == Refused("even_parity", 26)
    assert decode(flip(5), "h10301") == Refused("even_parity", 26)
    assert decode(flip(20), "h10301") == Refused("odd_parity", 26)
    assert decode(flip(25), "h10301") == Refused("odd_parity", 26)


@pytest.mark.parametrize(("length", "reason"), [(1, "too_short"), (25, "too_short"),
                                                (27, "too_long"), (34, "too_long")])
def test_other_lengths_are_refused(length: int, reason: str) -> None:
    """A frame of another length than the configured format's is refused by length."""
    assert decode("1" * length, "h10301") == Refused(reason, length)


def test_encode_refuses_values_that_do_not_fit() -> None:
    """encode() refuses numbers too wide and facility codes the format lacks or needs."""
    with pytest.raises(ValueError, match="does not fit"):
        encode("h10301", 1 << 16, 1)
    with pytest.raises(ValueError, match="does not fit"):
        encode("h10301", 1, 256)
    with pytest.raises(ValueError, match="no facility"):
        encode("h10302", 1, 1)
    with pytest.raises(ValueError, match="needs a facility"):
        encode("h10304", 1)
    with pytest.raises(ValueError, match="unknown Wiegand format"):
        encode("h99999", 1)


def test_decode_refuses_non_binary_input() -> None:
    """decode() takes only strings of 0 and 1."""
    with pytest.raises(ValueError, match="'0' and '1'"):
        decode("01x" * 9, "h10301")


@PROPERTY
@given(data=st.data(), fmt=st.sampled_from(sorted(FORMATS)))
def test_round_trip_and_sheet_parity(data: st.DataObject, fmt: str) -> None:
    """For any card in any format, encode gives sheet-valid parity and decode gives the
    card back."""
    layout = FORMATS[fmt]
    number = data.draw(st.integers(0, (1 << layout.number[1]) - 1))
    facility = (data.draw(st.integers(0, (1 << layout.facility[1]) - 1))
                if layout.facility else None)
    bits = encode(fmt, number, facility)
    assert len(bits) == layout.bits
    assert sheet_parity_ok(bits, layout.even, layout.odd)
    card = decode(bits, fmt)
    assert isinstance(card, WiegandCard)
    assert (card.facility, card.number) == (facility, number)


@PROPERTY
@given(bits=st.text(alphabet="01", min_size=0, max_size=40),
       fmt=st.sampled_from(sorted(FORMATS)))
def test_decode_agrees_with_the_sheet_on_any_bits(bits: str, fmt: str) -> None:
    """On any bit string, decode accepts exactly the frames of the right length whose
    parity the sheet's rule accepts."""
    layout = FORMATS[fmt]
    expected = len(bits) == layout.bits and sheet_parity_ok(bits, layout.even, layout.odd)
    assert isinstance(decode(bits, fmt), WiegandCard) == expected


# --- assembler ---------------------------------------------------------------------------

W26 = raw_bits("2006ec0c86", 26)


def assemble(edge_list: Sequence[tuple[int, int]]) -> list[Frame]:
    """All frames of ``edge_list``, the last one closed by the clock a gap later."""
    asm = FrameAssembler()
    frames = asm.feed_all(edge_list)
    return frames + asm.expire(edge_list[-1][1] + FRAME_GAP_NS) if edge_list else frames


@pytest.mark.parametrize("interval", [220 * US, 1 * MS, 2 * MS, 20 * MS],
                         ids=["sia-min-220us", "1ms", "2ms", "sia-max-20ms"])
def test_frame_assembles_at_reader_timings(interval: int) -> None:
    """A 26-bit frame comes out whole at the SIA limits and at typical 1-2 ms intervals."""
    frames = assemble(edges(W26, interval=interval))
    assert [f.bits for f in frames] == [W26]
    assert frames[0].start_ns == T0
    assert frames[0].end_ns == T0 + 25 * interval


def test_frame_ends_only_after_the_gap() -> None:
    """A frame stays open until 25 ms after its last edge, by the caller's clock."""
    asm = FrameAssembler()
    recorded = edges(W26)
    assert asm.feed_all(recorded) == []
    last = recorded[-1][1]
    assert asm.deadline_ns == last + FRAME_GAP_NS
    assert asm.expire(last + FRAME_GAP_NS - 1) == []
    assert [f.bits for f in asm.expire(last + FRAME_GAP_NS)] == [W26]
    assert asm.deadline_ns is None
    assert not asm.pending


def test_jittered_edges_still_assemble() -> None:
    """Irregular intervals between 0.3 and 19 ms (a slow microcontroller) are one frame."""
    jitter = [300 * US, 19 * MS, 1 * MS, 5 * MS, 700 * US]
    recorded, ts = [], T0
    for i, bit in enumerate(W26):
        recorded.append((D1 if bit == "1" else D0, ts))
        ts += jitter[i % len(jitter)]
    assert [f.bits for f in assemble(recorded)] == [W26]


def test_two_frames_back_to_back() -> None:
    """Two cards 30 ms apart are two frames; the second edge burst closes the first."""
    other = encode("h10301", 6025, 113)
    first = edges(W26)
    second = edges(other, start=first[-1][1] + 30 * MS)
    asm = FrameAssembler()
    closed_by_second = asm.feed_all(first + second[:1])
    assert [f.bits for f in closed_by_second] == [W26]
    rest = asm.feed_all(second[1:]) + asm.expire(second[-1][1] + FRAME_GAP_NS)
    assert [f.bits for f in rest] == [other]
    assert [judge(f, "h10301") for f in closed_by_second + rest] == [
        decode(W26, "h10301"), decode(other, "h10301")]


def test_frames_closer_than_the_gap_merge_and_are_refused() -> None:
    """Frames only 10 ms apart (out of spec) merge into one 52-bit frame, refused as too
    long rather than misread."""
    first = edges(W26)
    second = edges(W26, start=first[-1][1] + 10 * MS)
    frames = assemble(first + second)
    assert [len(f.bits) for f in frames] == [52]
    assert judge(frames[0], "h10301") == Refused("too_long", 52)


def test_too_short_frame_is_refused() -> None:
    """A frame cut off after 20 bits (card pulled away, reader reset) is refused."""
    frames = assemble(edges(W26[:20]))
    assert [judge(f, "h10301") for f in frames] == [Refused("too_short", 20)]


def test_noise_spike_before_a_frame_is_a_separate_refused_frame() -> None:
    """A lone edge 100 ms before a card (switching noise) is a 1-bit frame of its own,
    refused, and the card after it still decodes."""
    recorded = [(D1, T0 - 100 * MS), *edges(W26)]
    frames = assemble(recorded)
    assert [judge(f, "h10301") for f in frames] == [
        Refused("too_short", 1), decode(W26, "h10301")]


def test_ringing_on_one_line_is_ignored() -> None:
    """Extra edges on the same line within 100 us of a pulse (ringing on a long cable)
    add no bits."""
    recorded = edges(W26)
    ringing = []
    for line, ts in recorded:
        ringing += [(line, ts), (line, ts + 3 * US), (line, ts + 40 * US)]
    frames = assemble(ringing)
    assert [f.bits for f in frames] == [W26]
    assert frames[0].glitches == 0


def test_edges_on_both_lines_at_once_refuse_the_frame() -> None:
    """A D1 edge 5 us after a D0 edge (both lines low together: interference, a shorted
    pair) marks the frame as glitched and it is refused, not guessed."""
    recorded = edges(W26)
    line, ts = recorded[10]
    glitched = [*recorded[:11], (D1 if line == D0 else D0, ts + 5 * US), *recorded[11:]]
    frames = assemble(glitched)
    assert [f.bits for f in frames] == [W26]
    assert frames[0].glitches == 1
    assert judge(frames[0], "h10301") == Refused("glitch", 26)


def test_endless_noise_is_capped() -> None:
    """Edges that never pause for a frame gap keep at most MAX_BITS bits and are refused."""
    frames = assemble(edges("01" * MAX_BITS, interval=1 * MS))
    assert len(frames) == 1
    assert len(frames[0].bits) == MAX_BITS
    assert frames[0].overflow
    assert judge(frames[0], "h10301") == Refused("too_long", MAX_BITS)


def test_assembler_refuses_unknown_lines() -> None:
    """Only D0 (0) and D1 (1) are lines; the reader maps GPIO offsets to them."""
    with pytest.raises(ValueError, match="D0"):
        FrameAssembler().feed(17, T0)


@st.composite
def _frame_bits(draw: st.DrawFn) -> str:
    """A valid frame of any format, for any card number."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    number = draw(st.integers(0, (1 << FORMATS[fmt].number[1]) - 1))
    return encode(fmt, number, 5 if FORMATS[fmt].facility else None)


@PROPERTY
@given(frames=st.lists(_frame_bits(), min_size=1, max_size=5),
       interval=st.integers(220 * US, 20 * MS),
       gap=st.integers(FRAME_GAP_NS, 2_000 * MS),
       ringing=st.booleans(),
       cut=st.integers(min_value=0))
def test_any_spec_stream_yields_exactly_its_frames(
        frames: list[str], interval: int, gap: int, ringing: bool, cut: int) -> None:
    """Frames at any in-spec pulse interval, separated by any gap of at least 25 ms, with
    or without ringing, fed in two chunks anywhere, come out exactly, in order."""
    recorded: list[tuple[int, int]] = []
    ts = T0
    for bits in frames:
        for line, t in edges(bits, start=ts, interval=interval):
            recorded.append((line, t))
            if ringing:
                recorded.append((line, t + 2 * US))
        ts = recorded[-1][1] + gap
    asm = FrameAssembler()
    split = cut % (len(recorded) + 1)
    out = asm.feed_all(recorded[:split]) + asm.feed_all(recorded[split:])
    out += asm.expire(recorded[-1][1] + FRAME_GAP_NS)
    assert [f.bits for f in out] == frames
    assert all(f.glitches == 0 and not f.overflow for f in out)


# --- the reader ----------------------------------------------------------------------------


def test_options_need_two_distinct_lines() -> None:
    """d0 and d1 are required and must differ."""
    with pytest.raises(ValidationError) as info:
        WiegandOptions.model_validate({"d0": 17})
    assert [e["loc"] for e in info.value.errors()] == [("d1",)]
    with pytest.raises(ValidationError, match="different lines"):
        WiegandOptions.model_validate({"d0": 17, "d1": 17})


@pytest.mark.parametrize(("options", "key"), [
    ({"d0": "17", "d1": 18}, "d0"),
    ({"d0": 17, "d1": -1}, "d1"),
    ({"d0": 17, "d1": 18, "format": "w26"}, "format"),
    ({"d0": 17, "d1": 18, "active_low": "yes"}, "active_low"),
    ({"d0": 17, "d1": 18, "bias": "up"}, "bias"),
    ({"d0": 17, "d1": 18, "chip": ""}, "chip"),
    ({"d0": 17, "d1": 18, "debounce": 5}, "debounce"),
])
def test_registry_check_names_the_bad_option(options: dict[str, Any], key: str) -> None:
    """Config checking through the registry names a wrong-typed, out-of-range or unknown
    option of a wiegand reader."""
    with pytest.raises(DriverError, match=rf"readers\[2\]\.options\.{key}"):
        check_options("reader", "wiegand", options, "readers[2]")


def test_registry_creates_a_wiegand_reader() -> None:
    """The registry knows the driver as "wiegand"; creating it opens nothing."""
    reader = create("reader", "wiegand", "gate", {"d0": 17, "d1": 18, "format": "h10306"})
    assert isinstance(reader, WiegandReader)
    assert reader.options.format == "h10306"


def test_open_missing_chip_raises_device_error_naming_it() -> None:
    """With the real gpiod, a chip that does not exist is a DeviceError naming the chip
    and the lines; close() is then safe."""
    reader = WiegandReader("gate", {"chip": "/dev/gpiochip7", "d0": 17, "d1": 18})
    with pytest.raises(DeviceError, match=r"/dev/gpiochip7 lines 17 \(D0\), 18 \(D1\)"):
        reader.open()
    reader.close()
    reader.close()


def test_open_a_non_gpio_device_raises_device_error() -> None:
    """A path that exists but is no GPIO chip (here /dev/null) is a DeviceError too."""
    reader = WiegandReader("gate", {"chip": "/dev/null", "d0": 17, "d1": 18})
    with pytest.raises(DeviceError, match="/dev/null"):
        reader.open()


def test_read_before_open_raises_device_error() -> None:
    """Reading a reader that was never opened is a DeviceError naming the chip."""
    reader = WiegandReader("gate", {"d0": 17, "d1": 18})
    with pytest.raises(DeviceError, match="/dev/gpiochip0 is not open"):
        reader.read(0)


class RecordedLines:
    """Stands in for a gpiod LineRequest: hands out real ``gpiod.EdgeEvent`` objects a
    test queued, with the kernel's timestamps, and waits like ``wait_edge_events``."""

    def __init__(self, d0: int, d1: int) -> None:
        self.offsets = {D0: d0, D1: d1}
        self.events: deque[gpiod.EdgeEvent] = deque()
        self.cond = threading.Condition()
        self.released = 0
        self.fail: OSError | None = None
        self.idle_waits = 0
        """Calls of ``wait_edge_events`` that found nothing queued: the reader waiting."""
        self.seqno = 0
        self.last_ts = 0

    def present(self, bits: str, interval: int = 2 * MS) -> None:
        """Queue the edges of ``bits`` as if the reader had just sent them: the kernel
        has timestamped them in the recent past, and at least 30 ms after the frame
        queued before (a reader never sends two frames closer than that)."""
        start = max(time.monotonic_ns() - len(bits) * interval, self.last_ts + 30 * MS)
        with self.cond:
            for line, ts in edges(bits, start=start, interval=interval):
                self.last_ts = ts
                self.seqno += 1
                self.events.append(gpiod.EdgeEvent(
                    gpiod.EdgeEvent.Type.FALLING_EDGE.value, ts, self.offsets[line],
                    self.seqno, self.seqno))
            self.cond.notify_all()

    def wait_edge_events(self, timeout: timedelta | float | None = None) -> bool:
        """True when events are queued, after at most ``timeout``."""
        assert isinstance(timeout, timedelta)
        with self.cond:
            if self.fail is not None:
                raise self.fail
            if not self.events:
                self.idle_waits += 1
            return self.cond.wait_for(lambda: bool(self.events), timeout.total_seconds())

    def read_edge_events(self, max_events: int | None = None) -> list[Any]:
        """Everything queued."""
        with self.cond:
            out = list(self.events)
            self.events.clear()
            return out

    def release(self) -> None:
        """Count releases."""
        self.released += 1


@pytest.fixture
def lines() -> RecordedLines:
    """Recorded D0/D1 lines at offsets 17 and 18."""
    return RecordedLines(17, 18)


@pytest.fixture
def reader(lines: RecordedLines) -> Iterator[WiegandReader]:
    """An opened H10301 reader on the recorded lines."""
    def open_lines(options: WiegandOptions, consumer: str) -> EdgeSource:
        assert (options.d0, options.d1, consumer) == (17, 18, "permitgate-gate")
        return lines

    reader = WiegandReader("gate", {"d0": 17, "d1": 18}, open_lines=open_lines)
    reader.open()
    try:
        yield reader
    finally:
        reader.close()


def test_reader_reads_a_presented_card(reader: WiegandReader, lines: RecordedLines) -> None:
    """Edges on the lines become one card read with the normalised id, then idle."""
    lines.present(W26)
    got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == "wiegand26:118:1603"
    assert reader.read(0.05) is None
    assert reader.rejected == 0


def test_reader_reads_cards_in_order(reader: WiegandReader, lines: RecordedLines) -> None:
    """Cards presented one after another come back in order, repeats included."""
    other = encode("h10301", 6025, 113)
    for bits in (W26, other, other):
        lines.present(bits)
    got = [reader.read(READ_TIMEOUT) for _ in range(3)]
    assert [r.card_id if r else None for r in got] == [
        "wiegand26:118:1603", "wiegand26:113:6025", "wiegand26:113:6025"]


def test_reader_waits_for_the_frame_gap_within_one_read(
        reader: WiegandReader, lines: RecordedLines) -> None:
    """A frame whose edges arrive during read() completes inside that same call."""
    def present_once_waiting() -> None:
        wait_for(lambda: lines.idle_waits > 0, "read() to wait for edges")
        lines.present(W26)

    presenter = threading.Thread(target=present_once_waiting)
    presenter.start()
    try:
        got = reader.read(READ_TIMEOUT)
    finally:
        presenter.join()
    assert got is not None
    assert got.card_id == "wiegand26:118:1603"


def test_reader_refuses_bad_frames_without_logging_bits(
        reader: WiegandReader, lines: RecordedLines) -> None:
    """A parity failure and a short frame are counted and logged by reason and length
    only; the next good card still reads."""
    bad = W26[:5] + ("1" if W26[5] == "0" else "0") + W26[6:]
    with capture_logs() as logs:
        lines.present(bad)
        lines.present(W26[:8])
        lines.present(W26)
        got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == "wiegand26:118:1603"
    assert reader.rejected == 2
    assert logs == [
        {"event": "reader_frame_rejected", "log_level": "warning", "reader": "gate",
         "reason": "even_parity", "length": 26},
        {"event": "reader_frame_rejected", "log_level": "warning", "reader": "gate",
         "reason": "too_short", "length": 8}]


def test_idle_read_returns_none_also_for_zero_timeout(reader: WiegandReader) -> None:
    """With no edges, read(timeout) returns None, also for a zero timeout."""
    assert reader.read(0.05) is None
    assert reader.read(0) is None


def test_line_failure_raises_device_error_and_releases(
        reader: WiegandReader, lines: RecordedLines) -> None:
    """An OSError from the kernel request is a DeviceError naming the chip; the lines are
    released and a further read says the reader is not open."""
    lines.fail = OSError(5, "Input/output error")
    with pytest.raises(DeviceError, match="/dev/gpiochip0 failed"):
        reader.read(0.05)
    assert lines.released == 1
    with pytest.raises(DeviceError, match="not open"):
        reader.read(0)


def test_reopen_drops_a_partial_frame(reader: WiegandReader, lines: RecordedLines) -> None:
    """close() then open() starts afresh: no rejections, no half frame carried over."""
    lines.present(W26[:3])
    lines.present(W26[:10])
    assert reader.read(0) is None
    reader.close()
    reader.open()
    assert reader.rejected == 0
    lines.present(W26)
    got = reader.read(READ_TIMEOUT)
    assert got is not None
    assert got.card_id == "wiegand26:118:1603"
    assert lines.released == 1
