"""OSDP readers and outputs (SIA OSDP 2.2 / IEC 60839-11-5 over RS-485), the agent being
the Control Panel (CP), through libosdp (the optional extra ``permitgate[osdp]``).

The bus
    One RS-485 line (one serial port) carries up to 126 Peripheral Devices (PDs), each
    answering only its own multi-drop ``address``. Every ``OsdpReader`` and ``OsdpRelay``
    configured with the same ``port`` shares one ``_Bus``: it owns the serial port, the
    libosdp ControlPanel and the thread that refreshes it every 20 ms; each address has a
    ``_Slot`` with its link state and, when a reader is attached, a queue of its events.
    The bus is reference-counted and closes the port when its last user closes. A libosdp
    CP knows its PDs from construction, so an address joining a running bus rebuilds the
    CP; the PDs already on it re-handshake (about 0.3 s with Secure Channel here) and
    their readers ride through that within ``open_timeout_s`` without reporting offline.

Secure Channel (SC)
    ``secure = true`` (the default) needs ``scbk_file``: the PD's Secure Channel Base Key,
    32 hex digits. The CP runs with libosdp's ENFORCE_SECURE: if the handshake fails
    (wrong key, SC off on the PD) the PD is offline, never used in plain text, and
    ``open()`` raises ``DeviceError`` naming the port, the address and the reason found
    in the exchange itself (no answer, key mismatch, SC refused or not offered). Without
    ENFORCE_SECURE libosdp would retry with the public SCBK-D and then go online in plain
    text (``src/osdp_cp.c``, get_next_err_state), the downgrade of Bishop Fox's "Badge of
    Shame" (2023). ``secure = false`` must be set explicitly and is for bench use.

Install mode (``install_mode = true``, key set-up at installation only)
    The PD ships without a key and accepts SCBK-D (``30 31 .. 3F``, public). The CP first
    tries the site key, then SCBK-D, then sends ``osdp_KEYSET`` with the site key and
    restarts SC with it. RISK: anyone on the wire who knows SCBK-D decrypts that KEYSET,
    and while install mode is on a swapped-in rogue PD would be handed the key the same
    way; ENFORCE_SECURE is off during it (libosdp needs that for the SCBK-D retry), so the
    driver itself refuses a PD that comes online without SC. Use it on a bench or a
    closed line, then set it back to false (``osdp_key_installed`` reminds you).

Card ids (``CardRead.card_id``)
    - ``osdp_RAW`` (Wiegand or unspecified raw bits): ``"osdp:<bits>:<HEX>"``, ``<bits>``
      the bit count in decimal, ``<HEX>`` the ``ceil(bits/8)`` data bytes as sent (first
      bit in the top bit of the first byte) in upper-case hex, unused trailing bits forced
      to 0. A 26-bit read ``12 34 56 40`` is ``"osdp:26:12345640"``. The Wiegand format
      code is not part of the id: the same bits are the same card on any reader.
    - ``osdp_FMT`` (card data as ASCII text): ``"osdp:fmt:<text>"``, printable ASCII only.
      (libosdp 3.2.9's PD refuses to send it as deprecated, so only the parser is tested.)
    - ``osdp_KEYPAD`` with ``keypad = true``: digits up to ``#`` (or 0x0D, OSDP's enter)
      become ``"pin:<digits>"``; ``*`` (or 0x7F) clears; longer than ``pin_max_digits``,
      a non-digit or a pause over ``pin_timeout_s`` refuses the entry. With ``keypad =
      false`` (the default) key presses are ignored.

Status
    Tamper and power reports (``osdp_LSTATR``, asked for whenever the PD comes online)
    are logged as ``reader_tamper`` and ``reader_power`` and kept in ``reader.status``.

Offline
    libosdp declares a PD offline after 8 unanswered probes, about 8.4 s here, and then
    waits 300 s before it tries again. ``read()`` raises ``DeviceError`` once the PD is
    offline (or a port error occurred), so the agent reports ``reader_offline`` and
    reopens; a reopen, and a bus that still has users of an offline PD after
    ``_RETRY_S``, restart that PD's handshake at once instead of waiting 300 s. A failed
    port is reopened by the bus itself every ``_RETRY_S`` while it has users, since
    nothing reopens a lock output. Any NAK to a command also takes a PD offline in
    libosdp, so LED, buzzer and output commands are sent only if PDCAP announced them.
"""

from __future__ import annotations

import enum
import os
import queue
import select
import termios
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import serial
import structlog
from pydantic import Field, model_validator

from drivers.base import CardRead, DeviceError, DriverOptions, Reader, Relay

_log = structlog.get_logger()

SCBK_D = bytes(range(0x30, 0x40))
"""SCBK-D, the default Secure Channel key of install mode: published in reader manuals."""

_REFRESH_S = 0.02
"""Period of the bus thread's ``refresh()``: libosdp's own wrapper uses 20 ms, and a
frame of 20 bytes takes 21 ms at 9600 baud."""
_RETRY_S = 10.0
"""An offline PD that still has users is restarted after this, not libosdp's 300 s."""
_MAX_PDS = 32
"""libosdp's ``status()`` and ``sc_status()`` are 32-bit masks, one bit per PD."""
_QUEUE_MAX = 256
"""Card and key events waiting for ``read()``; beyond that they are dropped, logged."""
_FEEDBACK_100MS = 5
"""LED colour shown after a decision, in OSDP's 100 ms units: 500 ms."""
_DENY_BEEP_100MS = 3
"""The deny beep: 300 ms, once."""
_OUTPUT_CONFIRM_S = 2.0
"""How long ``OsdpRelay.set`` waits for the PD to acknowledge ``osdp_OUT``: an exchange
takes well under 100 ms, a lost frame is retried by libosdp after 800 ms."""

# Command and reply codes (SIA OSDP 2.2, tables 5 and 6) seen by the frame scanner.
_CMD_LSTAT, _CMD_KEYSET, _CMD_CHLNG, _CMD_SCRYPT = 0x64, 0x75, 0x76, 0x77
_REPLY_NAK, _REPLY_PDCAP, _REPLY_CCRYPT = 0x41, 0x46, 0x76

