"""libosdp as the OSDP driver uses it: the constants it numbers, the check of the installed
library, and the channel that carries its frames over the serial port."""

from __future__ import annotations

import os
import select
import termios
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from drivers.base import DeviceError
from drivers.osdp.frames import FrameAssembler, interchar_gap_s

REFRESH_S = 0.02
"""Period of the bus thread's ``refresh()``: libosdp's own wrapper uses 20 ms, and a
frame of 20 bytes takes 21 ms at 9600 baud."""
_READ_MAX = 4096
"""Bytes taken from the port per read: 0.4 s of line at 115200 baud, more than any
backlog between two refreshes."""

# libosdp values (osdp.h, enum osdp_event_type / osdp_notification_type / status type).
EVENT_CARDREAD, EVENT_KEYPRESS, EVENT_STATUS, EVENT_NOTIFICATION = 1, 2, 4, 5
NOTIFY_SC_STATUS, NOTIFY_PD_STATUS = 1, 2
STATUS_INPUT, STATUS_OUTPUT, STATUS_LOCAL, STATUS_REMOTE = 0, 1, 2, 3
CARD_RAW_UNSPECIFIED, CARD_RAW_WIEGAND, CARD_ASCII = 0, 1, 2
CMD_OUTPUT, CMD_LED, CMD_BUZZER, CMD_STATUS = 1, 2, 3, 9
LED_NONE, LED_RED, LED_GREEN = 0, 1, 2
FLAG_ENFORCE_SECURE, FLAG_ENABLE_NOTIFICATION = 0x00010000, 0x00080000
COMPLETION_OK = 0
CAP_OUTPUT, CAP_LED, CAP_AUDIBLE = 2, 4, 5

_EXPECTED = {
    "EVENT_CARDREAD": EVENT_CARDREAD, "EVENT_KEYPRESS": EVENT_KEYPRESS,
    "EVENT_STATUS": EVENT_STATUS, "EVENT_NOTIFICATION": EVENT_NOTIFICATION,
    "EVENT_NOTIFICATION_SC_STATUS": NOTIFY_SC_STATUS,
    "EVENT_NOTIFICATION_PD_STATUS": NOTIFY_PD_STATUS,
    "STATUS_REPORT_INPUT": STATUS_INPUT, "STATUS_REPORT_OUTPUT": STATUS_OUTPUT,
    "STATUS_REPORT_LOCAL": STATUS_LOCAL, "STATUS_REPORT_REMOTE": STATUS_REMOTE,
    "CARD_FMT_RAW_UNSPECIFIED": CARD_RAW_UNSPECIFIED, "CARD_FMT_RAW_WIEGAND": CARD_RAW_WIEGAND,
    "CARD_FMT_ASCII": CARD_ASCII, "CMD_OUTPUT": CMD_OUTPUT, "CMD_LED": CMD_LED,
    "CMD_BUZZER": CMD_BUZZER, "CMD_STATUS": CMD_STATUS, "LED_COLOR_NONE": LED_NONE,
    "LED_COLOR_RED": LED_RED, "LED_COLOR_GREEN": LED_GREEN,
    "FLAG_ENFORCE_SECURE": FLAG_ENFORCE_SECURE,
    "FLAG_ENABLE_NOTIFICATION": FLAG_ENABLE_NOTIFICATION, "COMPLETION_OK": COMPLETION_OK,
    "CAP_OUTPUT_CONTROL": CAP_OUTPUT, "CAP_READER_LED_CONTROL": CAP_LED,
    "CAP_READER_AUDIBLE_OUTPUT": CAP_AUDIBLE,
}
"""The libosdp values this driver spells as plain ints (typed, and usable without the
library), checked against the installed library before first use."""


def libosdp() -> tuple[Any, Any]:
    """The libosdp modules ``osdp`` and ``osdp_sys``; DeviceError if the extra is missing
    or numbers its constants differently from the 3.2.9 this driver was tested with."""
    try:
        import osdp  # type: ignore[import-untyped]  # noqa: PLC0415 - optional extra
        import osdp_sys  # type: ignore[import-not-found]  # noqa: PLC0415 - C part of it
    except ImportError as exc:
        raise DeviceError("libosdp is not installed (pip install 'permitgate[osdp]')"
                          ) from exc
    wrong = sorted(name for name, value in _EXPECTED.items()
                   if getattr(osdp_sys, name, None) != value)
    if wrong:
        raise DeviceError(f"libosdp {getattr(osdp, '__version__', '?')} numbers "
                          f"{', '.join(wrong)} differently; this driver needs libosdp 3.2.x")
    return osdp, osdp_sys


