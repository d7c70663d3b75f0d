"""The OSDP driver (agent = Control Panel) against libosdp's own Peripheral Device.

The driver opens the slave end of a real pseudo-terminal with pyserial; the test runs
libosdp ``PeripheralDevice`` objects on the master end. ``Line`` plays the RS-485 wire:
every byte the CP sends reaches every PD, each PD answers only its own address (libosdp
checks it, as a real multi-drop PD does), and the replies go back to the CP. The line also
records every frame the CP sent and every frame a PD sent, so tests can say what crossed
the wire in plain text.

A pty moves each write whole and at once. The tests marked "byte-paced" put
tests/line_relay.py between the driver and the line instead: bytes cross at the pace of
the baud rate and reach the driver a few at a time, as from a real RS-485 adapter. There
the line hands each PD whole commands (``_WholeCommands``), as a reader's firmware does:
libosdp 3.2.9's PD loses a split command exactly as its CP loses a split reply (see
drivers/osdp/frames.py), and that flaw is the peer's, not the one under test.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import osdp  # type: ignore[import-untyped]
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

import drivers.osdp.bus as osdp_bus
import drivers.osdp.devices as osdp_devices
from agent.runtime import Agent
from agent.store import CredentialEntry
from drivers.base import CardRead, DeviceError, Reader, Relay
from drivers.osdp import (
    SCBK_D,
    Frame,
    FrameAssembler,
    FrameScanner,
    OsdpReader,
    OsdpReaderOptions,
    OsdpRelay,
    Pin,
    PinAssembler,
    PinRejected,
    card_id,
    crc16,
    interchar_gap_s,
    load_scbk,
    parse_frame,
)
from drivers.osdp.evidence import LinkEvidence, diagnose
from drivers.registry import DriverError, check_options
from drivers.simulated import SimBus
from protocol.hashing import CredentialHasher
from tests.agentconf import KEY, DoorSpec, ReaderSpec, agent_config
from tests.conftest import wait_for
from tests.line_relay import LineRelay
from tests.test_reader_contract import ReaderContract
from tests.test_relay_contract import RelayContract

SCBK = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
WRONG_SCBK = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
CARD_26 = bytes([0x12, 0x34, 0x56, 0x40])
"""The 26-bit Wiegand read of hardware-facts.md 1.2; its id is osdp:26:12345640."""
WAIT_S = 10.0
"""Bound of every wait for something that normally takes milliseconds."""
OFFLINE_WAIT_S = 20.0
"""libosdp gives up on a silent PD after 8 probes, about 8.4 s here."""

GREEN, RED = osdp.CommandLEDColor.Green, osdp.CommandLEDColor.Red

# Commands as the CP sends them and replies as a PD sends them (SIA OSDP 2.2, tables 5, 6).
CMD_ID, CMD_CAP, CMD_CHLNG, CMD_SCRYPT = 0x61, 0x62, 0x76, 0x77
REPLY_PDID, REPLY_PDCAP, REPLY_CCRYPT = 0x45, 0x46, 0x76

CHLNG = bytes.fromhex("536513000c031101760eb1b9f221b175d2143b")
"""An osdp_CHLNG recorded from a libosdp session (hardware-facts.md 1.3): 19 bytes, CRC."""
CCRYPT = bytes.fromhex("53e52b000c03120176beba0100afbeadded764c8cce93255c47a6f115c867a2e"
                       "ae3545a836a3f897f3d4c4")
"""The osdp_CCRYPT answering it: 43 bytes, 45 ms at 9600 baud."""
BAUD_RATES = [9600, 19200, 38400, 57600, 115200]
"""Every rate the driver accepts, for the byte-paced tests: 9600 is the default and the
usual rate of installed readers."""


class _PdChannel:
    """One PD's view of the line: libosdp's channel callbacks."""

    def __init__(self, line: Line, address: int) -> None:
        self.id = 0
        self._line = line
        self._address = address

    def read(self, max_bytes: int) -> bytes:
        """What the CP sent that this PD has not read yet."""
        return self._line.take(self._address, max_bytes)

    def write(self, buf: bytes) -> int:
        """A reply onto the line."""
        return self._line.put(buf)

    def flush(self) -> None:
        """Drop this PD's unread input."""
        self._line.drop(self._address)


