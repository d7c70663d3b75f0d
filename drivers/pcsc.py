"""PC/SC contactless readers (ACR122U, ACR1252U, HID Omnikey and other CCID readers) via
pcscd, through pyscard (the optional extra ``permitgate[pcsc]``).

Card presence comes from pcscd: ``SCardGetStatusChange`` blocks until a reader's state
changes or its timeout passes, so ``read(timeout)`` waits in pcscd, not in a sleep loop,
and returns within about ``timeout``. pcscd itself polls readers without presence events
(every 400 ms, ``PCSCLITE_STATUS_POLL_RATE``), which bounds how fast a tap is seen.

On a card (state PRESENT, not MUTE) the driver connects, sends GET DATA
``FF CA 00 00 00`` (a PC/SC Part 3 pseudo-APDU answered by the reader firmware: the UID,
4, 7 or 10 bytes for ISO 14443, 8 for FeliCa and ISO 15693) and disconnects, leaving the
card as it was. ``90 00`` gives the card id ``"uid:<UID in upper-case hex>"``; any other
status word (an ACR122U answers ``6A 81`` where it cannot read a UID) refuses the card,
counted in ``rejected`` and logged as ``reader_card_rejected`` with the status word, never
the UID. The id comes from the UID only; the ATR (card type) is not used.

One presentation is one read: a card left on the reader is read once, and read again only
after it was taken away. pcsc-lite keeps a per-reader count of insertions and removals in
the upper 16 bits of the event state, so a card taken away and put back between two
checks still counts as a new presentation. A card the driver could not talk to (taken
away mid-read, held exclusively by another program, not powered yet) is retried every
``poll_s``, at most ``_ATTEMPTS`` times per presentation.

Errors: pcscd not running or gone, no reader, no reader matching ``reader``, or the reader
unplugged raise ``DeviceError`` naming the reader; the agent closes, backs off and reopens.
A card lying on the reader when it (re)opens is read: someone may have just put it there.

Not done here: the ACR122U's LED and buzzer (vendor escape commands; ``feedback`` is the
base no-op), and reading anything beyond the UID. The UID of a MIFARE Classic or
Ultralight card is not a secret and is easy to clone; readers of clone-resistant
credentials need a driver of their own.

Linux quirk: the kernel's ``pn533_usb`` NFC driver claims an ACR122U first and pcscd logs
"Can't claim interface" until ``pn533_usb``, ``pn533`` and ``nfc`` are blacklisted
(libnfc #338, pyscard #94). pcscd's socket is ``/run/pcscd/pcscd.comm``; libpcsclite
honours ``PCSCLITE_CSOCK_NAME`` for another one.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from pydantic import Field

from drivers.base import CardRead, DeviceError, DriverOptions, Reader

GET_UID = (0xFF, 0xCA, 0x00, 0x00, 0x00)
"""GET DATA, P1 = 00: the card's UID (PC/SC Part 3, section 3.2.2.1.3); Le 00 = all of it."""
SW_OK = b"\x90\x00"
UID_LENGTHS = range(4, 11)
"""Accepted UID sizes in bytes: single, double, triple ISO 14443 UIDs and 8-byte IDs."""

_ATTEMPTS = 3
"""Tries per presentation when talking to the card fails (not when it answers badly)."""
_HRESULT_MASK = 0xFFFFFFFF
_COUNTER_SHIFT = 16
"""pcsc-lite's insertion/removal counter sits in the upper 16 bits of dwEventState."""

_log = structlog.get_logger()


class PcscReaderOptions(DriverOptions):
    """Options of the PC/SC reader."""

    reader: str | None = Field(default=None, min_length=1)
    """A part of the PC/SC reader name, e.g. ``"ACR122"`` or ``"ACS ACR122U PICC Interface
    00 00"``; the first reader whose name contains it is used. None: the first reader."""

    poll_s: float = Field(default=0.25, gt=0, le=5)
    """Longest single wait for a state change: presence is rechecked at least this often,
    and a card that could not be talked to is retried after this long."""


