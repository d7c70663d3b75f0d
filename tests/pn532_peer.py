"""A scripted PN532 on the device end of a pseudo-terminal, speaking HSU frames.

No emulator of the PN532's host interface was found, so this is a fake. Its fidelity is
checked by two hosts written by others, run against it in tests/test_pn532.py: nfcpy
1.0.4's PN532 driver and libnfc 1.8.0's ``nfc-list``. Only the subset those hosts and our
driver use is implemented, with frames as in the PN532 User Manual (UM0701-02):

- normal frame ``00 00 FF LEN LCS TFI PD0..PDn DCS 00`` and extended frame
  ``00 00 FF FF FF LENm LENl LCS TFI ... DCS 00`` both ways; LEN counts TFI and data;
  ``LCS = -LEN``, ``DCS = -(TFI + data)``, mod 256; TFI ``D4`` host to chip, ``D5`` back;
  the response code is the command code + 1; the chip sends ACK ``00 00 FF 00 FF 00``
  first, then the response;
- a NACK ``00 00 FF FF 00 00`` from the host makes the chip send its last response again;
  an ACK from the host aborts (nothing to abort here: answers are immediate);
- an unknown command gets the application error frame ``00 00 FF 01 FF 7F 81 00``.

The framing here is written independently of drivers/pn532.py on purpose, so the driver's
byte-exact tests compare two implementations. What the fake does not model: timing (a real
chip ACKs within ~15 ms), the LowVbat/power-down wake-up (any frame is answered, with or
without a ``55 55`` preamble), RF effects, Type B/F targets and card commands.
"""

from __future__ import annotations

import os
import select
import threading
import tty
from collections import deque
from dataclasses import dataclass

ACK = bytes.fromhex("0000ff00ff00")
NACK = bytes.fromhex("0000ffff0000")
ERROR_FRAME = bytes.fromhex("0000ff01ff7f8100")
"""The application-level error frame (syntax error in the host's command)."""

FIRMWARE = bytes.fromhex("32010607")
"""GetFirmwareVersion data: IC 0x32 (PN532), version 1.6, supports ISO A, B and 18092."""

CIU_FIFO_DATA = 0x6339
REQA = 0x26
"""nfcpy reads CIU_FIFOData after an empty InListPassiveTarget: REQA (0x26) still in the
FIFO means no card answered at all, anything else makes it try a Type 1 tag."""


def host_frame(body: bytes) -> bytes:
    """A frame around ``body`` (TFI and data), normal when it fits, else extended."""
    if len(body) < 256:
        head = bytes([0x00, 0x00, 0xFF, len(body), -len(body) & 0xFF])
    else:
        hi, lo = len(body) >> 8, len(body) & 0xFF
        head = bytes([0x00, 0x00, 0xFF, 0xFF, 0xFF, hi, lo, -(hi + lo) & 0xFF])
    return head + body + bytes([-sum(body) & 0xFF, 0x00])


def extended_frame(body: bytes) -> bytes:
    """``body`` in an extended frame whatever its length (the format allows it)."""
    hi, lo = len(body) >> 8, len(body) & 0xFF
    return (bytes([0x00, 0x00, 0xFF, 0xFF, 0xFF, hi, lo, -(hi + lo) & 0xFF]) + body
            + bytes([-sum(body) & 0xFF, 0x00]))


@dataclass(frozen=True, slots=True)
class Card:
    """An ISO 14443-A card: what InListPassiveTarget reports for it at 106 kbps."""

    uid: bytes
    sens_res: bytes = b"\x00\x04"
    """As the PN532 sends it; ``00 04`` is a MIFARE Classic 1K, ``00 44`` an NTAG."""
    sel_res: int = 0x08


NTAG = Card(bytes.fromhex("04A1B2C3D4E5F6"), b"\x00\x44", 0x00)
"""A 7-byte NTAG/Ultralight (SENS_RES 00 44, SEL_RES 00), as in nfcpy's test vectors."""
CLASSIC = Card(bytes.fromhex("DEADBEEF"), b"\x00\x04", 0x08)
"""A 4-byte MIFARE Classic 1K."""


