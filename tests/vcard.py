"""A real pcscd with the vsmartcard ``vpcd`` reader driver, and a small virtual card for it.

The stack under test is the real one: pyscard -> libpcsclite -> pcscd 1.9.9 -> vpcd IFD
handler (Debian ``vsmartcard-vpcd``) -> TCP -> ``VirtualCard`` below. Only the card is
ours; it also answers the reader's own pseudo-APDU ``FF CA 00 00 00`` (on an ACR122U the
reader firmware answers it, not the card).

Isolation (``PcscDaemon``): Debian's pcscd has its socket and pid file compiled in
(``/run/pcscd/pcscd.comm``, ``/run/pcscd/pcscd.pid``) and refuses to start when another
pcscd owns them. So the daemon runs in a private mount namespace (``unshare --mount``,
needs root, which tests and CI have) where a private folder is bind-mounted over
``/run/pcscd``; a system pcscd, if any, is untouched. The client library finds the
private socket through ``PCSCLITE_CSOCK_NAME``, which libpcsclite reads once per process
and then keeps, so one folder serves every daemon a test session starts. The daemon gets
its own reader.conf folder (``--config``) holding only vpcd, on free TCP ports instead of
the packaged 35963/35964, so a developer's running vpcd does not collide either.

vpcd wire protocol (vsmartcard ``vpcd.c``): vpcd listens (``DEVICENAME /dev/null:<port>``)
and the card connects to it, one TCP connection per inserted card, slot ``n`` on
``port + n``. Every message both ways is a 2-byte big-endian length and a payload. A
1-byte payload from vpcd is a control code: 0 power off, 1 power on, 2 reset (no answer),
4 get ATR (answered with the ATR). Anything longer is a command APDU, answered with a
response APDU. vpcd checks presence by asking for the ATR on every pcscd poll (every
400 ms, pcscd's ``PCSCLITE_STATUS_POLL_RATE``); a closed connection is a removed card.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from smartcard import scard  # type: ignore[import-untyped]  # pyscard ships no stubs

from tests.waiting import wait_for

VPCD_LIBRARY = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
READER_NAMES = ("Virtual PCD 00 00", "Virtual PCD 00 01")
"""The two slots vpcd exposes: ``"<FRIENDLYNAME> <reader> <slot>"`` as pcscd names them."""

ATR_MIFARE_1K = bytes.fromhex("3B8F8001804F0CA000000306030001000000006A")
"""The PC/SC Part 3 storage-card ATR an ACR122U gives for a MIFARE Classic 1K (TCK 6A)."""
GET_UID = bytes.fromhex("FFCA000000")
SW_OK = b"\x90\x00"
SW_INS_NOT_SUPPORTED = b"\x6d\x00"

_CTRL_OFF, _CTRL_ON, _CTRL_RESET, _CTRL_ATR = 0, 1, 2, 4
START_TIMEOUT_S = 10.0
"""Bounds waiting for pcscd to list both readers; it does in about 15 ms here."""


class VirtualCard:
    """One contactless card: connects to a vpcd slot on ``insert()``, leaves on ``remove()``.

    It answers GET DATA (UID) with ``uid`` + ``uid_sw`` (``uid_sw`` other than 90 00 is
    sent alone, as a reader does for a card it cannot read) and any other APDU with 6D 00.
    """

    def __init__(self, port: int, uid: bytes, *, uid_sw: bytes = SW_OK,
                 atr: bytes = ATR_MIFARE_1K) -> None:
        self.port = port
        self.uid = uid
        self.uid_sw = uid_sw
        self.atr = atr
        self.apdus: list[bytes] = []
        """Command APDUs received, in order."""
        self.answered = threading.Event()
        """Set once GET DATA (UID) has been answered."""
        self.presence_checks = 0
        """How often vpcd asked for the ATR: once on every pcscd poll while the card is
        on the reader, so the count is pcscd's clock."""
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def insert(self) -> None:
        """Put the card on the reader: connect to vpcd and serve it in a thread.

        vpcd accepts the connection on its next presence poll; the kernel queues it until
        then, so this returns at once.
        """
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5.0)
        sock.settimeout(None)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, args=(sock,),
                                        name=f"vcard-{self.port}", daemon=True)
        self._thread.start()

    def remove(self) -> None:
        """Take the card away: close the connection (vpcd then reports no card)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            # shutdown() wakes the serving thread's recv(); close() alone may not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if sock is not None:
            sock.close()

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                (length,) = struct.unpack(">H", _recv_exactly(sock, 2))
                message = _recv_exactly(sock, length)
                reply = self._answer(message)
                if reply is not None:
                    sock.sendall(struct.pack(">H", len(reply)) + reply)
                if message == GET_UID:
                    # Only now: a Tapper takes the card away as soon as this is set.
                    self.answered.set()
        except (EOFError, OSError):
            return  # removed (our shutdown) or vpcd went away with pcscd

    def _answer(self, message: bytes) -> bytes | None:
        if len(message) == 1:
            if message[0] != _CTRL_ATR:
                return None  # off, on, reset: silent
            self.presence_checks += 1
            return self.atr
        self.apdus.append(message)
        if message == GET_UID:
            return self.uid + self.uid_sw if self.uid_sw == SW_OK else self.uid_sw
        return SW_INS_NOT_SUPPORTED


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        # vpcd writes the length and the payload separately: with Nagle on its side and
        # delayed ACKs on ours, each command would wait ~40 ms for the payload.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("vpcd closed the connection")
        data += chunk
    return data


class Tapper:
    """People tapping cards one after another at one slot, each holding the card on the
    reader until it has been read (or ``hold_s`` passed), then taking it away."""

    def __init__(self, port: int, hold_s: float = 10.0) -> None:
        self.port = port
        self.hold_s = hold_s
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tapper-{port}", daemon=True)
        self._thread.start()

    def tap(self, uid: bytes) -> None:
        """Queue a tap of the card ``uid``; returns at once."""
        self._queue.put(uid)

    def close(self) -> None:
        """Stop tapping; a card on the reader is taken away."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join(self.hold_s + 5.0)

    def _run(self) -> None:
        while (uid := self._queue.get()) is not None and not self._stop.is_set():
            card = VirtualCard(self.port, uid)
            card.insert()
            try:
                deadline = time.monotonic() + self.hold_s
                while not card.answered.wait(0.05):
                    if self._stop.is_set() or time.monotonic() >= deadline:
                        break
            finally:
                card.remove()


