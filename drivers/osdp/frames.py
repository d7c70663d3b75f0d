"""OSDP frames on the wire (SIA OSDP 2.2, section 5): check characters, parsing, and
cutting a received byte stream into whole frames. Pure code, no libosdp.

A frame is ``SOM(0x53) ADDR LEN_LSB LEN_MSB CTRL [SCB] CODE DATA [MAC] CHECK``: LEN counts
every byte from SOM to the end of CHECK; CHECK is a CRC-16 (2 bytes, little-endian) when
bit 2 of CTRL is set, else a one-byte checksum; ADDR has bit 7 set in replies. A sender
may put the mark byte 0xFF before SOM (section 5.7: the line idles marking).

Why frames are assembled before libosdp sees them (``FrameAssembler``)
    libosdp 3.2.9 as published on PyPI is built with ``OPT_OSDP_RX_ZERO_COPY`` (its
    setup.py), and then calls ``osdp_phy_release_packet()`` after every receive pass
    (``osdp_cp.c`` cp_phy_state_update, REPLY_WAIT; ``osdp_pd.c`` osdp_pd_update). That
    function zeroes ``packet_len`` and ``packet_buf_len`` even for a stream channel, so
    the part of a frame read in one ``refresh()`` is thrown away, and the rest, without
    its SOM, is skipped as noise. A reply that does not arrive within one 20 ms refresh
    is therefore never accepted. At 9600 baud (1.04 ms a byte) the 20-byte ``osdp_PDID``
    takes 21 ms and the 43-byte ``osdp_CCRYPT`` 45 ms, so a reader never came online;
    at 19200 the handshake failed at ``osdp_CCRYPT``. Evidence: tests/line_relay.py at
    9600 baud showed the PDID reply read as ``53`` and then its other 19 bytes one
    refresh later, and libosdp logged "No response in 200ms; probing" for it. Handed
    whole frames, libosdp parses each in the pass that receives it.
"""

from __future__ import annotations

from dataclasses import dataclass

SOM = 0x53
MARK = 0xFF
MIN_PACKET = 7
"""SOM, ADDR, LEN (2), CTRL, CODE and a one-byte checksum."""
MAX_PACKET = 1440
"""The largest packet SIA OSDP 2.2 allows (section 5.6)."""
LIBOSDP_MAX_PACKET = 256
"""libosdp 3.2.9's ``OSDP_PACKET_BUF_SIZE`` (osdp_config.h; the PyPI build keeps the
default): ``phy_validate_header`` refuses any longer packet, mark byte included."""
BITS_PER_CHAR = 10
"""8N1: start bit, 8 data bits, stop bit."""

SPEC_INTERCHAR_S = 0.020
"""SIA OSDP 2.2, section 5.7: "The nominal value of the inter-character timeout shall be
20 milliseconds"."""
ADAPTER_LATENCY_S = 0.016
"""An FTDI USB-RS485 adapter holds a short packet up to its latency timer, 16 ms by
default, before sending it to the host."""
ADAPTER_FIFO_CHARS = 16
"""A UART with a 16-byte FIFO (16550-style) or a USB adapter hands the host up to 16
characters at once, so the host sees a gap of that many character times."""

# Command and reply codes (SIA OSDP 2.2, tables 5 and 6).
CMD_POLL, CMD_ID, CMD_CAP, CMD_LSTAT = 0x60, 0x61, 0x62, 0x64
CMD_KEYSET, CMD_CHLNG, CMD_SCRYPT = 0x75, 0x76, 0x77
REPLY_NAK, REPLY_PDID, REPLY_PDCAP, REPLY_CCRYPT = 0x41, 0x45, 0x46, 0x76
CAP_COMMUNICATION_SECURITY = 9
"""PDCAP function code 9 (table 27); bit 0 of its compliance level: AES-128 SC."""


def interchar_gap_s(baudrate: int, poll_s: float) -> float:
    """How long the host may see no byte inside a frame before it drops the partial frame:
    OSDP's nominal 20 ms, plus what lies between the wire and a read that polls every
    ``poll_s``: an adapter FIFO's worth of characters (16.7 ms at 9600 baud, 1.4 ms at
    115200) and a USB latency timer (16 ms). 73 ms at 9600 and 57 ms at 115200 with a
    20 ms poll: under libosdp's 200 ms reply timeout, over any gap of a working line."""
    return (SPEC_INTERCHAR_S + ADAPTER_FIFO_CHARS * BITS_PER_CHAR / baudrate
            + ADAPTER_LATENCY_S + poll_s)


def crc16(data: bytes) -> int:
    """OSDP's CRC-16 (poly 0x1021, init 0x1D0F, not reflected); sent little-endian.
    SIA OSDP Annex E: ``53 00 09 00 04 61 00`` gives 0x66C0 (``C0 66`` on the wire)."""
    crc = 0x1D0F
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        crc &= 0xFFFF
    return crc


def check_ok(packet: bytes) -> bool:
    """Whether the CRC or checksum at the end of ``packet`` (SOM to its end) is right."""
    if packet[4] & 0x04:
        return crc16(packet[:-2]) == packet[-2] | packet[-1] << 8
    return (sum(packet[:-1]) + packet[-1]) & 0xFF == 0


@dataclass(frozen=True, slots=True)
class Frame:
    """One OSDP packet as seen on the wire (data still encrypted under SCS_17/18)."""

    address: int
    reply: bool
    code: int
    scb_type: int | None
    """Security block type (0x11..0x18), None for a plain packet."""
    scb_data: bytes
    data: bytes

    @property
    def readable(self) -> bool:
        """Whether ``data`` is plain text (no SCB, or SCS_11..16), not encrypted."""
        return self.scb_type is None or self.scb_type < 0x17


