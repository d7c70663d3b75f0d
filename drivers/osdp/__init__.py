"""OSDP readers and outputs (SIA OSDP 2.2 / IEC 60839-11-5 over RS-485), the agent being
the Control Panel (CP), through libosdp (the optional extra ``permitgate[osdp]``).

The bus
    One RS-485 line (one serial port) carries up to 126 Peripheral Devices (PDs), each
    answering only its own multi-drop ``address``. Every ``OsdpReader`` and ``OsdpRelay``
    configured with the same ``port`` shares one ``Bus``: it owns the serial port, the
    libosdp ControlPanel and the thread that refreshes it every 20 ms; each address has a
    ``Slot`` with its link state and, when a reader is attached, a queue of its events.
    The bus is reference-counted and closes the port when its last user closes. A libosdp
    CP knows its PDs from construction, so an address joining a running bus rebuilds the
    CP; the PDs already on it re-handshake (about 0.3 s with Secure Channel here) and
    their readers ride through that within ``open_timeout_s`` without reporting offline.

Framing (drivers/osdp/frames.py)
    The channel hands libosdp whole, checked frames only: libosdp 3.2.9 loses a reply
    that reaches it over two of its 20 ms refreshes. At 9600 baud (1.04 ms a byte, the
    default and the usual rate of installed readers) that is every reply over 19 bytes,
    and a shorter one whenever a refresh falls inside it; no reader came online. Tested
    with byte-paced delivery (tests/line_relay.py) at every rate from 9600 to 115200.

Secure Channel (SC)
    ``secure = true`` (the default) needs ``scbk_file``: the PD's Secure Channel Base Key,
    32 hex digits. The CP runs with libosdp's ENFORCE_SECURE: if the handshake fails
    (wrong key, SC off on the PD) the PD is offline, never used in plain text, and
    ``open()`` raises ``DeviceError`` naming the port, the address and the reason found
    in the exchange itself (no answer, key mismatch, SC refused or not offered; "not
    offered" only when the PD's ``osdp_PDCAP`` reply lacks it). Without
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

Modules
    ``devices`` (options, ``OsdpReader``, ``OsdpRelay``), ``bus`` (the line, its libosdp
    ControlPanel and thread), ``slot`` (one address), ``link`` (libosdp constants and the
    serial channel), ``frames`` (frames on the wire, the assembler), ``evidence`` (why a
    handshake failed), ``credentials`` (key file, card ids, PIN entry).
"""

from drivers.osdp.credentials import SCBK_D, Pin, PinAssembler, PinRejected, card_id, load_scbk
from drivers.osdp.devices import (
    OsdpOptions,
    OsdpReader,
    OsdpReaderOptions,
    OsdpRelay,
    OsdpRelayOptions,
)
from drivers.osdp.frames import (
    Frame,
    FrameAssembler,
    FrameScanner,
    crc16,
    interchar_gap_s,
    parse_frame,
)

__all__ = [
    "SCBK_D", "Frame", "FrameAssembler", "FrameScanner", "OsdpOptions", "OsdpReader",
    "OsdpReaderOptions", "OsdpRelay", "OsdpRelayOptions", "Pin", "PinAssembler",
    "PinRejected", "card_id", "crc16", "interchar_gap_s", "load_scbk", "parse_frame",
]