def free_port_pair() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free on all addresses (vpcd binds 0.0.0.0)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("0.0.0.0", 0))  # noqa: S104 - probing what vpcd will bind
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("0.0.0.0", port + 1))  # noqa: S104 - as above
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free TCP ports")


class PcscDaemon:
    """A private pcscd with vpcd's two readers; ``start()``/``stop()`` as often as needed.

    ``run_dir`` is bind-mounted over ``/run/pcscd`` inside the daemon's mount namespace;
    the caller points ``PCSCLITE_CSOCK_NAME`` at ``socket_path`` before this process first
    uses PC/SC.
    """

    def __init__(self, run_dir: Path, work_dir: Path, *, vpcd: bool = True) -> None:
        self.run_dir = run_dir
        self.vpcd = vpcd
        """False: a daemon without any reader configured."""
        self.work_dir = work_dir
        self.conf_dir = work_dir / "reader.conf.d"
        self.log_path = work_dir / "pcscd.log"
        self.port = 0
        """vpcd's TCP port for slot 0 (``Virtual PCD 00 00``); slot 1 is ``port + 1``."""
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        """Where clients reach this daemon."""
        return self.run_dir / "pcscd.comm"

    @property
    def running(self) -> bool:
        """True while the daemon process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start pcscd and wait (bounded) until it lists both vpcd readers."""
        for attempt in range(3):
            self._start_once()
            try:
                self._wait_for_readers()
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
                # Most likely another process took a port between the probe and vpcd's
                # bind (vpcd then fails to create the reader); try other ports.
            else:
                return

    def _start_once(self) -> None:
        self.stop()
        # A killed daemon leaves its socket and pid file; pcscd would refuse to start.
        for leftover in self.run_dir.iterdir():
            leftover.unlink()
        self.port = free_port_pair()
        shutil.rmtree(self.conf_dir, ignore_errors=True)
        self.conf_dir.mkdir(parents=True)
        if self.vpcd:
            (self.conf_dir / "vpcd").write_text(
                'FRIENDLYNAME "Virtual PCD"\n'
                f"DEVICENAME   /dev/null:0x{self.port:X}\n"
                f"LIBPATH      {VPCD_LIBRARY}\n"
                f"CHANNELID    0x{self.port:X}\n")
        self._log = self.log_path.open("ab")
        # unshare execs sh, sh execs pcscd: the Popen pid is pcscd's. mkdir -p creates an
        # empty /run/pcscd on the host too when none exists (mount points must exist);
        # the bind mount itself is private to the namespace. --auto-exit: a daemon
        # orphaned by a killed test run quits 60 s after its last client left.
        script = 'mkdir -p /run/pcscd && mount --bind "$1" /run/pcscd && ' \
                 'exec pcscd --foreground --auto-exit --debug --apdu --config "$2"'
        self._process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
             "sh", str(self.run_dir), str(self.conf_dir)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def _wait_for_readers(self) -> None:
        expected = set(READER_NAMES) if self.vpcd else set()
        seen: list[list[str] | None] = [None]

        def listed() -> bool:
            if not self.running:
                raise RuntimeError(f"pcscd exited: {self.log_tail()}")
            seen[0] = list_readers()
            return seen[0] is not None and expected <= set(seen[0])

        try:
            wait_for(listed, lambda: f"pcscd to list {sorted(expected)}; it listed {seen[0]} "
                                     f"(PCSCLITE_CSOCK_NAME="
                                     f"{os.environ.get('PCSCLITE_CSOCK_NAME')})",
                     START_TIMEOUT_S)
        except AssertionError as exc:
            raise RuntimeError(f"{exc}: {self.log_tail()}") from exc

    def stop(self) -> None:
        """Stop pcscd (SIGTERM, then SIGKILL after 5 s); safe when not running."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5.0)
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def log_tail(self, lines: int = 30) -> str:
        """The end of pcscd's debug log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])


def list_readers() -> list[str] | None:
    """The readers pcscd lists now (maybe none); None when pcscd is unreachable."""
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != scard.SCARD_S_SUCCESS:
        return None
    try:
        hr, readers = scard.SCardListReaders(ctx, [])
        return list(readers) if hr == scard.SCARD_S_SUCCESS else []
    finally:
        scard.SCardReleaseContext(ctx)


def reader_states() -> dict[str, int]:
    """Each reader's current PC/SC state bits; empty when pcscd is unreachable."""
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != scard.SCARD_S_SUCCESS:
        return {}
    try:
        hr, readers = scard.SCardListReaders(ctx, [])
        if hr != scard.SCARD_S_SUCCESS:
            return {}
        hr, states = scard.SCardGetStatusChange(
            ctx, 0, [(r, scard.SCARD_STATE_UNAWARE) for r in readers])
        if hr != scard.SCARD_S_SUCCESS:
            return {}
        return {str(name): int(state) for name, state, _atr in states}
    finally:
        scard.SCardReleaseContext(ctx)
