"""One address on an OSDP bus: its configuration, users, link state, and what the PD
reported (status, card and key events). The bus holds its lock around everything here."""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog

from drivers.osdp.evidence import LinkEvidence
from drivers.osdp.link import STATUS_INPUT, STATUS_LOCAL, STATUS_OUTPUT, STATUS_REMOTE

_log = structlog.get_logger()

QUEUE_MAX = 256
"""Card and key events waiting for ``read()``; beyond that they are dropped, logged."""


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


Pending = tuple[dict[str, Any], threading.Event, list[int]]
"""A command waiting for libosdp's completion callback: the command, an event set on
completion, and a list that receives the completion status."""


class Slot:
    """One address on the bus: its configuration, users, link state and events."""

    def __init__(self, config: PdConfig, port: str) -> None:
        self.config = config
        self.port = port
        self.index = -1
        self.members: set[object] = set()
        self.reader: str | None = None
        """The name of the reader attached, if one is."""
        self.reader_member: object | None = None
        """That reader itself."""
        self.claims: dict[object, int] = {}
        """Relay -> the output number it drives."""
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
        self.evidence = LinkEvidence()
        self.restart_requested = False
        self.disable_requested = False
        self.status: dict[str, Any] = {}
        self.pd_id: dict[str, int] | None = None
        self.caps: dict[int, tuple[int, int]] = {}
        """Capability function code -> (compliance level, number of items), from PDCAP."""
        self.lstat_refused = False
        self.pending: deque[Pending] = deque()

    def begin_attempt(self, now: float) -> None:
        """A fresh handshake starts: forget the evidence of the last one."""
        self.state = LinkState.CONNECTING
        self.state_since = self.attempt_started = now
        self.reason = None
        self.offline_notified = False
        self.sc_active = self.sc_scbkd = False
        self.evidence = LinkEvidence()

    def conflict(self, config: PdConfig, reader: str | None,
                 output_no: int | None) -> str | None:
        """Why a new user (a reader, or the relay of ``output_no``) cannot join, if so."""
        if self.config != config:
            return "configured with other security settings by another device"
        if reader is not None and self.reader:
            return f"reader {self.reader} already reads it"
        if output_no is not None and output_no in self.claims.values():
            return f"output {output_no} is already claimed"
        return None

    def claim(self, member: object, reader: str | None, output_no: int | None) -> None:
        """``member``, already one of ``members``, is the reader ``reader`` or the relay
        of ``output_no``."""
        if reader is not None:
            self.reader, self.reader_member = reader, member
            self.events = queue.Queue(QUEUE_MAX)
        if output_no is not None:
            self.claims[member] = output_no

    def leave(self, member: object) -> None:
        """``member`` no longer uses this address; the output it drove is forgotten."""
        self.members.discard(member)
        if self.reader_member is member:
            self.reader = self.reader_member = None
            self.events = None
        output_no = self.claims.pop(member, None)
        if output_no is not None:
            self.outputs.pop(output_no, None)

    @property
    def who(self) -> str:
        """The reader's name, for log lines about this address."""
        return self.reader if self.reader is not None else "-"

    def on_input(self, event: dict[str, Any]) -> None:
        """A card or key event: queued for the reader, unless SC is required and off."""
        if self.config.secure and (not self.sc_active or self.sc_scbkd):
            _log.warning("osdp_event_dropped", port=self.port, address=self.config.address,
                         reason="not_secure")
            return
        if self.events is None:
            return  # no reader attached: a card at a PD used only for its outputs
        try:
            self.events.put_nowait(event)
        except queue.Full:
            _log.warning("osdp_event_dropped", port=self.port, address=self.config.address,
                         reader=self.who, reason="queue_full")

    def on_status(self, event: dict[str, Any]) -> None:
        """A status report: tamper and power are kept and logged when they change."""
        kind, report = event.get("type"), event.get("report") or b""
        if kind in (STATUS_LOCAL, STATUS_REMOTE):
            where = "local" if kind == STATUS_LOCAL else "remote"
            for i, (name, log_name) in enumerate((("tamper", "reader_tamper"),
                                                  ("power", "reader_power"))):
                if i >= len(report):
                    break
                key = name if where == "local" else f"remote_{name}"
                active = bool(report[i])
                previous = self.status.get(key)
                self.status[key] = active
                if previous != active and (active or previous is not None):
                    # power: OSDP reports 1 for a power failure, 0 for normal.
                    (_log.warning if active else _log.info)(
                        log_name, reader=self.who, port=self.port,
                        address=self.config.address, source=where, active=active)
        elif kind in (STATUS_INPUT, STATUS_OUTPUT):
            self.status["inputs" if kind == STATUS_INPUT else "outputs"] = list(report)
