"""The shared body of readers that decode a byte stream from a serial port.

``SerialStreamReader`` owns the port and the read loop; a subclass only says which decoder
turns bytes into items and how an accepted item becomes a card id. The EM4100/ASCII reader
(``drivers.serial_reader``) and the QR scanner (``drivers.qr``) are built on it.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections import deque
from typing import Any, Protocol

import serial
import structlog

from drivers.base import CardRead, DeviceError, Reader

_log = structlog.get_logger()

CHUNK = 4096
"""Most bytes taken from the port in one go; 9600 baud delivers about 960 bytes/s."""


class Refusal(Protocol):
    """What a decoder reports for input it refused: why, and how long (never content)."""

    @property
    def reason(self) -> str: ...

    @property
    def length(self) -> int: ...


class StreamDecoder(Protocol):
    """Bytes in, items out; keeps partial input between calls."""

    def feed(self, data: bytes) -> list[Any]: ...


class SerialStreamReader(Reader):
    """A reader on a serial port whose bytes a ``StreamDecoder`` turns into card ids.

    Options must have ``port`` and ``baudrate``.
    """

    label = "serial reader"
    """How errors name this kind of reader."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._port: serial.Serial | None = None
        self._pending: deque[CardRead] = deque()
        self._decoder = self._new_decoder()

    @abstractmethod
    def _new_decoder(self) -> StreamDecoder:
        """A fresh decoder (a reopen drops any partial frame)."""

    @abstractmethod
    def _card_id(self, item: Any) -> str | None:
        """The card id of an accepted item, or None for a refusal (a ``Refusal``)."""

    def open(self) -> None:
        """Open the port; raise ``DeviceError`` naming it when that fails.

        pyserial flushes the input buffer on open, so reads the device made before the
        agent was listening are dropped rather than opening a door late. ``exclusive``
        takes an advisory lock: a second agent on the same port is refused, instead of
        each one getting half of the bytes.
        """
        self.close()
        path = self.options.port
        try:
            port = serial.Serial(port=path, baudrate=self.options.baudrate, timeout=0,
                                 exclusive=True)
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            raise DeviceError(f"{self.label} {self.name}: cannot open {path}: {exc}") from exc
        self._port = port
        self._pending.clear()
        self._decoder = self._new_decoder()
        self.rejected = 0

    def read(self, timeout: float) -> CardRead | None:
        """The next card read, or None after about ``timeout`` seconds without one."""
        port = self._port
        if port is None:
            raise DeviceError(f"{self.label} {self.name}: {self.options.port} is not open")
        deadline = time.monotonic() + max(timeout, 0.0)
        while not self._pending:
            remaining = deadline - time.monotonic()
            self._consume(self._receive(port, max(remaining, 0.0)))
            if not self._pending and remaining <= 0:
                # At least one non-blocking pass even with timeout 0, and a stream of
                # garbage cannot keep read() past its deadline.
                return None
        return self._pending.popleft()

    def _receive(self, port: serial.Serial, timeout: float) -> bytes:
        """Wait up to ``timeout`` for a first byte, then take what else has arrived.

        A device that goes away (USB reader unplugged, pty peer closed) shows up as a
        SerialException ("device reports readiness to read but returned no data": the
        kernel hangs the tty up and read() returns 0 bytes), as "Could not configure port:
        (5, 'Input/output error')" from the timeout setter, or as a bare OSError EIO from
        ``in_waiting``. All are OSErrors; all become DeviceError, after the port is closed.
        """
        try:
            port.timeout = timeout
            first = port.read(1)
            waiting = port.in_waiting if first else 0
            return first + port.read(min(waiting, CHUNK)) if waiting else first
        except OSError as exc:  # SerialException is an OSError
            self.close()
            raise DeviceError(
                f"{self.label} {self.name}: {self.options.port} failed: {exc}") from exc

    def _consume(self, data: bytes) -> None:
        for item in self._decoder.feed(data):
            card_id = self._card_id(item)
            if card_id is not None:
                self._pending.append(CardRead(card_id))
                continue
            refusal: Refusal = item
            self.rejected += 1
            _log.warning("reader_frame_rejected", reader=self.name, reason=refusal.reason,
                         length=refusal.length)

    def close(self) -> None:
        """Release the port; safe to call twice or after a failed open."""
        port, self._port = self._port, None
        if port is None:
            return
        try:
            port.close()
        except OSError as exc:
            _log.warning("reader_close_failed", reader=self.name, error=str(exc))
