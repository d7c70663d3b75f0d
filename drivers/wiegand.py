"""Wiegand card readers on two GPIO lines (D0, D1), through libgpiod v2.

Three layers, the first two pure and tested without hardware:

- the codec: ``decode(bits, format)`` checks a frame's length and parity and returns the
  card, or a refusal with a reason; ``encode`` builds parity-valid frames for tests;
- ``FrameAssembler`` turns edge events ``(line, timestamp_ns)`` into frames, by the gaps
  between edges;
- ``WiegandReader`` requests the two lines from the kernel with edge detection and feeds
  the kernel-timestamped events to the assembler. gpiod is imported inside ``open()``.

Formats (bit positions 1-based in transmission order; the layouts of RfidResearchGroup/
proxmark3 ``client/src/wiegand_formats.c``, and for 26 and 34 bits also the Wiegand
appendix of the Promag WEC200 manual; docs/hardware.md):

======  ====  =================  ===================  =====================
format  bits  fields             even parity (bit 1)  odd parity (last bit)
======  ====  =================  ===================  =====================
h10301  26    FC 2-9, CN 10-25   over 2-13            over 14-25
h10306  34    FC 2-17, CN 18-33  over 2-17            over 18-33
uid34   34    UID 2-33 (32 bit)  over 2-17            over 18-33
h10302  37    CN 2-36 (35 bit)   over 2-19            over 19-36
h10304  37    FC 2-17, CN 18-36  over 2-19            over 19-36
======  ====  =================  ===================  =====================

A frame's length alone cannot say which format it is (h10302 and h10304 are both 37 bits,
h10306 and uid34 both 34), so the reader decodes one configured format and refuses frames
of any other length.

Normalised card ids (what ``CardRead.card_id`` carries; decimal without leading zeros,
hex in upper case):

- h10301 ``wiegand26:<fc>:<cn>``, e.g. ``wiegand26:118:1603``
- h10306 ``wiegand34:<fc>:<cn>``
- uid34 ``wiegand:34:<8 hex digits of the 32 data bits>``
- h10302 ``wiegand37:<cn>``
- h10304 ``wiegand37:<fc>:<cn>``

The same card read under two formats gives two different ids: enrol cards with the format
their door's reader is configured for.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

import structlog
from pydantic import Field, model_validator

from drivers.base import CardRead, DeviceError, DriverOptions, Reader

if TYPE_CHECKING:
    from collections.abc import Callable

_log = structlog.get_logger()

D0 = 0
"""The line whose pulses are 0 bits."""
D1 = 1
"""The line whose pulses are 1 bits."""

FRAME_GAP_NS = 25_000_000
"""An idle gap this long ends a frame: 25 ms. The SIA Wiegand reader interface standard
(AC-01, as quoted in ZKTeco, TDSi and Promag manuals) allows 200 us to 20 ms between
pulses, so a gap over 20 ms can only be the end of a frame. Readers typically pulse every
1-2 ms (Nedap uPASS 1 ms, RF Solutions MFPROT 2 ms, ZKTeco's default 1 ms, per their
manuals), so a 26-bit frame takes 25-50 ms, and the next frame (another card, or a reader
repeating) comes much later than 25 ms after it."""
GLITCH_NS = 100_000
"""Two edges closer than 100 us are not two bits. SIA AC-01 allows pulses of 20-100 us
every 200 us at the fastest, so consecutive pulse starts are at least ~220 us apart. A
second edge on the same line this soon is ringing on one pulse and is ignored; an edge on
the other line this soon means both lines went low together, which a reader never does
("Data 1 and Data 0 pulses will not overlap or occur simultaneously"), so the frame is
refused."""
MAX_BITS = 128
"""Bits kept per frame; more is noise (the longest formats in use have 37-48 bits). It
bounds memory when a noisy line never falls silent for a frame gap."""
EVENT_BUFFER = 256
"""Kernel edge-event buffer of the request. The uAPI's default is 16 events per requested
line (include/uapi/linux/gpio.h), 32 for two lines: less than one 37-bit frame, so a
stall of the reader thread (GC, swap, a slow SD card) would lose bits. 256 holds 6 frames."""


# -- the codec -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WiegandFormat:
    """A frame layout. Ranges are 1-based and inclusive, as format sheets print them."""

    name: str
    bits: int
    even: tuple[int, int]
    """The bits bit 1 makes even (bit 1 itself included in the count)."""
    odd: tuple[int, int]
    """The bits the last bit makes odd (the last bit included in the count)."""
    number: tuple[int, int]
    """Card number (or UID): first bit and length."""
    facility: tuple[int, int] | None = None
    """Facility code: first bit and length; None for formats without one."""

    def card_id(self, facility: int | None, number: int) -> str:
        """The normalised card id of a decoded card (module docstring)."""
        if self.name == "uid34":
            return f"wiegand:34:{number:08X}"
        prefix = f"wiegand{self.bits}"
        return f"{prefix}:{number}" if facility is None else f"{prefix}:{facility}:{number}"


FORMATS: dict[str, WiegandFormat] = {
    "h10301": WiegandFormat("h10301", 26, even=(2, 13), odd=(14, 25), facility=(2, 8),
                            number=(10, 16)),
    "h10306": WiegandFormat("h10306", 34, even=(2, 17), odd=(18, 33), facility=(2, 16),
                            number=(18, 16)),
    "uid34": WiegandFormat("uid34", 34, even=(2, 17), odd=(18, 33), number=(2, 32)),
    # 37 bits: bit 19 counts towards both parities (the two halves overlap by one bit).
    "h10302": WiegandFormat("h10302", 37, even=(2, 19), odd=(19, 36), number=(2, 35)),
    "h10304": WiegandFormat("h10304", 37, even=(2, 19), odd=(19, 36), facility=(2, 16),
                            number=(18, 19)),
}
FormatName = Literal["h10301", "h10306", "uid34", "h10302", "h10304"]


@dataclass(frozen=True, slots=True)
class WiegandCard:
    """A frame that passed the length and parity checks."""

    format: str
    facility: int | None
    number: int
    card_id: str


@dataclass(frozen=True, slots=True)
class Refused:
    """A frame that did not: why, and how many bits it had. Never its content."""

    reason: str
    bits: int


def _format(fmt: WiegandFormat | str) -> WiegandFormat:
    if isinstance(fmt, WiegandFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown Wiegand format {fmt!r} "
                         f"(known: {', '.join(FORMATS)})") from None


def _ones(bits: str, span: tuple[int, int]) -> int:
    return bits[span[0] - 1:span[1]].count("1")


def _field(bits: str, span: tuple[int, int]) -> int:
    start, length = span
    return int(bits[start - 1:start - 1 + length], 2)


def decode(bits: str, fmt: WiegandFormat | str) -> WiegandCard | Refused:
    """Check ``bits`` (``"0"``/``"1"`` in transmission order) against ``fmt``.

    Refusal reasons: ``too_short``, ``too_long`` (another length than the format's),
    ``even_parity``, ``odd_parity``.
    """
    layout = _format(fmt)
    if set(bits) - {"0", "1"}:
        raise ValueError("bits must be a string of '0' and '1'")
    if len(bits) != layout.bits:
        return Refused("too_short" if len(bits) < layout.bits else "too_long", len(bits))
    if (int(bits[0]) + _ones(bits, layout.even)) % 2 != 0:
        return Refused("even_parity", len(bits))
    if (int(bits[-1]) + _ones(bits, layout.odd)) % 2 != 1:
        return Refused("odd_parity", len(bits))
    facility = _field(bits, layout.facility) if layout.facility else None
    number = _field(bits, layout.number)
    return WiegandCard(layout.name, facility, number, layout.card_id(facility, number))


def encode(fmt: WiegandFormat | str, number: int, facility: int | None = None) -> str:
    """The parity-valid frame of a card, as ``"0"``/``"1"`` in transmission order."""
    layout = _format(fmt)
    frame = ["0"] * layout.bits
    fields = [(layout.number, number, "number")]
    if layout.facility is None:
        if facility is not None:
            raise ValueError(f"format {layout.name} has no facility code")
    elif facility is None:
        raise ValueError(f"format {layout.name} needs a facility code")
    else:
        fields.append((layout.facility, facility, "facility"))
    for (start, length), value, what in fields:
        if not 0 <= value < 1 << length:
            raise ValueError(f"{what} {value} does not fit in {length} bits")
        frame[start - 1:start - 1 + length] = format(value, f"0{length}b")
    body = "".join(frame)
    frame[0] = "1" if _ones(body, layout.even) % 2 else "0"
    frame[-1] = "0" if _ones(body, layout.odd) % 2 else "1"
    return "".join(frame)


# -- edges to frames -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """The bits between two frame gaps, with the time of the first and last edge."""

    bits: str
    start_ns: int
    end_ns: int
    glitches: int = 0
    """Edges on both lines within ``GLITCH_NS`` of each other: the frame is unusable."""
    overflow: bool = False
    """More than ``MAX_BITS`` edges arrived; the rest were dropped."""


class FrameAssembler:
    """Falling edges on D0 and D1, with kernel timestamps, in; frames out.

    A frame ends when no edge has come for ``frame_gap_ns``: either the next edge comes
    that late (``feed`` returns the finished frame before starting a new one), or the
    caller's clock says so (``expire(now_ns)``, with ``now_ns`` on the edges' clock,
    CLOCK_MONOTONIC for gpiod, which is ``time.monotonic_ns()``).
    """

    def __init__(self, *, frame_gap_ns: int = FRAME_GAP_NS, glitch_ns: int = GLITCH_NS,
                 max_bits: int = MAX_BITS) -> None:
        self.frame_gap_ns = frame_gap_ns
        self.glitch_ns = glitch_ns
        self.max_bits = max_bits
        self._bits: list[str] = []
        self._start = 0
        self._last = 0
        self._last_line = -1
        self._glitches = 0
        self._overflow = False

    @property
    def pending(self) -> bool:
        """Whether a frame is in progress."""
        return self._last_line >= 0

    @property
    def deadline_ns(self) -> int | None:
        """When the frame in progress ends if no further edge comes; None when idle."""
        return self._last + self.frame_gap_ns if self.pending else None

    def feed(self, line: int, timestamp_ns: int) -> list[Frame]:
        """Take one edge (``D0`` or ``D1``); return the frame it shows to be finished."""
        if line not in (D0, D1):
            raise ValueError(f"line must be D0 ({D0}) or D1 ({D1}), not {line!r}")
        out: list[Frame] = []
        if self.pending:
            gap = timestamp_ns - self._last
            if gap >= self.frame_gap_ns:
                out.extend(self._finish())
            elif gap < self.glitch_ns:
                if line != self._last_line:
                    self._glitches += 1
                # Same line: ringing on the pulse already counted; the time of the last
                # edge stays that of the pulse's first edge.
                return out
        if not self.pending:
            self._start = timestamp_ns
        self._last = timestamp_ns
        self._last_line = line
        if len(self._bits) < self.max_bits:
            self._bits.append("1" if line == D1 else "0")
        else:
            self._overflow = True
        return out

    def feed_all(self, edges: Iterable[tuple[int, int]]) -> list[Frame]:
        """``feed`` for each ``(line, timestamp_ns)`` in order."""
        out: list[Frame] = []
        for line, ts in edges:
            out.extend(self.feed(line, ts))
        return out

    def expire(self, now_ns: int) -> list[Frame]:
        """The frame in progress, if ``now_ns`` is a frame gap past its last edge."""
        deadline = self.deadline_ns
        if deadline is not None and now_ns >= deadline:
            return self._finish()
        return []

    def reset(self) -> None:
        """Drop any frame in progress."""
        self._bits = []
        self._last_line = -1
        self._glitches = 0
        self._overflow = False

    def _finish(self) -> list[Frame]:
        frame = Frame("".join(self._bits), self._start, self._last, self._glitches,
                      self._overflow)
        self.reset()
        return [frame]


def judge(frame: Frame, fmt: WiegandFormat | str) -> WiegandCard | Refused:
    """Decode an assembled frame; a glitched or overflowing frame is refused first."""
    if frame.glitches:
        return Refused("glitch", len(frame.bits))
    if frame.overflow:
        return Refused("too_long", len(frame.bits))
    return decode(frame.bits, fmt)


# -- the reader ------------------------------------------------------------------------


class EdgeSource(Protocol):
    """What the reader needs of a gpiod ``LineRequest`` (and tests provide instead)."""

    def wait_edge_events(self, timeout: timedelta | float | None = None) -> bool:
        """Whether events are waiting, after at most ``timeout``."""
        ...

    def read_edge_events(self, max_events: int | None = None) -> list[Any]:
        """Waiting events: objects with ``line_offset`` and ``timestamp_ns``."""
        ...

    def release(self) -> None:
        """Give the lines back."""
        ...


class WiegandOptions(DriverOptions):
    """Options of the Wiegand reader."""

    chip: str = Field(default="/dev/gpiochip0", min_length=1)
    """The GPIO character device (``gpiodetect`` lists them; on a Pi 5 with an older
    kernel the header is ``/dev/gpiochip4``)."""
    d0: int = Field(ge=0)
    """Line offset of DATA0 (green wire), e.g. 17 for GPIO17 on a Pi (``gpioinfo``)."""
    d1: int = Field(ge=0)
    """Line offset of DATA1 (white wire)."""
    format: FormatName = "h10301"
    active_low: bool = True
    """True when a pulse pulls the pin low, as Wiegand does on the wire (direct wiring,
    or a non-inverting level shifter); False behind an inverting stage such as an
    optocoupler whose output rises during a pulse."""
    bias: Literal["as_is", "pull_up", "pull_down", "disabled"] = "pull_up"
    """The pin's internal resistor. Pull-up keeps idle lines high when the reader is
    unplugged, so the inputs do not float and produce noise edges."""

    @model_validator(mode="after")
    def _distinct_lines(self) -> WiegandOptions:
        if self.d0 == self.d1:
            raise ValueError("d0 and d1 must be different lines")
        return self


def request_edges(options: WiegandOptions, consumer: str) -> EdgeSource:
    """Request D0 and D1 from the kernel for pulse-start edge events."""
    import gpiod  # noqa: PLC0415 - optional extra, imported only where the hardware is used
    from gpiod.line import Bias, Direction, Edge  # noqa: PLC0415

    # Kernel edge flags are logical (uAPI: "rising = inactive to active"); no active_low
    # flag is requested, so they are physical here and the pulse start is chosen directly.
    settings = gpiod.LineSettings(
        direction=Direction.INPUT,
        edge_detection=Edge.FALLING if options.active_low else Edge.RISING,
        bias={"as_is": Bias.AS_IS, "pull_up": Bias.PULL_UP, "pull_down": Bias.PULL_DOWN,
              "disabled": Bias.DISABLED}[options.bias])
    return gpiod.request_lines(options.chip, consumer=consumer,
                               event_buffer_size=EVENT_BUFFER,
                               config={(options.d0, options.d1): settings})


class WiegandReader(Reader):
    """A Wiegand reader on two GPIO lines."""

    Options = WiegandOptions

    def __init__(self, name: str, options: dict[str, Any], *,
                 open_lines: Callable[[WiegandOptions, str], EdgeSource] | None = None
                 ) -> None:
        super().__init__(name, options)
        self._open_lines = open_lines or request_edges
        """How lines are requested: gpiod normally; tests pass a recorded edge source."""
        self._source: EdgeSource | None = None
        self._assembler = FrameAssembler()
        self._pending: deque[CardRead] = deque()
        self._format = FORMATS[self.options.format]

    def open(self) -> None:
        """Request the two lines; raise ``DeviceError`` naming the chip when that fails."""
        self.close()
        opts = self.options
        where = f"{opts.chip} lines {opts.d0} (D0), {opts.d1} (D1)"
        try:
            source = self._open_lines(opts, f"permitgate-{self.name}")
        except ImportError as exc:
            raise DeviceError(f"wiegand reader {self.name}: gpiod is not installed (pip "
                              f"install 'permitgate[gpio]'): {exc}") from exc
        except (OSError, ValueError) as exc:
            # FileNotFoundError: no such chip; ENODEV: not a GPIO chip; EBUSY: a line is
            # claimed already; EINVAL/ValueError: no such line offset on this chip.
            raise DeviceError(f"wiegand reader {self.name}: cannot request {where}: "
                              f"{exc}") from exc
        self._source = source
        self._assembler.reset()
        self._pending.clear()
        self.rejected = 0

    def read(self, timeout: float) -> CardRead | None:
        """The next card read, or None after about ``timeout`` seconds without one."""
        source = self._source
        if source is None:
            raise DeviceError(f"wiegand reader {self.name}: {self.options.chip} is not open")
        if self._pending:
            return self._pending.popleft()
        deadline = time.monotonic_ns() + int(max(timeout, 0.0) * 1e9)
        while True:
            # Wait for edges until the caller's deadline, or until the frame in progress
            # would end if it is sooner; at least one non-blocking pass even for timeout 0.
            now = time.monotonic_ns()
            frame_end = self._assembler.deadline_ns
            until = deadline if frame_end is None else min(deadline, frame_end)
            self._consume(source, max(until - now, 0))
            self._judge(self._assembler.expire(time.monotonic_ns()))
            if self._pending:
                return self._pending.popleft()
            if time.monotonic_ns() >= deadline:
                # A frame still in progress is finished by the next call, which the reader
                # loop makes at once.
                return None

    def _consume(self, source: EdgeSource, wait_ns: int) -> None:
        try:
            if not source.wait_edge_events(timedelta(microseconds=wait_ns // 1000)):
                return
            events = source.read_edge_events()
        except OSError as exc:
            self.close()
            raise DeviceError(f"wiegand reader {self.name}: {self.options.chip} failed: "
                              f"{exc}") from exc
        d0 = self.options.d0
        self._judge(self._assembler.feed_all(
            (D0 if ev.line_offset == d0 else D1, ev.timestamp_ns) for ev in events))

    def _judge(self, frames: list[Frame]) -> None:
        for frame in frames:
            result = judge(frame, self._format)
            if isinstance(result, WiegandCard):
                self._pending.append(CardRead(result.card_id))
            else:
                self.rejected += 1
                _log.warning("reader_frame_rejected", reader=self.name,
                             reason=result.reason, length=result.bits)

    def close(self) -> None:
        """Release the lines; safe to call twice or after a failed open."""
        source, self._source = self._source, None
        if source is None:
            return
        try:
            source.release()
        except OSError as exc:
            _log.warning("reader_close_failed", reader=self.name, error=str(exc))