def parse_frame(packet: bytes) -> Frame | None:
    """``packet`` (SOM up to its CRC or checksum) as a Frame, or None if it is invalid."""
    if len(packet) < MIN_PACKET or packet[0] != SOM:
        return None
    if len(packet) != packet[2] | packet[3] << 8:
        return None
    if not check_ok(packet):
        return None
    body = packet[:-2] if packet[4] & 0x04 else packet[:-1]
    pos, scb_type, scb_data = 5, None, b""
    if packet[4] & 0x08:
        # An SCB flagged without a byte for its length (found by fuzzing) is as invalid
        # as one whose length runs past the body.
        scb_len = body[5] if len(body) > 5 else 0
        if scb_len < 2 or 5 + scb_len >= len(body):
            return None
        scb_type, scb_data = body[6], bytes(body[7:5 + scb_len])
        pos = 5 + scb_len
    if pos >= len(body):
        return None
    mac = 4 if scb_type is not None and 0x15 <= scb_type <= 0x18 else 0
    return Frame(packet[1] & 0x7F, bool(packet[1] & 0x80), body[pos], scb_type, scb_data,
                 bytes(body[pos + 1:len(body) - mac]))


def offers_secure_channel(pdcap: Frame) -> bool:
    """Whether an ``osdp_PDCAP`` reply lists Communication Security with AES-128."""
    data = pdcap.data
    return any(data[i] == CAP_COMMUNICATION_SECURITY and data[i + 1] & 0x01
               for i in range(0, len(data) - 2, 3))


class FrameScanner:
    """Finds OSDP packets in a byte stream: skips the 0xFF mark and any noise, and
    resynchronises one byte on after a false start of packet."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Every packet completed by ``data``."""
        self._buf += data
        out: list[Frame] = []
        while True:
            start = self._buf.find(SOM)
            if start < 0:
                self._buf.clear()
                return out
            del self._buf[:start]
            if len(self._buf) < 5:
                return out
            length = self._buf[2] | self._buf[3] << 8
            if not MIN_PACKET <= length <= MAX_PACKET:
                del self._buf[:1]
                continue
            if len(self._buf) < length:
                return out
            frame = parse_frame(bytes(self._buf[:length]))
            if frame is None:
                del self._buf[:1]
                continue
            out.append(frame)
            del self._buf[:length]


class FrameAssembler:
    """Cuts received bytes into whole, checked frames for libosdp (see the module text).

    From a SOM it reads the 5-byte header, refuses a length outside 7 bytes to
    ``max_packet`` (libosdp's buffer), waits for the rest, and keeps the frame only if its
    CRC or checksum is right. A refused start is dropped up to and including its SOM and
    the search resumes at the next byte, so a SOM inside a broken frame is found again.
    A partial frame is given up when no byte came for ``gap_s``; the bytes after its SOM
    are searched again, so a whole frame that followed a truncated one is not lost. A
    mark byte (0xFF) just before SOM stays with its frame; other bytes outside frames are
    noise.

    Dropping a bad frame here, rather than letting libosdp refuse it, matters: libosdp
    treats a malformed reply as an error and takes the PD offline (then waits 300 s),
    whereas a reply that never came is retried after 200 + 800 ms up to 8 times.
    Counters: ``noise`` (bytes), ``refused`` (false starts: bad length or check) and
    ``timed_out`` (partial frames given up).
    """

    def __init__(self, gap_s: float, max_packet: int = LIBOSDP_MAX_PACKET) -> None:
        self.gap_s = gap_s
        self._max = max_packet
        self._buf = bytearray()
        self._last = 0.0
        self.noise = 0
        self.refused = 0
        self.timed_out = 0

    @property
    def pending(self) -> int:
        """Bytes held: a partial frame (or a lone mark byte)."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget a partial frame: the reader of the stream flushed its input."""
        self._buf.clear()

    def feed(self, data: bytes, now: float) -> list[bytes]:
        """The frames completed by ``data``, received at ``now`` (monotonic seconds),
        each from SOM (or the mark before it) to the end of its check character. Call it
        with no data to let a partial frame time out."""
        out: list[bytes] = []
        if self._buf and now - self._last > self.gap_s:
            out += self._scan()
            while self._buf:  # what is left is a partial frame the line gave up on
                start = self._buf.find(SOM)
                if start < 0:
                    self._drop_noise(len(self._buf))
                    break
                self.timed_out += 1
                del self._buf[:start + 1]
                out += self._scan()
        if data:
            self._last = now
            self._buf += data
            out += self._scan()
        return out

    def _scan(self) -> list[bytes]:
        """Whole frames from the front of the buffer, up to a partial one."""
        out: list[bytes] = []
        while self._buf:
            start = self._buf.find(SOM)
            if start < 0:
                keep = 1 if self._buf[-1] == MARK else 0  # a mark whose SOM is coming
                self._drop_noise(len(self._buf) - keep)
                break
            mark = 1 if start > 0 and self._buf[start - 1] == MARK else 0
            self._drop_noise(start - mark)
            if len(self._buf) < mark + 5:
                break
            length = self._buf[mark + 2] | self._buf[mark + 3] << 8
            if not MIN_PACKET <= length <= self._max - mark:
                self._refuse(mark + 1)
                continue
            if len(self._buf) < mark + length:
                break
            if not check_ok(bytes(self._buf[mark:mark + length])):
                self._refuse(mark + 1)
                continue
            out.append(bytes(self._buf[:mark + length]))
            del self._buf[:mark + length]
        return out

    def _drop_noise(self, count: int) -> None:
        self.noise += sum(1 for byte in self._buf[:count] if byte != MARK)
        del self._buf[:count]

    def _refuse(self, count: int) -> None:
        self.refused += 1
        del self._buf[:count]