class PcscReader(Reader):
    """A contactless card reader behind pcscd, reporting card UIDs."""

    Options = PcscReaderOptions

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self._scard: Any = None
        """pyscard's ``smartcard.scard`` module, imported by ``open()``."""
        self._context: int | None = None
        self._reader = ""
        """The full PC/SC name of the reader in use."""
        self._state = 0
        """The last reader state pcscd reported, without the CHANGED bit."""
        self._handled: int | None = None
        """Counter of the presentation already read or refused; None when no card."""
        self._attempts = 0
        self._next_attempt = 0.0

    @property
    def _wanted(self) -> str:
        wanted = self.options.reader
        return f"reader {wanted!r}" if wanted else "the first reader"

    def _error(self, what: str) -> DeviceError:
        return DeviceError(f"pcsc reader {self.name} ({self._reader or self._wanted}): {what}")

    def open(self) -> None:
        """Connect to pcscd and pick the reader; raise ``DeviceError`` when that fails."""
        self.close()
        self._reader = ""
        try:
            # Optional extra, imported only where the hardware is used; pyscard has no stubs.
            from smartcard import scard  # type: ignore[import-untyped]  # noqa: PLC0415
        except (ImportError, OSError) as exc:  # OSError: libpcsclite.so.1 missing
            raise self._error(f"pyscard is not usable ({exc}); install permitgate[pcsc] "
                              "and libpcsclite1") from exc
        self._scard = scard
        hr, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hr != scard.SCARD_S_SUCCESS:
            raise self._error(f"cannot reach pcscd: {self._message(hr)}")
        self._context = context
        try:
            self._reader = self._pick(context)
        except DeviceError:
            self.close()
            raise
        self._state = scard.SCARD_STATE_UNAWARE
        self._handled = None
        self._attempts = 0
        self._next_attempt = 0.0
        self.rejected = 0
        _log.info("pcsc_reader_selected", reader=self.name, pcsc_reader=self._reader)

    def _pick(self, context: int) -> str:
        scard = self._scard
        hr, names = scard.SCardListReaders(context, [])
        hr &= _HRESULT_MASK
        if hr == scard.SCARD_E_NO_READERS_AVAILABLE or (hr == scard.SCARD_S_SUCCESS
                                                         and not names):
            raise self._error("pcscd has no reader attached")
        if hr != scard.SCARD_S_SUCCESS:
            raise self._error(f"cannot list readers: {self._message(hr)}")
        wanted = self.options.reader
        for candidate in names:
            if wanted is None or wanted in candidate:
                return str(candidate)
        raise self._error(f"no reader name contains {wanted!r} (attached: "
                          f"{', '.join(repr(n) for n in names)})")

    def read(self, timeout: float) -> CardRead | None:
        """The next card read, or None after about ``timeout`` seconds without one."""
        if self._context is None:
            raise self._error("not open")
        deadline = time.monotonic() + max(timeout, 0.0)
        checked = False
        while True:
            if self._due():
                got = self._read_card()
                if got is not None:
                    return got
            remaining = deadline - time.monotonic()
            if remaining <= 0 and checked:
                # At least one state check even with timeout 0.
                return None
            self._await_change(self._wait_s(remaining))
            checked = True

    def _due(self) -> bool:
        """A card is on the reader, not yet read, and may be tried now."""
        presented = self._presented()
        return (presented is not None and presented != self._handled
                and time.monotonic() >= self._next_attempt)

    def _presented(self) -> int | None:
        """The counter of the card on the reader now, or None without a readable card."""
        scard = self._scard
        if not self._state & scard.SCARD_STATE_PRESENT or self._state & scard.SCARD_STATE_MUTE:
            return None
        return self._state >> _COUNTER_SHIFT

    def _wait_s(self, remaining: float) -> float:
        wait: float = min(remaining, self.options.poll_s)
        presented = self._presented()
        if presented is not None and presented != self._handled:
            wait = min(wait, self._next_attempt - time.monotonic())  # a retry is due then
        return max(wait, 0.0)

    def _await_change(self, wait_s: float) -> None:
        """Let pcscd report a change of the reader's state, waiting up to ``wait_s``."""
        scard = self._scard
        hr, states = scard.SCardGetStatusChange(
            self._context, int(wait_s * 1000), [(self._reader, self._state)])
        hr &= _HRESULT_MASK
        if hr in (scard.SCARD_E_TIMEOUT, scard.SCARD_E_CANCELLED):
            return
        if hr != scard.SCARD_S_SUCCESS:
            # F_COMM_ERROR when pcscd dies during the wait, NO_SERVICE after;
            # UNKNOWN_READER when the reader was unplugged.
            error = self._error(f"cannot watch the reader: {self._message(hr)}")
            self.close()
            raise error
        _name, state, _atr = states[0]
        if state & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_IGNORE):
            error = self._error("the reader is gone")
            self.close()
            raise error
        self._state = state & ~scard.SCARD_STATE_CHANGED
        counter = self._state >> _COUNTER_SHIFT
        if not state & scard.SCARD_STATE_PRESENT:
            self._handled = None
            self._attempts = 0
            self._next_attempt = 0.0
        elif state & scard.SCARD_STATE_MUTE and counter != self._handled:
            # pcscd got no ATR: nothing to talk to until the card is put back.
            self._refuse(counter, "mute")

    def _read_card(self) -> CardRead | None:
        """Connect, ask for the UID, disconnect; None when refused or to be retried."""
        scard = self._scard
        counter = self._state >> _COUNTER_SHIFT
        hr, card, protocol = scard.SCardConnect(
            self._context, self._reader, scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
        hr &= _HRESULT_MASK
        if hr != scard.SCARD_S_SUCCESS:
            self._failed(counter, "connect", hr)
            return None
        try:
            hr, response = scard.SCardTransmit(card, protocol, list(GET_UID))
        finally:
            done = scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD) & _HRESULT_MASK
            if done != scard.SCARD_S_SUCCESS:  # the card left already: nothing to release
                _log.debug("pcsc_disconnect_failed", reader=self.name,
                           error=self._message(done))
        hr &= _HRESULT_MASK
        if hr != scard.SCARD_S_SUCCESS:
            self._failed(counter, "transmit", hr)
            return None
        data = bytes(response)
        status = data[-2:]
        if len(data) < 2 or status != SW_OK:
            self._refuse(counter, "status", sw=status.hex().upper())
            return None
        uid = data[:-2]
        if len(uid) not in UID_LENGTHS:
            self._refuse(counter, "uid_length", length=len(uid))
            return None
        self._handled = counter
        return CardRead(f"uid:{uid.hex().upper()}")

    def _failed(self, counter: int, step: str, hr: int) -> None:
        """Talking to the card failed: a dead pcscd or reader raises, anything else is
        retried after ``poll_s`` and refused after ``_ATTEMPTS`` tries."""
        scard = self._scard
        if hr in (scard.SCARD_E_NO_SERVICE, scard.SCARD_E_SERVICE_STOPPED,
                  scard.SCARD_F_COMM_ERROR, scard.SCARD_E_UNKNOWN_READER,
                  scard.SCARD_E_READER_UNAVAILABLE, scard.SCARD_E_INVALID_HANDLE):
            error = self._error(f"{step} failed: {self._message(hr)}")
            self.close()
            raise error
        self._attempts += 1
        if self._attempts >= _ATTEMPTS:
            self._refuse(counter, "unreadable", step=step, error=self._message(hr))
            return
        self._next_attempt = time.monotonic() + self.options.poll_s
        _log.info("reader_card_retry", reader=self.name, step=step,
                  error=self._message(hr), attempt=self._attempts)

    def _refuse(self, counter: int, reason: str, **facts: Any) -> None:
        """Refuse this presentation: counted, logged once, not retried while it stays."""
        self._handled = counter
        self.rejected += 1
        _log.warning("reader_card_rejected", reader=self.name, reason=reason, **facts)

    def _message(self, hr: int) -> str:
        return f"{self._scard.SCardGetErrorMessage(hr)} (0x{hr & _HRESULT_MASK:08X})"

    def close(self) -> None:
        """Release the pcscd context; safe to call twice or after a failed open."""
        context, self._context = self._context, None
        if context is None:
            return
        hr = self._scard.SCardReleaseContext(context) & _HRESULT_MASK
        if hr != self._scard.SCARD_S_SUCCESS:  # pcscd already gone: nothing left to free
            _log.debug("pcsc_release_failed", reader=self.name, error=self._message(hr))