class EmulatedPd:
    """A libosdp PeripheralDevice on the line; collects the commands it receives."""

    CAPS: ClassVar[list[tuple[int, int, int]]] = [
        (osdp.Capability.OutputControl, 1, 2), (osdp.Capability.LEDControl, 1, 1),
        (osdp.Capability.AudibleControl, 1, 1), (osdp.Capability.CardDataFormat, 1, 1)]

    def __init__(self, line: Line, address: int, scbk: bytes | None, flags: list[int]) -> None:
        self.address = address
        self.commands: list[dict[str, Any]] = []
        info = osdp.PDInfo(address, _PdChannel(line, address), scbk=scbk, flags=flags)
        self._pd = osdp.PeripheralDevice(info, osdp.PDCapabilities(self.CAPS),
                                         log_level=osdp.LogLevel.Error,
                                         command_handler=self._on_command)
        self.running = False

    def _on_command(self, command: dict[str, Any]) -> tuple[int, None]:
        self.commands.append(command)
        return 0, None

    def start(self) -> None:
        """Start answering."""
        self._pd.start()
        self.running = True

    def stop(self) -> None:
        """Stop answering, as when the reader loses power."""
        if self.running:
            self.running = False
            self._pd.teardown()

    @property
    def sc_active(self) -> bool:
        """Whether the PD has a Secure Channel session."""
        return bool(self._pd.is_sc_active())

    def card(self, data: bytes = CARD_26, bits: int = 26) -> None:
        """Present a card: the PD reports it as osdp_RAW (Wiegand)."""
        self._pd.submit_event({"event": osdp.Event.CardRead, "reader_no": 0, "direction": 0,
                               "length": bits, "format": osdp.CardFormat.Wiegand,
                               "data": data})

    def keys(self, keys: bytes) -> None:
        """Key presses: the PD reports them as osdp_KEYPAD."""
        self._pd.submit_event({"event": osdp.Event.KeyPress, "reader_no": 0, "data": keys})

    def local_status(self, tamper: bool, power_failure: bool) -> None:
        """Report tamper and power (osdp_LSTATR)."""
        self._pd.submit_event({"event": osdp.Event.Status,
                               "type": osdp.StatusReportType.Local,
                               "report": bytes([tamper, power_failure])})

    def received(self, command: int, **fields: Any) -> list[dict[str, Any]]:
        """The commands of type ``command`` received so far that have ``fields``."""
        return [c for c in list(self.commands) if c["command"] == command
                and all(c.get(k) == v for k, v in fields.items())]

    def saw(self, command: int, **fields: Any) -> bool:
        """Whether a command of type ``command`` with ``fields`` has arrived."""
        return bool(self.received(command, **fields))

    def saw_led(self, colour: int) -> bool:
        """Whether an LED command with ``colour`` as its on colour has arrived."""
        return self.saw(osdp.Command.LED, on_color=colour)


class _WholeCommands:
    """Cuts the CP's byte stream into whole frames by SOM and length, as a reader's firmware
    does before its OSDP stack sees them. Written apart from the driver's FrameAssembler on
    purpose, and without checks: the PD's libosdp checks each frame itself."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The frames (with the mark byte before them, if any) completed by ``data``."""
        self._buf += data
        out: list[bytes] = []
        while (som := self._buf.find(0x53)) >= 0:
            begin = som - 1 if som and self._buf[som - 1] == 0xFF else som
            del self._buf[:begin]
            som -= begin
            if len(self._buf) < som + 4:
                return out
            length = self._buf[som + 2] | self._buf[som + 3] << 8
            if length < 7:
                del self._buf[:som + 1]
                continue
            if len(self._buf) < som + length:
                return out
            out.append(bytes(self._buf[:som + length]))
            del self._buf[:som + length]
        self._buf.clear()
        return out


