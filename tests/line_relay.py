"""A serial line at a real baud rate, for tests: two pseudo-terminals joined by a relay.

Not a test module. A pty moves bytes as fast as the kernel can, in whatever lumps the
writer wrote, so a driver tested on one never sees what a real line does to it: at 9600
baud a byte takes 1.04 ms (10 bits: start, 8 data, stop), and a UART or a USB-RS485
adapter hands the bytes to the host a few at a time as they come off the wire. A 43-byte
Secure Channel reply therefore reaches the host over about 45 ms, in ten or more reads.

``LineRelay`` makes that happen between two pty pairs::

    driver --- host pty (host_path) === relay thread === device pty (device_fd) --- peer

Every byte written on one side reaches the other no sooner than the line could have
carried it: a byte starts on the wire when the previous byte of that direction has
finished (or when it was written, if the line was idle) and arrives ``10 / baudrate``
seconds later. Arrived bytes are delivered in small writes whose sizes cycle through
``chunks`` (1, 3, 2, 4 bytes by default), so frames are split at varying points, as
the receive FIFO or USB packets of an adapter split them. The two directions are
independent (full duplex, as RS-422; OSDP is half duplex and never uses both at once).

Bounds: each direction holds at most ``max_pending`` bytes; beyond that bytes are
dropped and counted in ``overruns``, as a UART overruns. ``stop()`` returns within about
a second and closes every descriptor. What it does not model: bit errors, RS-485
direction turnaround, the first-byte delay of some USB bridges, or the adapter's latency
timer (an FTDI waits up to 16 ms before sending a short packet).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from collections import deque
from collections.abc import Sequence

BITS_PER_BYTE = 10
"""8N1 on the wire: one start bit, eight data bits, one stop bit."""


class _Direction:
    """Bytes written on one side, with the time each finishes crossing the line."""

    def __init__(self, source: int, sink: int, byte_s: float, chunks: Sequence[int],
                 max_pending: int) -> None:
        self.source, self.sink = source, sink
        self._byte_s = byte_s
        self._chunks = tuple(chunks)
        self._next_chunk = 0
        self._max = max_pending
        self._bytes: deque[int] = deque()
        self._arrive: deque[float] = deque()
        self._line_free = 0.0
        self.carried = 0
        self.overruns = 0
        self.blocked = False
        """The sink took no more: wait until it is writable again."""

    def take(self, data: bytes, now: float) -> None:
        """Put ``data``, just written at ``now``, on the wire after what is already on it."""
        start = max(self._line_free, now)
        for byte in data:
            if len(self._bytes) >= self._max:
                self.overruns += 1
                continue
            start += self._byte_s
            self._bytes.append(byte)
            self._arrive.append(start)
        self._line_free = max(self._line_free, start)

    def _chunk(self) -> int:
        return self._chunks[self._next_chunk % len(self._chunks)]

    def due(self) -> float | None:
        """When the next chunk has fully arrived (None: nothing on the wire)."""
        if not self._arrive:
            return None
        return self._arrive[min(self._chunk(), len(self._arrive)) - 1]

    def deliver(self, now: float) -> None:
        """Write every chunk that has arrived by ``now``; a full sink keeps the rest."""
        while self._arrive:
            size = min(self._chunk(), len(self._arrive))
            if self._arrive[size - 1] > now:
                return
            chunk = bytes(self._bytes[i] for i in range(size))
            try:
                written = os.write(self.sink, chunk)
            except (BlockingIOError, InterruptedError):
                self.blocked = True
                return
            except OSError:  # EIO: nobody holds the other end; the bytes are lost
                written = size
            for _ in range(written):
                self._bytes.popleft()
                self._arrive.popleft()
            self.carried += written
            self.blocked = written < size
            if self.blocked:
                return
            self._next_chunk += 1


class LineRelay:
    """Two pty pairs joined by a thread that carries bytes at ``baudrate``.

    The code under test opens ``host_path``; the peer (a PD, a card reader) reads and
    writes ``device_fd``, a raw, non-blocking descriptor. Use as a context manager or
    call ``start()`` and ``stop()``."""

    def __init__(self, baudrate: int, chunks: Sequence[int] = (1, 3, 2, 4),
                 max_pending: int = 4096) -> None:
        if baudrate <= 0 or not chunks or min(chunks) < 1 or max_pending < 1:
            raise ValueError("baudrate, every chunk and max_pending must be positive")
        self.baudrate = baudrate
        self.byte_s = BITS_PER_BYTE / baudrate
        """Seconds one byte takes on the wire: 1.04 ms at 9600 baud."""
        self._fds: list[int] = []
        host_master, host_slave = self._pty()
        device_master, self.device_fd = self._pty()
        os.set_blocking(self.device_fd, False)
        self.host_path = os.ttyname(host_slave)
        # The relay keeps the host slave open itself, so its master never reads EIO while
        # the driver has the port closed (between a close and a reopen).
        self._to_device = _Direction(host_master, device_master, self.byte_s, chunks,
                                     max_pending)
        self._to_host = _Direction(device_master, host_master, self.byte_s, chunks,
                                   max_pending)
        self._wake_r, self._wake_w = os.pipe()
        self._fds += [self._wake_r, self._wake_w]
        self._stop = threading.Event()
        self.error: str | None = None
        """Why the relay thread ended early (a read error), else None."""
        self._thread = threading.Thread(target=self._run, name=f"line-relay-{baudrate}",
                                        daemon=True)

    def _pty(self) -> tuple[int, int]:
        master, slave = os.openpty()
        self._fds += [master, slave]
        # Raw at once: no echo, no CR/LF translation, 8 bits, before anyone reads.
        tty.setraw(slave)
        os.set_blocking(master, False)
        return master, slave

    @property
    def carried(self) -> int:
        """Bytes delivered so far, both directions together."""
        return self._to_device.carried + self._to_host.carried

    @property
    def overruns(self) -> int:
        """Bytes dropped because a direction already held ``max_pending``."""
        return self._to_device.overruns + self._to_host.overruns

    def start(self) -> LineRelay:
        """Start carrying bytes."""
        self._thread.start()
        return self

    def __enter__(self) -> LineRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        directions = (self._to_device, self._to_host)
        sources = {d.source: d for d in directions}
        watch = [*sources, self._wake_r]
        while not self._stop.is_set():
            dues = [d for d in (x.due() for x in directions if not x.blocked)
                    if d is not None]
            blocked = [x.sink for x in directions if x.blocked]
            # Wake for the next chunk (select has microsecond resolution: a byte takes
            # 87 us at 115200 baud), new bytes, a full sink draining, or stop; every
            # 0.5 s at most regardless.
            wait = 0.5 if not dues else max(0.0, min(dues) - time.monotonic())
            readable, _, _ = select.select(watch, blocked, [], wait)
            for fd in readable:
                direction = sources.get(fd)
                if direction is None:
                    continue  # the wake-up byte of stop()
                try:
                    data = os.read(fd, 4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:  # the relay holds both slaves: not expected
                    self.error = f"read failed: {exc}"
                    return
                direction.take(data, time.monotonic())
            now = time.monotonic()
            for direction in directions:
                direction.deliver(now)

    def stop(self) -> None:
        """Stop the thread (bounded: about a second at most) and close every descriptor;
        safe to call twice."""
        self._stop.set()
        if self._thread.is_alive():
            os.write(self._wake_w, b"\0")
            self._thread.join(2.0)
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