class Pn532Peer:
    """The chip end of a pty: parses host frames on a thread and answers them.

    ``place``/``remove`` put a card in the field until further notice; ``tap`` scripts a
    short presentation (seen by exactly one InListPassiveTarget, then one empty answer),
    so cards tapped one after another each show up as a separate presentation.
    """

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        # Raw at once: no echo, no CR/LF translation of what arrives before a host
        # configures the port.
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.received = bytearray()
        """Every byte the host wrote, in order (wake-up preambles included)."""
        self.commands: list[bytes] = []
        """Each host command frame's data: command code and parameters (TFI dropped)."""
        self.host_errors: list[str] = []
        """Host frames this peer could not accept: must stay empty for a correct host."""
        self.answering = True
        """False makes the peer record but never answer, like a chip that is not there."""
        self.registers: dict[int, int] = {CIU_FIFO_DATA: REQA}
        self.field_on = False
        self.list_answers = 0
        """InListPassiveTarget 106A answers sent, with or without a target."""
        self.empty_answers = 0
        """Those of them that reported no target."""
        self._card: Card | None = None
        self._script: deque[Card | None] = deque()
        self._garble: dict[int, str] = {}
        self._refuse: set[int] = set()
        self._last_response = b""
        self._held: bytearray | None = None
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pn532-peer", daemon=True)
        self._master_open = True
        self._thread.start()

    # -- what the test scripts ---------------------------------------------------------

    def place(self, card: Card) -> None:
        """Put ``card`` in the field; it stays until ``remove``."""
        with self._lock:
            self._card = card

    def remove(self) -> None:
        """Take the resting card out of the field."""
        with self._lock:
            self._card = None

    def tap(self, card: Card) -> None:
        """Present ``card`` to one poll, then leave the field empty for one poll."""
        with self._lock:
            self._script.extend((card, None))

    def garble_next(self, code: int, where: str = "dcs") -> None:
        """Corrupt the next response to command ``code`` on the line: its data checksum
        (``dcs``) or its length checksum (``lcs``). A NACK gets the intact frame."""
        with self._lock:
            self._garble[code] = where

    def refuse_next(self, code: int) -> None:
        """Answer the next command ``code`` with the error frame instead."""
        with self._lock:
            self._refuse.add(code)

    def hold(self) -> None:
        """Keep answers back until ``release``, like a chip still busy with a command."""
        with self._lock:
            self._held = bytearray()

    def release(self) -> None:
        """Send the answers held back, and answer at once again."""
        with self._lock:
            held, self._held = self._held, None
        if held:
            self.write(bytes(held))

    def write(self, data: bytes) -> None:
        """Send raw bytes to the host (noise, partial frames)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def hang_up(self) -> None:
        """Close the device end, as when a USB-serial bridge is unplugged."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            if self._master_open:
                self._master_open = False
                os.close(self.master)

    def close(self) -> None:
        """Stop answering and release both ends."""
        self.hang_up()
        os.close(self._slave)

    # -- the chip ------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            with self._lock:
                self.received += data
                self._buffer += data
                self._parse()

    def _parse(self) -> None:
        buf = self._buffer
        while True:
            start = buf.find(b"\x00\xff")
            if start < 0:
                del buf[:max(len(buf) - 1, 0)]
                return
            del buf[:start]
            if len(buf) < 4:
                return
            if bytes(buf[2:4]) in (b"\x00\xff", b"\xff\x00"):
                # An ACK from the host aborts (nothing is pending here); a NACK asks for
                # the last response again.
                nack = buf[2] == 0xFF
                del buf[:4]
                if nack and self.answering and self._last_response:
                    self._send(self._last_response)
                continue
            extent = _extent(buf)
            if extent is None:
                return
            header, length = extent
            if length == 0:
                self.host_errors.append(f"length checksum in {bytes(buf[:header]).hex()}")
                del buf[:2]
                continue
            if len(buf) < header + length + 2:
                return
            body = bytes(buf[header:header + length])
            dcs, post = buf[header + length], buf[header + length + 1]
            del buf[:header + length + 2]
            if (sum(body) + dcs) & 0xFF or post != 0x00 or body[0] != 0xD4 or len(body) < 2:
                self.host_errors.append(f"bad frame {body.hex()} dcs {dcs:02x} post {post:02x}")
                continue
            self.commands.append(body[1:])
            if self.answering:
                self._answer(body[1], body[2:])

    def _send(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data
        else:
            self.write(data)

    def _answer(self, code: int, params: bytes) -> None:
        self._send(ACK)
        if code in self._refuse:
            self._refuse.discard(code)
            self._last_response = ERROR_FRAME
            self._send(ERROR_FRAME)
            return
        data = self._execute(code, params)
        if data is None:
            self._last_response = ERROR_FRAME
            self._send(ERROR_FRAME)
            return
        frame = host_frame(bytes([0xD5, code + 1]) + data)
        self._last_response = frame
        where = self._garble.pop(code, None)
        if where == "dcs":
            frame = frame[:-2] + bytes([frame[-2] ^ 0x5A]) + frame[-1:]
        elif where == "lcs":
            frame = frame[:4] + bytes([frame[4] ^ 0x5A]) + frame[5:]
        self._send(frame)

    def _execute(self, code: int, params: bytes) -> bytes | None:
        """The response data for one command, or None for an error frame."""
        plain = {0x10: b"", 0x12: b"", 0x14: b"", 0x16: b"\x00", 0x44: b"\x00",
                 0x52: b"\x00", 0x02: FIRMWARE}
        if code in plain:  # SetSerialBaudrate, SetParameters, SAMConfiguration, PowerDown,
            return plain[code]  # InDeselect, InRelease (status ok); GetFirmwareVersion
        handlers = {0x00: self._diagnose, 0x04: self._general_status,
                    0x06: self._read_register, 0x08: self._write_register,
                    0x32: self._rf_configuration, 0x4A: self._list_passive_target}
        handler = handlers.get(code)
        return handler(params) if handler is not None else None

    @staticmethod
    def _diagnose(params: bytes) -> bytes:
        # Test 0 (communication line) echoes its data, test number included.
        return params if params[:1] == b"\x00" else b"\x00"

    def _general_status(self, _params: bytes) -> bytes:
        # No error, field state, no target, SAM status.
        return bytes([0x00, int(self.field_on), 0x00, 0x00])

    def _read_register(self, params: bytes) -> bytes:
        # The PN532 answers with the values only (a PN533 puts a status byte first).
        addresses = [params[i] << 8 | params[i + 1] for i in range(0, len(params) - 1, 2)]
        return bytes(self.registers.get(a, 0x00) for a in addresses)

    def _write_register(self, params: bytes) -> bytes:
        for i in range(0, len(params) - 2, 3):
            self.registers[params[i] << 8 | params[i + 1]] = params[i + 2]
        return b""

    def _rf_configuration(self, params: bytes) -> bytes:
        if params[:1] == b"\x01" and len(params) >= 2:  # item 1: RF field
            self.field_on = bool(params[1] & 0x01)
        return b""

    def _list_passive_target(self, params: bytes) -> bytes | None:
        if len(params) < 2 or params[0] not in (1, 2):
            return None
        if params[1] != 0x00:  # only 106 kbps Type A cards exist here
            return b"\x00"
        self.field_on = True
        card = self._script.popleft() if self._script else self._card
        wanted = params[2:]
        if card is not None and wanted and not _selects(wanted, card.uid):
            card = None
        self.list_answers += 1
        if card is None:
            self.empty_answers += 1
            self.registers[CIU_FIFO_DATA] = REQA
            return b"\x00"
        self.registers[CIU_FIFO_DATA] = 0x00
        return (bytes([0x01, 0x01]) + card.sens_res + bytes([card.sel_res, len(card.uid)])
                + card.uid)


def _extent(buf: bytearray) -> tuple[int, int] | None:
    """Header size and LEN of the frame at the start of ``buf`` (None: more bytes needed);
    LEN 0 when the length checksum fails."""
    if buf[2:4] == b"\xff\xff":
        if len(buf) < 7:
            return None
        ok = (buf[4] + buf[5] + buf[6]) & 0xFF == 0
        return 7, (buf[4] << 8 | buf[5]) if ok else 0
    return 4, buf[2] if (buf[2] + buf[3]) & 0xFF == 0 else 0


def _selects(wanted: bytes, uid: bytes) -> bool:
    """Whether InListPassiveTarget's initiator data (a UID with cascade tags 0x88 before
    each but the last 4-byte part, as nfcpy sends it) names ``uid``."""
    plain = wanted
    if len(plain) >= 8 and plain[0] == 0x88:
        plain = plain[1:]
    if len(plain) >= 8 and plain[3] == 0x88:
        plain = plain[:3] + plain[4:]
    return plain == uid