class Line:
    """The RS-485 wire with the PDs on it: a pty's master end, or the device end of a
    byte-paced ``LineRelay`` (then each PD is handed whole commands)."""

    def __init__(self, relay: LineRelay | None = None) -> None:
        self._slave: int | None = None
        if relay is None:
            self.master, self._slave = os.openpty()
            # Raw at once, so nothing is echoed or translated before pyserial sets it up.
            tty.setraw(self._slave)
            os.set_blocking(self.master, False)
            self.path = os.ttyname(self._slave)
        else:
            self.master, self.path = relay.device_fd, relay.host_path
        self.relay = relay
        self._commands = _WholeCommands() if relay is not None else None
        self._lock = threading.Lock()
        self._inbox: dict[int, bytearray] = {}
        self._scanner = FrameScanner()
        self._reply_scanner = FrameScanner()
        self.sent: list[Frame] = []
        """Every frame the CP has sent, in order."""
        self.replies: list[Frame] = []
        """Every frame a PD has sent, in order."""
        self.pds: list[EmulatedPd] = []
        self._open = True

    def add_pd(self, address: int, scbk: bytes | None = SCBK, *, enforce: bool = True,
               install: bool = False, start: bool = True) -> EmulatedPd:
        """A PD at ``address``; with a key and ``enforce`` it accepts only Secure Channel."""
        flags = []
        if enforce and scbk is not None:
            flags.append(osdp.LibFlag.EnforceSecure)
        if install:
            flags.append(osdp.LibFlag.InstallMode)
        with self._lock:
            self._inbox[address] = bytearray()
        pd = EmulatedPd(self, address, scbk, flags)
        self.pds.append(pd)
        if start:
            pd.start()
        return pd

    def _pump(self) -> None:
        while self._open:
            try:
                data = os.read(self.master, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EIO while no one holds the slave end: nothing to read
                return
            if not data:
                return
            chunks = [data] if self._commands is None else self._commands.feed(data)
            for chunk in chunks:
                for inbox in self._inbox.values():
                    inbox.extend(chunk)
            self.sent += self._scanner.feed(data)

    def take(self, address: int, max_bytes: int) -> bytes:
        """Bytes from the CP not yet read by the PD at ``address``."""
        with self._lock:
            self._pump()
            inbox = self._inbox[address]
            data = bytes(inbox[:max_bytes])
            del inbox[:max_bytes]
            return data

    def put(self, data: bytes) -> int:
        """A PD's reply towards the CP."""
        with self._lock:
            if not self._open:
                return 0
            try:
                sent = os.write(self.master, data)
            except (BlockingIOError, InterruptedError):
                return 0
            self.replies += self._reply_scanner.feed(data[:sent])
            return sent

    def drop(self, address: int) -> None:
        """Forget what the PD at ``address`` has not read."""
        with self._lock:
            self._inbox[address].clear()

    def sent_to(self, address: int) -> list[Frame]:
        """The frames the CP sent to ``address``."""
        with self._lock:
            self._pump()
            return [f for f in self.sent if f.address == address and not f.reply]

    def replies_from(self, address: int) -> list[Frame]:
        """The frames the PD at ``address`` sent."""
        with self._lock:
            return [f for f in self.replies if f.address == address and f.reply]

    def hang_up(self) -> None:
        """Close the wire's end, as when the USB adapter is pulled (pty line only: a
        relay's ends belong to the relay)."""
        with self._lock:
            if self._open:
                self._open = False
                if self.relay is None:
                    os.close(self.master)

    def close(self) -> None:
        """Stop every PD and release the pty's ends (a relay closes its own)."""
        for pd in self.pds:
            pd.stop()
        self.hang_up()
        if self._slave is not None:
            os.close(self._slave)


@pytest.fixture
def line(request: pytest.FixtureRequest) -> Iterator[Line]:
    """A fresh wire; every PD on it is stopped at teardown. Parametrised indirectly with
    a baud rate, the wire is byte-paced at that rate through a ``LineRelay``."""
    baudrate: int | None = getattr(request, "param", None)
    relay = LineRelay(baudrate).start() if baudrate is not None else None
    wire = Line(relay)
    try:
        yield wire
    finally:
        wire.close()
        if relay is not None:
            relay.stop()
            assert relay.error is None and relay.overruns == 0


@pytest.fixture
def key_file(tmp_path: Path) -> Callable[[bytes], str]:
    """Write a key file (mode 0600) and return its path."""
    def write(key: bytes, name: str = "reader.scbk") -> str:
        path = tmp_path / name
        path.write_text(key.hex() + "\n")
        path.chmod(0o600)
        return str(path)
    return write


Opened = Callable[..., Any]


@pytest.fixture
def devices(line: Line, key_file: Callable[..., str]) -> Iterator[Opened]:
    """Open OSDP readers (``kind="reader"``) or relays on the test's line, secure with
    SCBK unless told otherwise; all closed at teardown, before the line."""
    opened: list[OsdpReader | OsdpRelay] = []

    def open_device(kind: str = "reader", *, key: bytes | None = SCBK,
                    **options: Any) -> Any:
        opts: dict[str, Any] = {"port": line.path, "address": 1, **options}
        if line.relay is not None:
            opts.setdefault("baudrate", line.relay.baudrate)
        if key is not None:
            opts.setdefault("scbk_file", key_file(key, f"key-{len(opened)}"))
        else:
            opts["secure"] = False
        cls = OsdpReader if kind == "reader" else OsdpRelay
        dev = cls(f"{kind}-{len(opened)}", opts)
        opened.append(dev)
        dev.open()
        return dev

    yield open_device
    for dev in opened:
        dev.close()
    assert not osdp_devices._BUSES  # noqa: SLF001 - every bus closed with its last user


def read_error(reader: Reader) -> DeviceError | None:
    """The DeviceError one ``read(0.2)`` raises, or None when it returns."""
    try:
        reader.read(0.2)
    except DeviceError as exc:
        return exc
    return None


def read_id(reader: Reader) -> str | None:
    """The card id of the next read, or None after a generous wait."""
    got = reader.read(WAIT_S)
    return got.card_id if got else None


# --- pure parts ------------------------------------------------------------------------


def test_module_imports_and_validates_without_libosdp() -> None:
    """With libosdp absent, drivers.osdp imports and validates options; open() then says
    the extra is missing."""
    code = (
        "import sys; sys.modules['osdp'] = None; sys.modules['osdp_sys'] = None\n"
        "from drivers.osdp import OsdpReader\n"
        "from drivers.base import DeviceError\n"
        "r = OsdpReader('r', {'port': '/dev/null', 'address': 3, 'secure': False})\n"
        "try:\n    r.open()\nexcept DeviceError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert "libosdp is not installed" in out.stdout


def test_options_refuse_insecure_or_incomplete_setups() -> None:
    """Secure Channel is the default and needs a key file; plain text must be asked for
    explicitly; install mode needs SC; unknown keys and odd baud rates are refused."""
    base = {"port": "/dev/ttyUSB0", "address": 5}
    with pytest.raises(ValidationError, match="scbk_file is required"):
        OsdpReaderOptions.model_validate(base)
    assert OsdpReaderOptions.model_validate({**base, "scbk_file": "k"}).secure
    assert not OsdpReaderOptions.model_validate({**base, "secure": False}).secure
    for bad in ({"secure": False, "scbk_file": "k"}, {"secure": False, "install_mode": True},
                {"scbk_file": "k", "baudrate": 14400}, {"scbk_file": "k", "address": 127},
                {"scbk_file": "k", "colour": "green"}):
        with pytest.raises(ValidationError):
            OsdpReaderOptions.model_validate({**base, **bad})
    with pytest.raises(DriverError, match=r"readers\[0\]\.options\.pin_max_digits"):
        check_options("reader", "osdp", {**base, "secure": False, "pin_max_digits": 0},
                      "readers[0]")
    check_options("relay", "osdp", {**base, "scbk_file": "k", "output_no": 1}, "doors[0].relay")


def test_crc_and_recorded_frames_parse() -> None:
    """The CRC matches SIA OSDP Annex E, and frames recorded from a libosdp session
    (hardware-facts.md 1.3) parse to their address, direction and code, 0xFF mark skipped."""
    assert crc16(bytes.fromhex("53000900046100")) == 0x66C0
    frames = FrameScanner().feed(b"\xff\x53" + CHLNG + b"\xff" + CCRYPT[:10])
    assert [(f.address, f.reply, f.code, f.scb_type) for f in frames] == [
        (0x65, False, 0x76, 0x11)]
    assert parse_frame(CCRYPT) == Frame(0x65, True, 0x76, 0x12, b"\x01", CCRYPT[9:-2])
    assert parse_frame(CHLNG[:-1] + b"\x00") is None


GAP_9600 = interchar_gap_s(9600, 0.02)


def test_assembler_joins_a_frame_split_into_small_reads() -> None:
    """Fed a byte or a few at a time, the assembler returns each whole frame (mark byte
    kept) in the read that completes it, and nothing before."""
    stream = b"\xff" + CCRYPT + CHLNG
    assembler = FrameAssembler(GAP_9600)
    done: list[tuple[int, bytes]] = []
    pos, sizes = 0, [1, 3, 2, 4]
    while pos < len(stream):
        size = sizes[len(done) % 4] if pos else 1
        chunk = stream[pos:pos + size]
        done += [(pos + len(chunk), f) for f in assembler.feed(chunk, pos * 10 / 9600)]
        pos += len(chunk)
    assert done == [(1 + len(CCRYPT), b"\xff" + CCRYPT), (len(stream), CHLNG)]
    assert assembler.pending == 0 and assembler.noise == assembler.refused == 0


def test_assembler_resynchronises_on_noise_and_refuses_bad_frames() -> None:
    """Noise and marks before SOM are skipped; a false SOM with a length under 7 bytes,
    one over libosdp's 256-byte buffer, and a frame with a wrong CRC are each refused,
    and the good frame after each is still found."""
    assembler = FrameAssembler(GAP_9600)
    too_short = b"\x00\x99\x53\x00\x00\x00"
    oversized = b"\x53\x81\x00\x02\x04"  # length 0x0200 = 512
    bad_crc = CCRYPT[:-1] + bytes([CCRYPT[-1] ^ 0x01])
    stream = too_short + b"\xff\xff" + CCRYPT + oversized + CHLNG + bad_crc + CHLNG
    assert assembler.feed(stream, 0.0) == [b"\xff" + CCRYPT, CHLNG, CHLNG]
    assert assembler.refused == 3 and assembler.noise > 0 and assembler.pending == 0


def test_assembler_gives_up_a_truncated_frame_and_keeps_the_next() -> None:
    """A truncated frame never swallows the good frame after it (dropped once the line was
    silent for the inter-character gap, or at once when later bytes make it fail its CRC),
    while a pause shorter than the gap keeps a partial frame."""
    assembler = FrameAssembler(GAP_9600)
    assert assembler.feed(CCRYPT[:20] + CHLNG, 0.0) == []
    assert assembler.feed(b"", 0.5 * GAP_9600) == []
    assert assembler.feed(b"", 1.5 * GAP_9600) == [CHLNG]
    assert assembler.timed_out == 1 and assembler.pending == 0
    assert assembler.feed(CCRYPT[:20], 10.0) == []
    assert assembler.feed(CHLNG, 10.0 + 1.5 * GAP_9600) == [CHLNG]
    assert assembler.feed(CCRYPT[:20] + CHLNG + CCRYPT, 20.0) == [CHLNG, CCRYPT]
    assert assembler.feed(CCRYPT[:20], 30.0) == []
    assert assembler.feed(CCRYPT[20:], 30.0 + 0.9 * GAP_9600) == [CCRYPT]


def test_inter_character_gap_suits_each_baud_rate() -> None:
    """The gap allowed inside a frame is longer at slower rates, never under OSDP's
    nominal 20 ms plus one poll period, and well under libosdp's 200 ms reply timeout."""
    gaps = [interchar_gap_s(baud, 0.02) for baud in BAUD_RATES]
    assert gaps == sorted(gaps, reverse=True)
    assert all(0.04 < gap < 0.1 for gap in gaps)


def _frame(code: int, data: bytes = b"", *, reply: bool = True) -> Frame:
    return Frame(1, reply, code, None, b"", data)


def test_diagnosis_says_not_offered_only_when_pdcap_lacks_it() -> None:
    """After osdp_CAP was answered, a failure is reported as "does not offer Secure
    Channel" only if the PDCAP reply lacks AES-128 communication security; otherwise the
    reason names the step that failed (no handshake started, or a key mismatch)."""
    def evidence(pdcap: bytes, *more: Frame) -> LinkEvidence:
        ev = LinkEvidence()
        for frame in (_frame(CMD_ID, reply=False), _frame(REPLY_PDID, bytes(12)),
                      _frame(CMD_CAP, b"\x00", reply=False), _frame(REPLY_PDCAP, pdcap),
                      *more):
            if frame.reply:
                ev.reply(frame, 1.0)
            else:
                ev.command(frame)
        return ev
    with_sc, without_sc = bytes([8, 1, 0, 9, 1, 0, 10, 0, 1]), bytes([8, 1, 0, 10, 0, 1])
    said = diagnose(evidence(with_sc), secure=True, online=False, now=2.0)
    assert "does not offer" not in said and "after the PD's capability reply" in said
    said = diagnose(evidence(without_sc), secure=True, online=False, now=2.0)
    assert "does not offer Secure Channel" in said
    mismatch = evidence(with_sc, _frame(CMD_CHLNG, bytes(8), reply=False),
                        _frame(REPLY_CCRYPT, bytes(32)))
    said = diagnose(mismatch, secure=True, online=False, now=2.0)
    assert "key mismatch" in said and "does not offer" not in said


def test_card_ids_are_normalised() -> None:
    """Raw reads become osdp:<bits>:<HEX> with padding bits cleared; osdp_FMT text
    becomes osdp:fmt:<text>; malformed reads are refused with a reason."""
    def raw(data: bytes, bits: int, fmt: int = 1) -> dict[str, Any]:
        return {"event": 1, "format": fmt, "length": bits, "data": data}
    assert card_id(raw(CARD_26, 26)) == "osdp:26:12345640"
    assert card_id(raw(bytes([0x12, 0x34, 0x56, 0x7F]), 26)) == "osdp:26:12345640"
    assert card_id(raw(bytes.fromhex("67003b51c6"), 40, fmt=0)) == "osdp:40:67003B51C6"
    assert card_id({"event": 1, "format": 2, "data": b" 0012345 "}) == "osdp:fmt:0012345"
    for bad, reason in ((raw(CARD_26, 40), "length_mismatch"), (raw(b"", 0), "no_data"),
                        (raw(CARD_26, 26, fmt=9), "unknown_format"),
                        ({"event": 1, "format": 2, "data": b"a:b"}, "not_printable")):
        with pytest.raises(ValueError, match=reason):
            card_id(bad)


def test_pin_entry_assembly() -> None:
    """Digits up to # make a PIN; * clears; too many digits, a non-digit or a long pause
    refuse the entry without revealing it."""
    pins = PinAssembler(max_digits=4, timeout_s=5.0)
    assert pins.feed(b"12", 0.0) + pins.feed(b"34#", 1.0) == [Pin("1234")]
    assert pins.feed(b"9*56\r", 2.0) == [Pin("56")]
    assert pins.feed(b"12345#", 3.0) == [PinRejected("too_long", 5)]
    assert pins.feed(b"1A#", 4.0) == [PinRejected("not_digit", 2)]
    assert pins.feed(b"12", 5.0) + pins.feed(b"3#", 11.0) == [
        PinRejected("timeout", 2), Pin("3")]
    assert pins.feed(b"#", 12.0) == []


def test_key_file_checks(tmp_path: Path) -> None:
    """A key file holds 32 hex digits (blanks allowed); SCBK-D and zeros are refused;
    a file others can read is accepted with a warning."""
    path = tmp_path / "k"
    path.write_text("a0a1 a2a3 a4a5 a6a7\na8a9 aaab acad aeaf\n")
    path.chmod(0o600)
    with capture_logs() as logs:
        assert load_scbk(str(path)) == SCBK
    assert logs == []
    for text, reason in ((SCBK_D.hex(), "SCBK-D"), ("00" * 16, "all-zero"),
                         ("abcd", "32 hex digits"), ("zz" * 16, "32 hex digits")):
        path.write_text(text)
        with pytest.raises(DeviceError, match=reason):
            load_scbk(str(path))
    path.write_text(SCBK.hex())
    path.chmod(0o644)
    with capture_logs() as logs:
        load_scbk(str(path))
    assert [e["event"] for e in logs] == ["osdp_key_file_readable"]
    with pytest.raises(DeviceError, match="cannot read"):
        load_scbk(str(tmp_path / "missing"))


# --- against libosdp's PD: plain text ---------------------------------------------------


def test_plain_card_and_led_feedback(line: Line, devices: Opened) -> None:
    """Without SC (secure = false), a card at the PD arrives normalised, and feedback
    shows green for a grant and red plus a beep for a deny at the PD."""
    pd = line.add_pd(1, scbk=None)
    reader = devices(key=None)
    pd.card()
    got = reader.read(WAIT_S)
    assert isinstance(got, CardRead) and got.card_id == "osdp:26:12345640"
    assert reader.status["online"] and not reader.status["secure"]
    assert CMD_CHLNG not in {f.code for f in line.sent_to(1)}
    reader.feedback(True)
    wait_for(lambda: pd.saw_led(GREEN), "green LED")
    led = pd.received(osdp.Command.LED)[0]
    assert led["temporary"] and led["timer_count"] == 5
    assert not pd.saw(osdp.Command.Buzzer), "no beep on a grant"
    reader.feedback(False)
    wait_for(lambda: pd.saw_led(RED), "red LED")
    wait_for(lambda: pd.saw(osdp.Command.Buzzer), "deny beep")


def test_keypad_is_ignored_unless_enabled(line: Line, devices: Opened) -> None:
    """Key presses give no read by default; with keypad = true an entry ended by # is
    read as pin:<digits>."""
    pd = line.add_pd(1, scbk=None)
    reader = devices(key=None)
    pd.keys(b"1234#")
    pd.card()
    assert read_id(reader) == "osdp:26:12345640"
    reader.close()
    keypad = devices(key=None, keypad=True)
    pd.keys(b"12")
    pd.keys(b"34#")
    assert read_id(keypad) == "pin:1234"
    assert keypad.read(0.1) is None


# --- Secure Channel --------------------------------------------------------------------


def test_secure_channel_card_read(line: Line, devices: Opened) -> None:
    """With the same SCBK on both sides SC comes up, a card arrives, and nothing but the
    ID and CAP handshake ever went to the PD in plain text."""
    pd = line.add_pd(1, SCBK)
    reader = devices()
    assert reader.status["online"] and reader.status["secure"] and pd.sc_active
    pd.card()
    assert read_id(reader) == "osdp:26:12345640"
    reader.feedback(True)
    wait_for(lambda: pd.saw_led(GREEN), "green LED")
    plain = {f.code for f in line.sent_to(1) if f.scb_type is None}
    assert plain <= {CMD_ID, CMD_CAP}


def test_wrong_key_fails_without_plain_text_fallback(line: Line, devices: Opened) -> None:
    """With a wrong key on the CP, open() raises naming port, address and a key mismatch,
    and the PD never gets a command: nothing went to it but ID, CAP and the challenge."""
    pd = line.add_pd(1, SCBK)
    with pytest.raises(DeviceError) as err:
        devices(key=WRONG_SCBK)
    assert "key mismatch" in str(err.value)
    assert line.path in str(err.value) and "address 1" in str(err.value)
    sent = line.sent_to(1)
    assert {f.code for f in sent} <= {CMD_ID, CMD_CAP, CMD_CHLNG}
    assert CMD_CHLNG in {f.code for f in sent}
    assert not osdp_devices._BUSES  # noqa: SLF001 - the port is closed: nothing can follow
    assert pd.commands == [] and not pd.sc_active


def test_install_mode_sets_the_key_then_a_normal_session_works(
        line: Line, devices: Opened) -> None:
    """A PD without a key in install mode receives KEYSET with the site key from a CP in
    install mode; a PD holding that key then opens a normal enforced SC session."""
    fresh = line.add_pd(1, scbk=None, install=True)
    with capture_logs() as logs:
        installer = devices(install_mode=True)
    keyset = fresh.received(osdp.Command.Keyset)
    assert [k["data"] for k in keyset] == [SCBK] and keyset[0]["type"] == 1
    assert installer.status["secure"]
    events = [e["event"] for e in logs]
    assert "osdp_install_mode" in events and "osdp_key_installed" in events
    installer.close()
    fresh.stop()
    provisioned = line.add_pd(1, keyset[0]["data"])
    reader = devices()
    provisioned.card()
    assert read_id(reader) == "osdp:26:12345640"
    assert reader.status["secure"] and provisioned.sc_active


# --- a byte-paced line (tests/line_relay.py) -------------------------------------------


@pytest.mark.parametrize("line", BAUD_RATES, indirect=True)
def test_byte_paced_secure_channel_card_read(line: Line, devices: Opened) -> None:
    """With replies reaching the driver a few bytes at a time at the pace of the baud
    rate, the reader comes online with Secure Channel, a card read arrives, and feedback
    reaches the PD."""
    pd = line.add_pd(1, SCBK)
    reader = devices()
    assert reader.status["online"] and reader.status["secure"] and pd.sc_active
    pd.card()
    assert read_id(reader) == "osdp:26:12345640"
    reader.feedback(True)
    wait_for(lambda: pd.saw_led(GREEN), "green LED")


@pytest.mark.parametrize("line", [9600], indirect=True)
def test_byte_paced_wrong_key_is_a_key_mismatch(line: Line, devices: Opened) -> None:
    """At 9600 baud byte-paced, a PD that answered osdp_CAP but holds another key is
    reported as a key mismatch, never as a PD that does not offer Secure Channel."""
    line.add_pd(1, SCBK)
    with pytest.raises(DeviceError) as err:
        devices(key=WRONG_SCBK)
    said = str(err.value)
    assert "key mismatch" in said and "does not offer" not in said
    assert {REPLY_PDCAP, REPLY_CCRYPT} <= {f.code for f in line.replies_from(1)}


class _RawChannel:
    """libosdp's channel callbacks straight on a descriptor: the byte stream as it comes."""

    def __init__(self, fd: int) -> None:
        self.id = 0
        self._fd = fd

    def read(self, max_bytes: int) -> bytes:
        """What has arrived, up to ``max_bytes``."""
        try:
            return os.read(self._fd, max_bytes)
        except BlockingIOError:
            return b""

    def write(self, buf: bytes) -> int:
        """Send ``buf``."""
        return os.write(self._fd, buf)

    def flush(self) -> None:
        """Nothing to drop: the test reads everything."""


@pytest.mark.parametrize("line", [9600], indirect=True)
def test_libosdp_alone_loses_byte_paced_replies(line: Line) -> None:
    """Fed the raw byte stream at 9600 baud, libosdp 3.2.9's own CP does not take the
    PD's complete reply and asks again, the quirk the driver's frame assembler works
    around (should this fail, a newer libosdp has fixed it)."""
    line.add_pd(1, scbk=None)
    fd = os.open(line.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    cp = osdp.ControlPanel([osdp.PDInfo(1, _RawChannel(fd))], log_level=osdp.LogLevel.Error)
    cp.start()
    try:
        def asked_again() -> bool:
            codes = [f.code for f in line.sent_to(1)]
            return max(codes.count(CMD_ID), codes.count(CMD_CAP)) >= 2
        wait_for(asked_again, "osdp_ID or osdp_CAP sent a second time")
        assert not cp.is_online(1)
    finally:
        cp.stop()
        os.close(fd)
    assert REPLY_PDID in {f.code for f in line.replies_from(1)}


def test_line_relay_carries_bytes_intact_and_stops() -> None:
    """The test relay delivers every byte in order both ways, then stops its thread and
    closes its descriptors."""
    payload = bytes(range(256)) * 2
    with LineRelay(115200) as relay:
        host = os.open(relay.host_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(host)
        try:
            for source, sink in ((host, relay.device_fd), (relay.device_fd, host)):
                os.write(source, payload)
                got = bytearray()

                def arrived(sink: int = sink, got: bytearray = got) -> bool:
                    with contextlib.suppress(BlockingIOError):
                        got.extend(os.read(sink, 4096))
                    return len(got) >= len(payload)
                wait_for(arrived, "the payload at the other end")
                assert got == payload
        finally:
            os.close(host)
    assert relay.carried == 2 * len(payload) and relay.overruns == 0 and relay.error is None
    with pytest.raises(OSError):
        os.fstat(relay.device_fd)


# --- the bus: several PDs on one line ----------------------------------------------------


def test_two_readers_share_one_bus_on_a_multidrop_line(line: Line, devices: Opened) -> None:
    """Two PDs on one line, two readers on one bus: each reader gets its own PD's cards,
    feedback reaches only its own PD, and closing one leaves the other working."""
    pd1, pd2 = line.add_pd(1), line.add_pd(2, WRONG_SCBK)
    first = devices(address=1)
    second = devices(address=2, key=WRONG_SCBK)
    assert len(osdp_devices._BUSES) == 1  # noqa: SLF001 - one bus for the port
    pd2.card(bytes([0xAB, 0xCD, 0xEF, 0x00]))
    pd1.card()
    assert read_id(first) == "osdp:26:12345640"
    assert read_id(second) == "osdp:26:ABCDEF00"
    second.feedback(False)
    wait_for(lambda: pd2.saw(osdp.Command.Buzzer), "beep at PD 2")
    assert not pd1.saw(osdp.Command.LED) and not pd1.saw(osdp.Command.Buzzer)
    second.close()
    pd1.card(bytes([0, 0, 0, 0x40]))
    assert read_id(first) == "osdp:26:00000040"


def test_missing_pd_fails_alone_on_a_shared_bus(line: Line, devices: Opened) -> None:
    """A reader for an address nobody answers fails with "no answer" within its open
    timeout, while the reader of the PD that answers goes on reading on the same bus."""
    pd = line.add_pd(1)
    present = devices(address=1)
    with pytest.raises(DeviceError, match="address 3: no answer from the PD"):
        devices(address=3, open_timeout_s=1.5)
    pd.card()
    assert read_id(present) == "osdp:26:12345640"


def test_relay_drives_the_pd_output(line: Line, devices: Opened) -> None:
    """OsdpRelay.set(True/False) reaches the PD as osdp_OUT ON/OFF for output_no (inverted
    with active_high = false), on the same bus and address as the reader; an output the
    PD does not announce is refused."""
    pd = line.add_pd(1)
    reader = devices()
    relay = devices("relay", output_no=1)
    relay.set(True)
    relay.set(False)
    outs = pd.received(osdp.Command.Output)
    assert [(c["output_no"], c["control_code"]) for c in outs] == [(1, 2), (1, 1)]
    inverted = devices("relay", output_no=0, active_high=False)
    inverted.set(True)
    assert pd.received(osdp.Command.Output)[-1] == {"command": 1, "output_no": 0, "control_code": 1,
                                  "timer_count": 0}
    missing = devices("relay", output_no=7)
    with pytest.raises(DeviceError, match="no output 7"):
        missing.set(True)
    assert len(osdp_devices._BUSES) == 1  # noqa: SLF001 - reader and outputs share it
    pd.card()
    assert read_id(reader) == "osdp:26:12345640"


# --- status and failures -----------------------------------------------------------------


def test_tamper_and_power_reports_are_logged_and_exposed(line: Line, devices: Opened) -> None:
    """The status asked for at connect shows no tamper; a tamper and a power failure
    report are logged as reader_tamper / reader_power warnings and shown in status."""
    pd = line.add_pd(1)
    reader = devices()
    wait_for(lambda: reader.status.get("tamper") is False, "initial local status")
    with capture_logs() as logs:
        pd.local_status(tamper=True, power_failure=True)
        wait_for(lambda: reader.status.get("tamper") is True, "tamper status")
        wait_for(lambda: reader.status.get("power") is True, "power status")
    warned = {(e["event"], e["log_level"], e["active"]) for e in logs
              if e["event"] in ("reader_tamper", "reader_power")}
    assert warned == {("reader_tamper", "warning", True), ("reader_power", "warning", True)}


def test_silent_pd_makes_read_raise_then_reopen_works(line: Line, devices: Opened) -> None:
    """When the PD stops answering, read() raises DeviceError within a bounded time
    (libosdp gives up after about 8 s); once it is back, a reopen reads again."""
    pd = line.add_pd(1)
    reader = devices()
    pd.stop()
    error = wait_for(lambda: read_error(reader), "read() to raise for the silent PD",
                     OFFLINE_WAIT_S, interval=0)
    assert "address 1 offline: the PD stopped answering" in str(error)
    assert not reader.status["online"]
    back = line.add_pd(1)
    reader.open()
    back.card()
    assert read_id(reader) == "osdp:26:12345640"


def test_pulled_adapter_makes_read_raise_at_once(line: Line, devices: Opened) -> None:
    """When the port itself fails (the pty's other end closes), read() raises at once."""
    line.add_pd(1)
    reader = devices()
    line.hang_up()
    error = wait_for(lambda: read_error(reader), "read() to raise for the failed port",
                     WAIT_S, interval=0)
    assert "failed" in str(error)


def test_failed_port_is_reopened_by_the_bus(
        line: Line, devices: Opened, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a port error the bus reopens the port by itself (no one reopens a lock
    output), and the output works again once the PD is back online."""
    monkeypatch.setattr(osdp_bus, "_RETRY_S", 0.2)
    pd = line.add_pd(1)
    relay = devices("relay")
    bus = next(iter(osdp_devices._BUSES.values()))  # noqa: SLF001 - fault injection
    channel = bus._channel  # noqa: SLF001 - fault injection
    assert channel is not None
    channel.error = "injected read failure"
    with pytest.raises(DeviceError):  # the failure, or "not confirmed: the bus restarted"
        relay.set(True)

    def unlocks() -> bool:
        try:
            relay.set(True)
        except DeviceError:
            return False
        return True
    wait_for(unlocks, "the output to work again")
    assert pd.received(osdp.Command.Output)[-1]["control_code"] == 2


# --- the shared reader contract ------------------------------------------------------------


class TestOsdpReaderContract(ReaderContract):
    """The OSDP reader with Secure Channel; present() submits a card at a libosdp PD."""

    kind: ClassVar[str] = "osdp:40"

    @pytest.fixture(autouse=True)
    def _line(self, line: Line, key_file: Callable[..., str]) -> None:
        self.line = line
        self.pd = line.add_pd(4)
        self.key = key_file(SCBK)

    def make_reader(self) -> Reader:
        """A secure OSDP reader for the PD at address 4 of this test's line."""
        return OsdpReader("osdp-front", {"port": self.line.path, "address": 4,
                                         "scbk_file": self.key})

    def present(self, value: str) -> None:
        """The PD reports a 40-bit raw read of ``value``."""
        self.pd.card(bytes.fromhex(value), bits=40)


# --- the shared relay contract -------------------------------------------------------------


class TestOsdpRelayContract(RelayContract):
    """An output of a libosdp PD behind Secure Channel driving a lock; output on unlocks."""

    driver = "osdp"
    output_no: ClassVar[int] = 1
    active_high: ClassVar[bool] = True

    @pytest.fixture(autouse=True)
    def _line(self, line: Line, key_file: Callable[..., str]) -> None:
        self.line = line
        self.pd = line.add_pd(5)
        self.key = key_file(SCBK)

    def make_relay(self) -> Relay:
        """A secure OSDP output of the PD at address 5 of this test's line."""
        return OsdpRelay("front.relay", {
            "port": self.line.path, "address": 5, "scbk_file": self.key,
            "output_no": self.output_no, "active_high": self.active_high})

    def commands(self) -> list[bool]:
        """The osdp_OUT commands the PD received for the output: 2 permanent on, 1 off."""
        return [(c["control_code"] == 2) == self.active_high
                for c in self.pd.received(osdp.Command.Output, output_no=self.output_no)]

    def unopenable(self) -> tuple[Relay, str]:
        """An output on an RS-485 adapter that is unplugged."""
        port = "/dev/serial/by-id/usb-FTDI_FT232R-permitgate-gone"
        return OsdpRelay("front.relay", {"port": port, "address": 5,
                                         "scbk_file": self.key}), port

    def released(self) -> bool:
        """Whether the line's bus (port, libosdp CP, thread) is closed."""
        return not osdp_devices._BUSES  # noqa: SLF001 - the registry of open buses


class TestOsdpRelayActiveLowContract(TestOsdpRelayContract):
    """An output wired so that on locks (``active_high = false``, a fail-safe lock)."""

    output_no = 0
    active_high = False


# --- the agent ----------------------------------------------------------------------------

def test_agent_grants_a_card_presented_at_the_pd(
        tmp_path: Path, line: Line, key_file: Callable[..., str]) -> None:
    """A real agent with an OSDP reader decides a card presented at the PD: the grant is
    committed as an event and the PD's LED turns green."""
    pd = line.add_pd(9)
    config = agent_config(tmp_path, doors=(DoorSpec(unlock_s=0.3),), readers=(ReaderSpec(
        driver="osdp", debounce_s=None,
        options={"port": line.path, "address": 9, "scbk_file": key_file(SCBK)}),))
    agent = Agent(config, bus=SimBus())
    agent.start()
    try:
        store = agent.store
        assert store is not None
        store.replace_allowlist(
            [CredentialEntry(CredentialHasher(KEY).credential("osdp:26:12345640"))], 1)
        wait_for(lambda: any(e.kind == "reader_online" for e in store.events()),
                 "reader_online")
        pd.card()
        wait_for(lambda: any(e.kind == "access_granted" for e in store.events()),
                 "access_granted")
        granted = next(e for e in store.events() if e.kind == "access_granted")
        assert granted.reader == "front-in" and granted.door == "front"
        wait_for(lambda: pd.saw_led(GREEN), "green LED")
    finally:
        agent.stop()
    assert not osdp_devices._BUSES  # noqa: SLF001 - the agent's reader closed its bus