# libosdp values (osdp.h, enum osdp_event_type / osdp_notification_type / status type).
_EVENT_CARDREAD, _EVENT_KEYPRESS, _EVENT_STATUS, _EVENT_NOTIFICATION = 1, 2, 4, 5
_NOTIFY_SC_STATUS, _NOTIFY_PD_STATUS = 1, 2
_STATUS_INPUT, _STATUS_OUTPUT, _STATUS_LOCAL, _STATUS_REMOTE = 0, 1, 2, 3
_CARD_RAW_UNSPECIFIED, _CARD_RAW_WIEGAND, _CARD_ASCII = 0, 1, 2
_CMD_OUTPUT, _CMD_LED, _CMD_BUZZER, _CMD_STATUS = 1, 2, 3, 9
_LED_NONE, _LED_RED, _LED_GREEN = 0, 1, 2
_FLAG_ENFORCE_SECURE, _FLAG_ENABLE_NOTIFICATION = 0x00010000, 0x00080000
_COMPLETION_OK = 0
_ABANDONED = -1
"""Our own completion status for a command lost when the bus restarted its CP."""
_CAP_OUTPUT, _CAP_LED, _CAP_AUDIBLE = 2, 4, 5


# --- options -----------------------------------------------------------------------------


class OsdpOptions(DriverOptions):
    """Options shared by the OSDP reader and output: the line, the PD and its security."""

    port: str = Field(min_length=1)
    """Serial device of the RS-485 adapter, e.g. ``/dev/serial/by-id/usb-FTDI...``."""

    baudrate: Literal[9600, 19200, 38400, 57600, 115200] = 9600

    address: int = Field(ge=0, le=126)
    """The PD's multi-drop address (127 is broadcast, never a PD's own)."""

    secure: bool = True
    """Secure Channel, enforced. False only for bench tests, and only explicitly."""

    scbk_file: str | None = Field(default=None, min_length=1)
    """The PD's Secure Channel Base Key, 32 hex digits. An absolute path, a path relative
    to the working directory, or a bare name found in ``$CREDENTIALS_DIRECTORY`` first."""

    install_mode: bool = False
    """Installation only: SCBK-D, then ``osdp_KEYSET`` with the key of ``scbk_file``."""

    open_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """How long ``open()`` waits for the PD to be online (and SC active)."""

    @model_validator(mode="after")
    def _security_is_consistent(self) -> OsdpOptions:
        if self.secure and self.scbk_file is None:
            raise ValueError("scbk_file is required: Secure Channel is on unless "
                             "'secure = false' is set explicitly")
        if not self.secure and self.scbk_file is not None:
            raise ValueError("scbk_file is set but secure = false: the key would be unused")
        if self.install_mode and not self.secure:
            raise ValueError("install_mode sets a Secure Channel key; it needs secure = true")
        return self


class OsdpReaderOptions(OsdpOptions):
    """Options of the OSDP reader."""

    keypad: bool = False
    """Turn keypad entries ended by ``#`` into ``"pin:<digits>"`` reads."""

    pin_max_digits: int = Field(default=8, ge=1, le=16)

    pin_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """A longer pause between two keys discards the digits typed so far."""


class OsdpRelayOptions(OsdpOptions):
    """Options of an OSDP PD output driving a lock."""

    output_no: int = Field(default=0, ge=0, le=255)

    active_high: bool = True
    """True: unlocked is output ON. False: unlocked is output OFF (a fail-safe lock wired
    to the PD's relay in its energised-when-locked way)."""


# --- pure parts: key file, card ids, PIN entry, frame scanner ----------------------------


def _secret_path(name: str) -> Path:
    path = Path(name)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and "/" not in name and creds and (Path(creds) / name).exists():
        return Path(creds) / name
    return path


def load_scbk(name: str) -> bytes:
    """The 16-byte key in file ``name`` (32 hex digits, blanks ignored); refuses SCBK-D
    and the all-zero key, which are public or trivial."""
    path = _secret_path(name)
    try:
        text = path.read_text("ascii")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceError(f"scbk_file {path}: cannot read: {exc}") from exc
    digits = "".join(text.split())
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        key = b""
    if len(key) != 16:
        raise DeviceError(f"scbk_file {path}: a Secure Channel key is 32 hex digits")
    if key == SCBK_D:
        raise DeviceError(f"scbk_file {path}: this is SCBK-D, the public default key; "
                          "give every reader its own random key")
    if key == bytes(16):
        raise DeviceError(f"scbk_file {path}: the all-zero key is not a key")
    if mode & 0o077:
        _log.warning("osdp_key_file_readable", path=str(path), mode=oct(mode & 0o777),
                     hint="chmod 600: the key decrypts all reader traffic")
    return key


def card_id(event: dict[str, Any]) -> str:
    """The normalised id of a libosdp card-read event; ValueError says why it is refused."""
    fmt = event.get("format")
    data = event.get("data")
    if not data or not isinstance(data, bytes):
        raise ValueError("no_data")
    if fmt in (_CARD_RAW_UNSPECIFIED, _CARD_RAW_WIEGAND):
        bits = event.get("length")
        if not isinstance(bits, int) or bits <= 0:
            raise ValueError("bad_bit_count")
        if len(data) != (bits + 7) // 8:
            raise ValueError("length_mismatch")
        value = int.from_bytes(data, "big")
        pad = len(data) * 8 - bits
        value &= ~((1 << pad) - 1)
        return f"osdp:{bits}:{value.to_bytes(len(data), 'big').hex().upper()}"
    if fmt == _CARD_ASCII:
        text = data.decode("ascii", errors="replace").strip()
        if not text or not text.isprintable() or not text.isascii() or ":" in text:
            raise ValueError("not_printable")
        return f"osdp:fmt:{text}"
    raise ValueError("unknown_format")


@dataclass(frozen=True, slots=True)
class Pin:
    """A finished keypad entry."""

    digits: str


@dataclass(frozen=True, slots=True)
class PinRejected:
    """A refused keypad entry: why, and how many keys it had. Never the keys."""

    reason: str
    length: int