class PortChannel:
    """libosdp's channel over the serial port: non-blocking reads and writes of the
    descriptor pyserial opened and configured.

    Reads hand libosdp whole frames only (``FrameAssembler``; why, in drivers/osdp/frames.py):
    each ``read`` first takes every byte waiting on the port, then returns the next frame,
    at most ``max_bytes`` of it at a time and never the start of a second frame in the same
    call. libosdp reads in 64-byte slices while a read fills its slice (osdp_phy.c,
    osdp_channel_receive), so a frame ending exactly on a slice is followed by one empty
    read: one receive pass of libosdp gets exactly one frame, and a frame that arrives
    with or after another waits in this channel for libosdp's next pass (or its next
    ``flush``, which drops it, as libosdp drops stale input before each command).

    Nothing here may raise into libosdp: its C layer ignores the result of ``flush`` and
    so leaves an exception from it pending, which then surfaces as a SystemError in the
    next callback or in ``refresh()`` (seen here with ``termios.error``, which is not an
    OSError, after a hang-up). Errors are kept in ``error``; the bus reports them.
    """

    def __init__(self, fd: int, baudrate: int, on_rx: Callable[[bytes], None],
                 on_tx: Callable[[bytes], None]) -> None:
        self.id = 0
        """As on libosdp's ``Channel`` base class: PDs with one channel share one line."""
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self._on_rx = on_rx
        self._on_tx = on_tx
        self.frames = FrameAssembler(interchar_gap_s(baudrate, REFRESH_S))
        self._ready: deque[bytes] = deque()
        self._out = b""
        self._pass_ends = False
        self.error: str | None = None

    def read(self, max_bytes: int) -> bytes:
        """The next slice (up to ``max_bytes``) of a whole received frame, or b""."""
        if self.error is not None:
            return b""
        try:
            self._receive()
        except Exception as exc:  # noqa: BLE001 - nothing may reach libosdp's C layer
            self.error = f"read failed: {exc}"
            return b""
        if self._pass_ends:
            self._pass_ends = False
            return b""
        if not self._out:
            if not self._ready:
                return b""
            self._out = self._ready.popleft()
            try:
                self._on_rx(self._out)
            except Exception as exc:  # noqa: BLE001 - nothing may reach libosdp's C layer
                self.error = f"receive bookkeeping failed: {exc}"
                return b""
        data, self._out = self._out[:max_bytes], self._out[max_bytes:]
        self._pass_ends = not self._out and len(data) == max_bytes
        return data

    def _receive(self) -> None:
        # pyserial sets VMIN=0 (it times out with select), so an empty read means "nothing
        # yet" as well as "hung up". As in pyserial, poll first: readable yet empty, or
        # POLLHUP/POLLERR, is an unplugged adapter. (Polling after an empty read instead
        # mistook a byte arriving in between for a hang-up.)
        data = b""
        ready = self._poll.poll(0)
        if ready:
            try:
                data = os.read(self._fd, _READ_MAX) if ready[0][1] & select.POLLIN else b""
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self.error = "the device hung up"
                return
        # Fed even when nothing came: a partial frame times out on the clock.
        self._ready.extend(self.frames.feed(data, time.monotonic()))

    def write(self, buf: bytes) -> int:
        """Send what the port takes now; libosdp resends the rest."""
        if self.error is not None:
            return 0
        try:
            sent = os.write(self._fd, buf)
            self._on_tx(buf[:sent])
        except (BlockingIOError, InterruptedError):
            return 0
        except Exception as exc:  # noqa: BLE001 - nothing may reach libosdp's C layer
            self.error = f"write failed: {exc}"
            return 0
        return sent

    def flush(self) -> None:
        """Drop unread input, partial and whole frames not yet handed over included
        (libosdp calls this before each command: what came before is stale)."""
        self.frames.reset()
        self._ready.clear()
        self._out = b""
        self._pass_ends = False
        if self.error is not None:
            return
        try:
            termios.tcflush(self._fd, termios.TCIFLUSH)
        except Exception as exc:  # noqa: BLE001 - nothing may reach libosdp's C layer
            self.error = f"flush failed: {exc}"