class PinAssembler:
    """Collects ``osdp_KEYPAD`` bytes into PIN entries ended by ``#``."""

    _ENTER = frozenset(b"#\r")
    _CLEAR = frozenset(b"*\x7f")

    def __init__(self, max_digits: int, timeout_s: float) -> None:
        self._max = max_digits
        self._timeout = timeout_s
        self._digits = bytearray()
        self._keys = 0
        self._bad: str | None = None
        self._last = 0.0

    def feed(self, keys: bytes, now: float) -> list[Pin | PinRejected]:
        """Entries finished or refused by ``keys``, pressed at ``now`` (monotonic)."""
        out: list[Pin | PinRejected] = []
        if self._keys and now - self._last > self._timeout:
            out.append(PinRejected("timeout", self._keys))
            self._reset()
        self._last = now
        for key in keys:
            if key in self._ENTER:
                if self._bad is not None:
                    out.append(PinRejected(self._bad, self._keys))
                elif self._digits:
                    out.append(Pin(self._digits.decode("ascii")))
                self._reset()
            elif key in self._CLEAR:
                self._reset()
            else:
                self._keys += 1
                if self._bad is not None:
                    continue
                if not 0x30 <= key <= 0x39:
                    self._bad = "not_digit"
                elif len(self._digits) >= self._max:
                    self._bad = "too_long"
                else:
                    self._digits.append(key)
        return out

    def _reset(self) -> None:
        self._digits.clear()
        self._keys = 0
        self._bad = None


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


_SOM = 0x53
_MIN_PACKET = 7
_MAX_PACKET = 1440


def parse_frame(packet: bytes) -> Frame | None:  # noqa: PLR0911 - one check, one return
    """``packet`` (SOM up to its CRC or checksum) as a Frame, or None if it is invalid."""
    if len(packet) < _MIN_PACKET or packet[0] != _SOM:
        return None
    if len(packet) != packet[2] | packet[3] << 8:
        return None
    ctrl = packet[4]
    if ctrl & 0x04:
        body = packet[:-2]
        if crc16(body) != packet[-2] | packet[-1] << 8:
            return None
    else:
        body = packet[:-1]
        if (sum(body) + packet[-1]) & 0xFF:
            return None
    pos, scb_type, scb_data = 5, None, b""
    if ctrl & 0x08:
        scb_len = body[5]
        if scb_len < 2 or 5 + scb_len >= len(body):
            return None
        scb_type, scb_data = body[6], bytes(body[7:5 + scb_len])
        pos = 5 + scb_len
    if pos >= len(body):
        return None
    mac = 4 if scb_type is not None and 0x15 <= scb_type <= 0x18 else 0
    return Frame(packet[1] & 0x7F, bool(packet[1] & 0x80), body[pos], scb_type, scb_data,
                 bytes(body[pos + 1:len(body) - mac]))


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
            start = self._buf.find(_SOM)
            if start < 0:
                self._buf.clear()
                return out
            del self._buf[:start]
            if len(self._buf) < 5:
                return out
            length = self._buf[2] | self._buf[3] << 8
            if not _MIN_PACKET <= length <= _MAX_PACKET:
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


# --- the bus -------------------------------------------------------------------------------


class LinkState(enum.Enum):
    """A PD's link, as the driver sees it."""

    CONNECTING = "connecting"
    ONLINE = "online"
    OFFLINE = "offline"
    FAILED = "failed"
    """Refused by the driver: the PD came online without the Secure Channel required."""
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class PdConfig:
    """What the CP needs to know of one PD; every user of an address must agree on it."""

    address: int
    secure: bool
    scbk: bytes | None = field(repr=False)
    install_mode: bool


@dataclass(slots=True)
class _LinkStats:
    """What the wire showed of one address since its handshake started: the evidence
    for the reason given when it fails."""

    replies: int = 0
    last_reply: float = 0.0
    sent: set[int] = field(default_factory=set)
    got: set[int] = field(default_factory=set)
    nak_codes: list[int] = field(default_factory=list)
    last_command: int = 0
    refused: tuple[int, int] | None = None
    """(command, NAK code) of the last command the PD refused."""
    scbkd_challenge: bool = False


class _Slot:
    """One address on the bus: its configuration, users, link state and events."""

    def __init__(self, config: PdConfig) -> None:
        self.config = config
        self.index = -1
        self.members: set[object] = set()
        self.reader: OsdpReader | None = None
        self.events: queue.Queue[dict[str, Any]] | None = None
        self.outputs: dict[int, int] = {}
        """Output number -> control code last set, re-sent when the PD comes back."""
        self.state = LinkState.CONNECTING
        self.state_since = time.monotonic()
        self.reason: str | None = None
        self.attempt_started = time.monotonic()
        self.offline_notified = False
        self.sc_active = False
        self.sc_scbkd = False
        self.stats = _LinkStats()
        self.restart_requested = False
        self.disable_requested = False
        self.status: dict[str, Any] = {}
        self.pd_id: dict[str, int] | None = None
        self.caps: dict[int, tuple[int, int]] = {}
        """Capability function code -> (compliance level, number of items), from PDCAP."""
        self.lstat_refused = False
        self.pending: deque[tuple[dict[str, Any], threading.Event, list[int]]] = deque()

    def begin_attempt(self, now: float) -> None:
        """A fresh handshake starts: forget the evidence of the last one."""
        self.state = LinkState.CONNECTING
        self.state_since = self.attempt_started = now
        self.reason = None
        self.offline_notified = False
        self.sc_active = self.sc_scbkd = False
        self.stats = _LinkStats()

    @property
    def who(self) -> str:
        """The reader's name, for log lines about this address."""
        return self.reader.name if self.reader is not None else "-"


class _PortChannel:
    """libosdp's channel over the serial port: non-blocking read and write of the
    descriptor pyserial opened and configured.

    Nothing here may raise into libosdp: its C layer ignores the result of ``flush`` and
    so leaves an exception from it pending, which then surfaces as a SystemError in the
    next callback or in ``refresh()`` (seen here with ``termios.error``, which is not an
    OSError, after a hang-up). Errors are kept in ``error``; the bus reports them.
    """

    def __init__(self, fd: int, on_rx: Any, on_tx: Any) -> None:
        self.id = 0
        """As on libosdp's ``Channel`` base class: PDs with one channel share one line."""
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self._on_rx = on_rx
        self._on_tx = on_tx
        self.error: str | None = None

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` received bytes, without waiting."""
        if self.error is not None:
            return b""
        try:
            # pyserial sets VMIN=0 (it times out with select), so an empty read means
            # "nothing yet" as well as "hung up". As in pyserial, poll first: readable
            # yet empty, or POLLHUP/POLLERR, is an unplugged adapter. (Polling after an
            # empty read instead mistook a byte arriving in between for a hang-up.)
            ready = self._poll.poll(0)
            if not ready:
                return b""
            data = os.read(self._fd, max_bytes) if ready[0][1] & select.POLLIN else b""
            if not data:
                self.error = "the device hung up"
                return b""
            self._on_rx(data)
        except (BlockingIOError, InterruptedError):
            return b""
        except Exception as exc:  # noqa: BLE001 - nothing may reach libosdp's C layer
            self.error = f"read failed: {exc}"
            return b""
        return data

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
        """Drop unread input (libosdp calls this before a new command)."""
        if self.error is not None:
            return
        try:
            termios.tcflush(self._fd, termios.TCIFLUSH)
        except Exception as exc:  # noqa: BLE001 - nothing may reach libosdp's C layer
            self.error = f"flush failed: {exc}"


_EXPECTED = {
    "EVENT_CARDREAD": _EVENT_CARDREAD, "EVENT_KEYPRESS": _EVENT_KEYPRESS,
    "EVENT_STATUS": _EVENT_STATUS, "EVENT_NOTIFICATION": _EVENT_NOTIFICATION,
    "EVENT_NOTIFICATION_SC_STATUS": _NOTIFY_SC_STATUS,
    "EVENT_NOTIFICATION_PD_STATUS": _NOTIFY_PD_STATUS,
    "STATUS_REPORT_INPUT": _STATUS_INPUT, "STATUS_REPORT_OUTPUT": _STATUS_OUTPUT,
    "STATUS_REPORT_LOCAL": _STATUS_LOCAL, "STATUS_REPORT_REMOTE": _STATUS_REMOTE,
    "CARD_FMT_RAW_UNSPECIFIED": _CARD_RAW_UNSPECIFIED, "CARD_FMT_RAW_WIEGAND": _CARD_RAW_WIEGAND,
    "CARD_FMT_ASCII": _CARD_ASCII, "CMD_OUTPUT": _CMD_OUTPUT, "CMD_LED": _CMD_LED,
    "CMD_BUZZER": _CMD_BUZZER, "CMD_STATUS": _CMD_STATUS, "LED_COLOR_NONE": _LED_NONE,
    "LED_COLOR_RED": _LED_RED, "LED_COLOR_GREEN": _LED_GREEN,
    "FLAG_ENFORCE_SECURE": _FLAG_ENFORCE_SECURE,
    "FLAG_ENABLE_NOTIFICATION": _FLAG_ENABLE_NOTIFICATION, "COMPLETION_OK": _COMPLETION_OK,
    "CAP_OUTPUT_CONTROL": _CAP_OUTPUT, "CAP_READER_LED_CONTROL": _CAP_LED,
    "CAP_READER_AUDIBLE_OUTPUT": _CAP_AUDIBLE,
}
"""The libosdp values this module spells as plain ints (typed, and usable without the
library), checked against the installed library before first use."""


def _libosdp() -> tuple[Any, Any]:
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


class _Bus:
    """One serial line, its libosdp ControlPanel and its refresh thread."""

    def __init__(self, key: str, port: str, baudrate: int) -> None:
        self.key = key
        self.port = port
        self.baudrate = baudrate
        self._cv = threading.Condition(threading.RLock())
        """Guards everything below and every call into the ControlPanel; the refresh
        thread holds it for one refresh (a few ms); state changes are notified on it."""
        self._slots: list[_Slot] = []
        self._serial: serial.Serial | None = None
        self._channel: _PortChannel | None = None
        self._ctx: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: str | None = None
        self._failed_at = 0.0
        self._rx = FrameScanner()
        self._tx = FrameScanner()

    # -- membership (called with the registry lock held) ------------------------------

    @property
    def empty(self) -> bool:
        """No user left."""
        with self._cv:
            return not any(s.members for s in self._slots)

    def attach(self, config: PdConfig, member: object) -> _Slot:
        """Add ``member`` as a user of ``config.address``; opens the port on first use."""
        with self._cv:
            slot = next((s for s in self._slots if s.config.address == config.address), None)
            if slot is not None and not slot.members and slot.config != config:
                # Its last user closed; a new one with other settings replaces it.
                self._slots.remove(slot)
                slot.index, slot = -1, None
            if slot is not None and slot.config != config:
                raise DeviceError(f"{self.port} address {config.address}: configured "
                                  "with other security settings by another device")
            if isinstance(member, OsdpReader) and slot is not None and slot.reader:
                raise DeviceError(f"{self.port} address {config.address}: reader "
                                  f"{slot.reader.name} already reads it")
            if isinstance(member, OsdpRelay) and slot is not None and any(
                    isinstance(m, OsdpRelay) and m.options.output_no == member.options.output_no
                    for m in slot.members):
                raise DeviceError(f"{self.port} address {config.address}: output "
                                  f"{member.options.output_no} is already claimed")
            if self.failure is not None:
                self._close_port()
            rebuild = self._serial is None or slot is None or slot.index < 0
            if slot is None:
                if sum(1 for s in self._slots if s.members) >= _MAX_PDS:
                    raise DeviceError(f"{self.port}: at most {_MAX_PDS} PDs on one line")
                slot = _Slot(config)
                self._slots.append(slot)
            slot.members.add(member)
            try:
                if self._serial is None:
                    self._open_port()
                if rebuild:
                    self._rebuild()
                elif slot.disable_requested or slot.state in (
                        LinkState.OFFLINE, LinkState.FAILED, LinkState.DISABLED):
                    # A handshake under way (CONNECTING) is left to finish.
                    self._restart(slot)
            except BaseException:
                slot.members.discard(member)
                raise
            if isinstance(member, OsdpReader):
                slot.reader = member
                slot.events = queue.Queue(_QUEUE_MAX)
            return slot

    def detach(self, slot: _Slot, member: object) -> None:
        """Remove ``member``; an address left without users stops being polled."""
        with self._cv:
            slot.members.discard(member)
            if slot.reader is member:
                slot.reader = None
                slot.events = None
            if isinstance(member, OsdpRelay):
                slot.outputs.pop(member.options.output_no, None)
            if not slot.members:
                slot.restart_requested = False
                slot.disable_requested = True

    def _restart(self, slot: _Slot) -> None:
        slot.begin_attempt(time.monotonic())
        slot.disable_requested = False
        slot.restart_requested = True

    def _open_port(self) -> None:
        try:
            # exclusive: a second agent on the line would make two masters, each
            # garbling the other's frames.
            port = serial.Serial(port=self.port, baudrate=self.baudrate, timeout=0,
                                 write_timeout=0, exclusive=True)
        except (OSError, ValueError) as exc:
            raise DeviceError(f"osdp bus {self.port}: cannot open: {exc}") from exc
        self._serial = port
        self._channel = _PortChannel(port.fileno(), self._on_rx, self._on_tx)
        self.failure = None

    def _rebuild(self) -> None:
        """A new ControlPanel for the addresses in use (libosdp fixes its PDs at set-up)."""
        osdp, osdp_sys = _libosdp()
        keep = [s for s in self._slots if s.members]
        infos = []
        for slot in keep:
            cfg = slot.config
            flags = _FLAG_ENABLE_NOTIFICATION
            if cfg.secure and not cfg.install_mode:
                flags |= _FLAG_ENFORCE_SECURE
            info = osdp.PDInfo(cfg.address, self._channel, scbk=cfg.scbk,
                               name=f"pd{cfg.address}").get()
            info["flags"] = flags
            info["baud_rate"] = self.baudrate
            infos.append(info)
        # libosdp logs to stderr; warnings include a line per missed poll ("probing"), so
        # only errors go to the journal. Our own log lines carry the link state.
        osdp_sys.set_loglevel(osdp.LogLevel.Error)
        try:
            ctx = osdp_sys.ControlPanel(infos)
        except Exception as exc:  # libosdp raises a bare Exception for a bad set-up
            raise DeviceError(f"osdp bus {self.port}: libosdp set-up failed: {exc}") from exc
        ctx.set_event_callback(self._on_event)
        ctx.set_command_completion_callback(self._on_completion)
        for slot in self._slots:
            slot.index = -1
        self._ctx, self._slots = ctx, keep
        now = time.monotonic()
        for i, slot in enumerate(self._slots):
            slot.index = i
            slot.restart_requested = slot.disable_requested = False
            slot.begin_attempt(now)
            for _cmd, done, result in slot.pending:
                result.append(_ABANDONED)
                done.set()
            slot.pending.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"osdp-{self.port}",
                                            daemon=True)
            self._thread.start()
        self._cv.notify_all()

    def shutdown(self) -> None:
        """Stop the refresh thread and close the port; bounded by the thread's period."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)
        with self._cv:
            self._close_port()
            self._ctx = None
            for slot in self._slots:
                slot.index = -1

    def _close_port(self) -> None:
        port, self._serial = self._serial, None
        self._channel = None
        if port is not None:
            try:
                port.close()
            except OSError as exc:
                _log.warning("osdp_port_close_failed", port=self.port, error=str(exc))

    # -- the refresh thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._cv:
                    ctx, channel = self._ctx, self._channel
                    if self.failure is not None:
                        self._recover()
                    elif ctx is not None and channel is not None:
                        ctx.refresh()
                        self._supervise(ctx, channel)
            except Exception as exc:  # noqa: BLE001 - the bus thread's one broad boundary
                _log.error("osdp_bus_failed", port=self.port, error=str(exc))
                self._fail(f"libosdp failed: {exc}")
            self._stop.wait(_REFRESH_S)

    def _fail(self, reason: str) -> None:
        with self._cv:
            if self.failure is None:
                self.failure = reason
                self._failed_at = time.monotonic()
                _log.error("osdp_port_failed", port=self.port, error=reason)
            self._cv.notify_all()

    def _recover(self) -> None:
        """Reopen a failed port every ``_RETRY_S`` while the bus has users: readers get
        reopened by the agent, but nothing reopens a lock output (a door worker keeps
        its relay), so the bus heals itself."""
        if time.monotonic() - self._failed_at < _RETRY_S:
            return
        self._close_port()
        try:
            self._open_port()
        except DeviceError as exc:
            self._failed_at = time.monotonic()
            _log.warning("osdp_port_reopen_failed", port=self.port, error=str(exc))
            return
        self._rebuild()
        _log.info("osdp_port_reopened", port=self.port)

    def _supervise(self, ctx: Any, channel: _PortChannel) -> None:
        if channel.error is not None:
            self._fail(channel.error)
            return
        now = time.monotonic()
        online, sc = ctx.status(), ctx.sc_status()
        for slot in self._slots:
            if slot.index >= 0:
                self._service(ctx, slot, bool(online >> slot.index & 1),
                              bool(sc >> slot.index & 1), now)

    def _service(self, ctx: Any, slot: _Slot, online: bool, sc: bool, now: float) -> None:
        i = slot.index
        if slot.disable_requested:
            if ctx.is_pd_enabled(i):
                ctx.disable_pd(i)
            slot.disable_requested = False
            self._set_state(slot, LinkState.DISABLED, None, now)
            return
        if slot.restart_requested:
            if ctx.is_pd_enabled(i):
                ctx.disable_pd(i)  # takes effect in the next refresh; enable after it
                return
            ctx.enable_pd(i)
            slot.restart_requested = False
            slot.begin_attempt(now)
            self._cv.notify_all()
            return
        if slot.state is LinkState.DISABLED:
            return
        slot.sc_active = sc
        if online:
            if slot.config.secure and (not sc or slot.sc_scbkd):
                # Only reachable in install mode (ENFORCE_SECURE is off there): libosdp
                # fell back to plain text. Stop talking to the PD at once.
                ctx.disable_pd(i)
                self._set_state(slot, LinkState.FAILED, "Secure Channel failed and the PD "
                                "came online in plain text: refused", now)
                _log.error("osdp_plain_text_refused", port=self.port,
                           address=slot.config.address, reader=slot.who)
            elif slot.state is not LinkState.ONLINE:
                self._went_online(ctx, slot, now)
        elif slot.state is LinkState.ONLINE or (
                slot.state is LinkState.CONNECTING and slot.offline_notified):
            self._set_state(slot, LinkState.OFFLINE, self._diagnose(slot, now), now)
        elif (slot.state in (LinkState.OFFLINE, LinkState.FAILED) and slot.members
              and now - slot.state_since >= _RETRY_S):
            self._restart(slot)

    def _went_online(self, ctx: Any, slot: _Slot, now: float) -> None:
        try:
            slot.pd_id = dict(ctx.get_pd_id(slot.index))
        except Exception:  # noqa: BLE001 - identification is informative only
            slot.pd_id = None
        slot.caps = {}
        for cap in (_CAP_OUTPUT, _CAP_LED, _CAP_AUDIBLE):
            try:
                level, items = ctx.check_capability(slot.index, cap)
            except Exception:  # noqa: BLE001 - an unreported capability reads as absent
                level, items = 0, 0
            slot.caps[cap] = (int(level), int(items))
        self._set_state(slot, LinkState.ONLINE, None, now)
        stats = slot.stats
        if slot.config.install_mode and _CMD_KEYSET in stats.sent:
            _log.warning("osdp_key_installed", port=self.port, address=slot.config.address,
                         reader=slot.who, scbkd_used=stats.scbkd_challenge,
                         hint="the PD now holds the site key: set install_mode = false")
        # Ask for tamper and power now: a PD reports them unasked only when they change.
        # libosdp takes a PD offline for any NAK to a command, so a PD that refused
        # osdp_LSTAT once is not asked again.
        if not slot.lstat_refused:
            ctx.submit_command(slot.index, {"command": _CMD_STATUS, "type": _STATUS_LOCAL})
        for output_no, code in slot.outputs.items():
            ctx.submit_command(slot.index, _output_command(output_no, code))

    def _set_state(self, slot: _Slot, state: LinkState, reason: str | None,
                   now: float) -> None:
        if slot.state is state:
            return
        before = slot.state
        slot.state, slot.state_since, slot.reason = state, now, reason
        if state is LinkState.ONLINE:
            ident = slot.pd_id or {}
            _log.info("osdp_pd_online", port=self.port, address=slot.config.address,
                      reader=slot.who, secure=slot.sc_active,
                      ms=round((now - slot.attempt_started) * 1000), **{
                          k: ident[k] for k in ("vendor_code", "model", "serial_number")
                          if k in ident})
        elif state in (LinkState.OFFLINE, LinkState.FAILED):
            _log.warning("osdp_pd_offline", port=self.port, address=slot.config.address,
                         reader=slot.who, was=before.value, reason=reason)
        self._cv.notify_all()

    def _diagnose(self, slot: _Slot, now: float) -> str:  # noqa: PLR0911 - a decision table
        """Why the handshake failed or the PD went away, from what the wire showed."""
        s, secure = slot.stats, slot.config.secure
        if s.refused is not None:
            return (f"the PD refused command 0x{s.refused[0]:02X} (NAK {s.refused[1]}), "
                    "and libosdp takes a PD offline for that")
        if slot.state is LinkState.ONLINE:
            return f"the PD stopped answering (no reply for {now - s.last_reply:.1f} s)"
        if s.replies == 0:
            return "no answer from the PD (check wiring, address, baud rate)"
        if secure:
            if _REPLY_CCRYPT in s.got and _CMD_SCRYPT not in s.sent:
                return ("Secure Channel failed: key mismatch (the PD's cryptogram does not "
                        "verify with the configured SCBK)")
            if _CMD_SCRYPT in s.sent and s.nak_codes:
                return ("Secure Channel failed: key mismatch (the PD refused the CP's "
                        f"cryptogram, NAK {s.nak_codes[-1]})")
            if _CMD_CHLNG in s.sent and _REPLY_CCRYPT not in s.got:
                nak = f" (NAK {s.nak_codes[-1]})" if s.nak_codes else ""
                return ("Secure Channel failed: the PD refused the challenge" + nak
                        + "; is SC enabled on it?")
            if _REPLY_PDCAP in s.got and _CMD_CHLNG not in s.sent:
                return "Secure Channel failed: the PD does not offer Secure Channel"
            return "Secure Channel failed"
        return "the PD answered but did not complete the handshake"

    # -- what libosdp and the wire tell us (refresh thread, lock held) -----------------

    def _slot_at(self, address: int) -> _Slot | None:
        return next((s for s in self._slots if s.config.address == address
                     and s.index >= 0), None)

    def _on_rx(self, data: bytes) -> None:
        for frame in self._rx.feed(data):
            slot = self._slot_at(frame.address)
            if slot is None or not frame.reply:
                continue
            s = slot.stats
            s.replies += 1
            s.last_reply = time.monotonic()
            s.got.add(frame.code)
            if frame.code == _REPLY_NAK and frame.scb_type not in (0x17, 0x18) and frame.data:
                s.nak_codes.append(frame.data[0])
                if s.last_command not in (_CMD_CHLNG, _CMD_SCRYPT, 0x60, 0x61, 0x62):
                    s.refused = (s.last_command, frame.data[0])
                if s.last_command == _CMD_LSTAT:
                    slot.lstat_refused = True

    def _on_tx(self, data: bytes) -> None:
        for frame in self._tx.feed(data):
            slot = self._slot_at(frame.address)
            if slot is None or frame.reply:
                continue
            s = slot.stats
            s.sent.add(frame.code)
            s.last_command = frame.code
            if frame.code == _CMD_CHLNG and frame.scb_data[:1] == b"\x00":
                s.scbkd_challenge = True

    def _on_event(self, index: int, event: dict[str, Any]) -> int:
        try:
            slot = self._slots[index]
            kind = event.get("event")
            if kind == _EVENT_NOTIFICATION:
                if event.get("type") == _NOTIFY_PD_STATUS and not event.get("arg0"):
                    slot.offline_notified = True
                elif event.get("type") == _NOTIFY_SC_STATUS:
                    slot.sc_active = bool(event.get("arg0"))
                    slot.sc_scbkd = bool(event.get("arg0")) and event.get("arg1") == 1
            elif kind == _EVENT_STATUS:
                self._on_status(slot, event)
            elif kind in (_EVENT_CARDREAD, _EVENT_KEYPRESS):
                self._on_input(slot, event)
        except Exception as exc:  # noqa: BLE001 - an exception must not reach libosdp
            _log.error("osdp_event_failed", port=self.port, error=str(exc))
        return 0

    def _on_input(self, slot: _Slot, event: dict[str, Any]) -> None:
        if slot.config.secure and (not slot.sc_active or slot.sc_scbkd):
            _log.warning("osdp_event_dropped", port=self.port, address=slot.config.address,
                         reason="not_secure")
            return
        if slot.events is None:
            return  # no reader attached: a card at a PD used only for its outputs
        try:
            slot.events.put_nowait(event)
        except queue.Full:
            _log.warning("osdp_event_dropped", port=self.port, address=slot.config.address,
                         reader=slot.who, reason="queue_full")

    def _on_status(self, slot: _Slot, event: dict[str, Any]) -> None:
        kind, report = event.get("type"), event.get("report") or b""
        if kind in (_STATUS_LOCAL, _STATUS_REMOTE):
            where = "local" if kind == _STATUS_LOCAL else "remote"
            for i, (name, log_name) in enumerate((("tamper", "reader_tamper"),
                                                  ("power", "reader_power"))):
                if i >= len(report):
                    break
                key = name if where == "local" else f"remote_{name}"
                active = bool(report[i])
                previous = slot.status.get(key)
                slot.status[key] = active
                if previous != active and (active or previous is not None):
                    # power: OSDP reports 1 for a power failure, 0 for normal.
                    (_log.warning if active else _log.info)(
                        log_name, reader=slot.who, port=self.port,
                        address=slot.config.address, source=where, active=active)
        elif kind in (_STATUS_INPUT, _STATUS_OUTPUT):
            slot.status["inputs" if kind == _STATUS_INPUT else "outputs"] = list(report)

    def _on_completion(self, index: int, command: dict[str, Any], status: int) -> None:
        try:
            slot = self._slots[index]
            for entry in slot.pending:
                cmd, done, result = entry
                if cmd == command:
                    slot.pending.remove(entry)
                    result.append(status)
                    done.set()
                    break
        except Exception as exc:  # noqa: BLE001 - an exception must not reach libosdp
            _log.error("osdp_completion_failed", port=self.port, error=str(exc))

    # -- for readers and relays ---------------------------------------------------------

    def check(self, slot: _Slot, what: str, grace: float) -> None:
        """Raise DeviceError unless the PD is online or its handshake started less than
        ``grace`` seconds ago (another address joining the bus restarts every one)."""
        with self._cv:
            if self.failure is not None:
                raise DeviceError(f"{what}: {self.port} failed: {self.failure}")
            if slot.state is LinkState.ONLINE:
                return
            if slot.state in (LinkState.OFFLINE, LinkState.FAILED):
                raise DeviceError(f"{what}: {self.port} address {slot.config.address} "
                                  f"offline: {slot.reason}")
            if slot.state is LinkState.DISABLED or slot.index < 0:
                raise DeviceError(f"{what}: {self.port} address {slot.config.address} "
                                  "is not open")
            if time.monotonic() - slot.attempt_started > grace:
                raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                                  + self._diagnose(slot, time.monotonic()))

    def wait_online(self, slot: _Slot, timeout: float, what: str) -> None:
        """Return once the PD is online (SC active when required), or raise DeviceError
        naming the port, the address and the reason."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                if self.failure is not None:
                    raise DeviceError(f"{what}: {self.port} failed: {self.failure}")
                if slot.state is LinkState.ONLINE:
                    return
                if slot.state in (LinkState.OFFLINE, LinkState.FAILED):
                    raise DeviceError(f"{what}: {self.port} address "
                                      f"{slot.config.address}: {slot.reason}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = self._diagnose(slot, time.monotonic())
                    raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                                      f"{reason} (not online after {timeout:g} s)")
                self._cv.wait(remaining)

    def snapshot(self, slot: _Slot) -> dict[str, Any]:
        """The slot's link and PD status, copied under the lock."""
        with self._cv:
            return {"online": slot.state is LinkState.ONLINE and self.failure is None,
                    "secure": slot.sc_active, "state": slot.state.value,
                    "reason": self.failure or slot.reason, **slot.status}

    def submit(self, slot: _Slot, command: dict[str, Any], what: str) -> None:
        """Queue ``command`` for the PD; DeviceError when it is not online."""
        with self._cv:
            self._submit(slot, command, what)

    def _submit(self, slot: _Slot, command: dict[str, Any], what: str) -> None:
        if self.failure is not None or slot.state is not LinkState.ONLINE or self._ctx is None:
            raise DeviceError(f"{what}: {self.port} address {slot.config.address} is not "
                              f"online ({self.failure or slot.reason or slot.state.value})")
        if not self._ctx.submit_command(slot.index, command):
            raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                              "libosdp refused the command")

    def set_output(self, slot: _Slot, output_no: int, code: int, what: str) -> None:
        """Drive an output and wait until the PD acknowledged it."""
        command = _output_command(output_no, code)
        done, result = threading.Event(), list[int]()
        with self._cv:
            slot.outputs[output_no] = code
            level, items = slot.caps.get(_CAP_OUTPUT, (0, 0))
            if slot.state is LinkState.ONLINE and (level == 0 or output_no >= items):
                raise DeviceError(f"{what}: {self.port} address {slot.config.address}: the "
                                  f"PD announces {items if level else 0} outputs, "
                                  f"no output {output_no}")
            self._submit(slot, command, what)
            slot.pending.append((command, done, result))
        if not done.wait(_OUTPUT_CONFIRM_S):
            with self._cv:
                for entry in list(slot.pending):
                    if entry[1] is done:
                        slot.pending.remove(entry)
            raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                              f"output {output_no} not acknowledged")
        if result[0] == _ABANDONED:
            raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                              f"output {output_no} not confirmed: the bus restarted")
        if result[0] != _COMPLETION_OK:
            raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                              f"output {output_no} failed (status {result[0]})")


def _output_command(output_no: int, code: int) -> dict[str, Any]:
    return {"command": _CMD_OUTPUT, "output_no": output_no, "control_code": code,
            "timer_count": 0}


_REGISTRY_LOCK = threading.Lock()
_BUSES: dict[str, _Bus] = {}
"""Open buses by the real path of their port: a by-id link and its /dev/ttyUSBn are one."""


def _attach(options: OsdpOptions, config: PdConfig, member: object) -> tuple[_Bus, _Slot]:
    key = os.path.realpath(options.port)
    with _REGISTRY_LOCK:
        bus = _BUSES.get(key)
        if bus is None:
            bus = _BUSES[key] = _Bus(key, options.port, options.baudrate)
        elif bus.baudrate != options.baudrate:
            raise DeviceError(f"osdp bus {options.port}: already open at {bus.baudrate} "
                              f"baud, not {options.baudrate}")
        try:
            return bus, bus.attach(config, member)
        except BaseException:
            if bus.empty:
                _BUSES.pop(key, None)
                bus.shutdown()
            raise


def _detach(bus: _Bus, slot: _Slot, member: object) -> None:
    with _REGISTRY_LOCK:
        bus.detach(slot, member)
        if bus.empty:
            if _BUSES.get(bus.key) is bus:
                del _BUSES[bus.key]
            bus.shutdown()


def _pd_config(options: OsdpOptions) -> PdConfig:
    scbk = load_scbk(options.scbk_file) if options.secure and options.scbk_file else None
    if options.install_mode:
        _log.warning("osdp_install_mode", port=options.port, address=options.address,
                     risk="the key is sent under the public SCBK-D; bench or closed line "
                          "only, then set install_mode = false")
    return PdConfig(options.address, options.secure, scbk, options.install_mode)


# --- the drivers ---------------------------------------------------------------------------


class OsdpReader(Reader):
    """An OSDP reader (PD) at one address on an RS-485 line; the agent is the CP."""

    Options = OsdpReaderOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._bus: _Bus | None = None
        self._slot: _Slot | None = None
        self._pin = self._new_pin()
        self._pending: deque[CardRead] = deque()

    def _new_pin(self) -> PinAssembler:
        return PinAssembler(self.options.pin_max_digits, self.options.pin_timeout_s)

    @property
    def _what(self) -> str:
        return f"osdp reader {self.name}"

    def open(self) -> None:
        """Join the line's bus and wait (``open_timeout_s``) for the PD to be online, with
        Secure Channel unless ``secure = false``; DeviceError names port, address, reason."""
        self.close()
        _libosdp()
        config = _pd_config(self.options)
        bus, slot = _attach(self.options, config, self)
        try:
            bus.wait_online(slot, self.options.open_timeout_s, self._what)
        except BaseException:
            _detach(bus, slot, self)
            raise
        self._bus, self._slot = bus, slot
        self._pin = self._new_pin()
        self._pending.clear()
        self.rejected = 0

    def read(self, timeout: float) -> CardRead | None:
        """The next card (or PIN) read, or None after about ``timeout`` seconds; raises
        DeviceError when the PD is offline or the port failed."""
        bus, slot = self._bus, self._slot
        if bus is None or slot is None:
            raise DeviceError(f"{self._what}: not open")
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            bus.check(slot, self._what, self.options.open_timeout_s)
            if self._pending:
                return self._pending.popleft()
            events = slot.events
            if events is None:
                raise DeviceError(f"{self._what}: not open")
            remaining = deadline - time.monotonic()
            try:
                # Wake at least every 0.1 s to notice the PD going offline.
                event = events.get(timeout=min(max(remaining, 0.0), 0.1))
            except queue.Empty:
                if remaining <= 0:
                    return None
                continue
            self._decode(event)

    def _decode(self, event: dict[str, Any]) -> None:
        if event.get("event") == _EVENT_CARDREAD:
            try:
                self._pending.append(CardRead(card_id(event)))
            except ValueError as exc:
                self._refuse(str(exc), len(event.get("data") or b""))
            return
        if not self.options.keypad:
            return
        for entry in self._pin.feed(event.get("data") or b"", time.monotonic()):
            if isinstance(entry, Pin):
                self._pending.append(CardRead(f"pin:{entry.digits}"))
            else:
                self._refuse(f"pin_{entry.reason}", entry.length)

    def _refuse(self, reason: str, length: int) -> None:
        self.rejected += 1
        _log.warning("reader_frame_rejected", reader=self.name, reason=reason, length=length)

    def feedback(self, granted: bool) -> None:
        """Green LED for a grant, red plus a short beep for a deny, for 500 ms."""
        bus, slot = self._bus, self._slot
        if bus is None or slot is None:
            raise DeviceError(f"{self._what}: not open")
        # A command the PD does not support is NAK'd, and libosdp then takes the PD
        # offline: send only what PDCAP announced.
        if slot.caps.get(_CAP_LED, (0, 0))[0] > 0:
            self._led(bus, slot, granted)
        if not granted and slot.caps.get(_CAP_AUDIBLE, (0, 0))[0] > 0:
            bus.submit(slot, {"command": _CMD_BUZZER, "reader": 0, "control_code": 2,
                              "on_count": _DENY_BEEP_100MS, "off_count": 0, "rep_count": 1},
                       self._what)

    def _led(self, bus: _Bus, slot: _Slot, granted: bool) -> None:
        bus.submit(slot, {
            "command": _CMD_LED, "reader": 0, "led_number": 0, "temporary": True,
            "control_code": 2,  # temporary state, start the timer (osdp_LED, table 24)
            "on_color": _LED_GREEN if granted else _LED_RED, "off_color": _LED_NONE,
            "on_count": _FEEDBACK_100MS, "off_count": 0, "timer_count": _FEEDBACK_100MS,
        }, self._what)

    @property
    def status(self) -> dict[str, Any]:
        """Link and PD status: ``online``, ``secure``, ``state``, ``reason``, and
        ``tamper`` / ``power`` (True = tamper / power failure) once the PD reported them."""
        bus, slot = self._bus, self._slot
        if bus is None or slot is None:
            return {"online": False, "secure": False, "state": "closed", "reason": None}
        return bus.snapshot(slot)

    def alarms(self) -> dict[str, bool]:
        """The PD's local tamper and power-failure reports (osdp_LSTATR)."""
        status = self.status
        return {key: bool(status[key]) for key in ("tamper", "power") if key in status}

    def close(self) -> None:
        """Leave the bus (the last user closes the port); safe to call twice."""
        bus, slot = self._bus, self._slot
        self._bus = self._slot = None
        if bus is not None and slot is not None:
            _detach(bus, slot, self)


class OsdpRelay(Relay):
    """An output of an OSDP PD (``osdp_OUT``) driving a lock."""

    Options = OsdpRelayOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._bus: _Bus | None = None
        self._slot: _Slot | None = None

    @property
    def _what(self) -> str:
        return f"osdp output {self.name}"

    def open(self) -> None:
        """Join the line's bus and wait for the PD to be online (SC when required)."""
        self.close()
        _libosdp()
        config = _pd_config(self.options)
        bus, slot = _attach(self.options, config, self)
        try:
            bus.wait_online(slot, self.options.open_timeout_s, self._what)
        except BaseException:
            _detach(bus, slot, self)
            raise
        self._bus, self._slot = bus, slot

    def set(self, unlocked: bool) -> None:
        """Set the output permanently ON or OFF (``active_high`` maps unlocked to ON) and
        wait for the PD's acknowledgement; the state is re-sent if the PD reconnects."""
        bus, slot = self._bus, self._slot
        if bus is None or slot is None:
            raise DeviceError(f"{self._what}: not open")
        on = unlocked == self.options.active_high
        # control code 2: permanent ON, 1: permanent OFF, both abort a timed operation.
        bus.set_output(slot, self.options.output_no, 2 if on else 1, self._what)

    def close(self) -> None:
        """Leave the bus; safe to call twice."""
        bus, slot = self._bus, self._slot
        self._bus = self._slot = None
        if bus is not None and slot is not None:
            _detach(bus, slot, self)
