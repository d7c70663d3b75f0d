"""One RS-485 line as an OSDP bus: the serial port, libosdp's ControlPanel for the
addresses in use, and the thread that refreshes it."""

from __future__ import annotations

import threading
import time
from typing import Any

import serial
import structlog

from drivers.base import DeviceError
from drivers.osdp.evidence import diagnose
from drivers.osdp.frames import CMD_KEYSET, MARK, FrameScanner, parse_frame
from drivers.osdp.link import (
    CAP_AUDIBLE,
    CAP_LED,
    CAP_OUTPUT,
    CMD_OUTPUT,
    CMD_STATUS,
    COMPLETION_OK,
    EVENT_CARDREAD,
    EVENT_KEYPRESS,
    EVENT_NOTIFICATION,
    EVENT_STATUS,
    FLAG_ENABLE_NOTIFICATION,
    FLAG_ENFORCE_SECURE,
    NOTIFY_PD_STATUS,
    NOTIFY_SC_STATUS,
    REFRESH_S,
    STATUS_LOCAL,
    PortChannel,
    libosdp,
)
from drivers.osdp.slot import LinkState, PdConfig, Slot

_log = structlog.get_logger()

_RETRY_S = 10.0
"""An offline PD that still has users is restarted after this, not libosdp's 300 s."""
_MAX_PDS = 32
"""libosdp's ``status()`` and ``sc_status()`` are 32-bit masks, one bit per PD."""
OUTPUT_CONFIRM_S = 2.0
"""How long ``OsdpRelay.set`` waits for the PD to acknowledge ``osdp_OUT``: an exchange
takes well under 100 ms, a lost frame is retried by libosdp after 800 ms."""
ABANDONED = -1
"""Our own completion status for a command lost when the bus restarted its CP."""


class Bus:
    """One serial line, its libosdp ControlPanel and its refresh thread."""

    def __init__(self, key: str, port: str, baudrate: int) -> None:
        self.key = key
        self.port = port
        self.baudrate = baudrate
        self._cv = threading.Condition(threading.RLock())
        """Guards everything below and every call into the ControlPanel; the refresh
        thread holds it for one refresh (a few ms); state changes are notified on it."""
        self._slots: list[Slot] = []
        self._serial: serial.Serial | None = None
        self._channel: PortChannel | None = None
        self._ctx: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: str | None = None
        self._failed_at = 0.0
        self._tx = FrameScanner()

    # -- membership (called with the registry lock held) ------------------------------

    @property
    def empty(self) -> bool:
        """No user left."""
        with self._cv:
            return not any(s.members for s in self._slots)

    def attach(self, config: PdConfig, member: object, *, reader: str | None = None,
               output_no: int | None = None) -> Slot:
        """Add ``member`` as a user of ``config.address``: the reader named ``reader``, or
        the relay driving ``output_no``; opens the port on first use."""
        with self._cv:
            slot = next((s for s in self._slots if s.config.address == config.address), None)
            if slot is not None and not slot.members and slot.config != config:
                # Its last user closed; a new one with other settings replaces it.
                self._slots.remove(slot)
                slot.index, slot = -1, None
            conflict = slot.conflict(config, reader, output_no) if slot is not None else None
            if conflict is not None:
                raise DeviceError(f"{self.port} address {config.address}: {conflict}")
            if self.failure is not None:
                self._close_port()
            rebuild = self._serial is None or slot is None or slot.index < 0
            if slot is None:
                if sum(1 for s in self._slots if s.members) >= _MAX_PDS:
                    raise DeviceError(f"{self.port}: at most {_MAX_PDS} PDs on one line")
                slot = Slot(config, self.port)
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
            slot.claim(member, reader, output_no)
            return slot

    def detach(self, slot: Slot, member: object) -> None:
        """Remove ``member``; an address left without users stops being polled."""
        with self._cv:
            slot.leave(member)
            if not slot.members:
                slot.restart_requested = False
                slot.disable_requested = True

    def _restart(self, slot: Slot) -> None:
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
        self._channel = PortChannel(port.fileno(), self.baudrate, self._on_rx,
                                    self._on_tx)
        self.failure = None

    def _rebuild(self) -> None:
        """A new ControlPanel for the addresses in use (libosdp fixes its PDs at set-up)."""
        osdp, osdp_sys = libosdp()
        keep = [s for s in self._slots if s.members]
        infos = []
        for slot in keep:
            cfg = slot.config
            flags = FLAG_ENABLE_NOTIFICATION
            if cfg.secure and not cfg.install_mode:
                flags |= FLAG_ENFORCE_SECURE
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
                result.append(ABANDONED)
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
            self._stop.wait(REFRESH_S)

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

    def _supervise(self, ctx: Any, channel: PortChannel) -> None:
        if channel.error is not None:
            self._fail(channel.error)
            return
        now = time.monotonic()
        online, sc = ctx.status(), ctx.sc_status()
        for slot in self._slots:
            if slot.index >= 0:
                self._service(ctx, slot, bool(online >> slot.index & 1),
                              bool(sc >> slot.index & 1), now)

    def _service(self, ctx: Any, slot: Slot, online: bool, sc: bool, now: float) -> None:
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

    def _went_online(self, ctx: Any, slot: Slot, now: float) -> None:
        try:
            slot.pd_id = dict(ctx.get_pd_id(slot.index))
        except Exception:  # noqa: BLE001 - identification is informative only
            slot.pd_id = None
        slot.caps = {}
        for cap in (CAP_OUTPUT, CAP_LED, CAP_AUDIBLE):
            try:
                level, items = ctx.check_capability(slot.index, cap)
            except Exception:  # noqa: BLE001 - an unreported capability reads as absent
                level, items = 0, 0
            slot.caps[cap] = (int(level), int(items))
        self._set_state(slot, LinkState.ONLINE, None, now)
        stats = slot.evidence
        if slot.config.install_mode and CMD_KEYSET in stats.sent:
            _log.warning("osdp_key_installed", port=self.port, address=slot.config.address,
                         reader=slot.who, scbkd_used=stats.scbkd_challenge,
                         hint="the PD now holds the site key: set install_mode = false")
        # Ask for tamper and power now: a PD reports them unasked only when they change.
        # libosdp takes a PD offline for any NAK to a command, so a PD that refused
        # osdp_LSTAT once is not asked again.
        if not slot.lstat_refused:
            ctx.submit_command(slot.index, {"command": CMD_STATUS, "type": STATUS_LOCAL})
        for output_no, code in slot.outputs.items():
            ctx.submit_command(slot.index, output_command(output_no, code))

    def _set_state(self, slot: Slot, state: LinkState, reason: str | None,
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

    def _diagnose(self, slot: Slot, now: float) -> str:
        """Why the handshake failed or the PD went away, from what the wire showed."""
        return diagnose(slot.evidence, secure=slot.config.secure,
                        online=slot.state is LinkState.ONLINE, now=now)

    # -- what libosdp and the wire tell us (refresh thread, lock held) -----------------

    def _slot_at(self, address: int) -> Slot | None:
        return next((s for s in self._slots if s.config.address == address
                     and s.index >= 0), None)

    def _on_rx(self, data: bytes) -> None:
        """A whole frame the channel hands libosdp (a mark byte may lead it)."""
        frame = parse_frame(data[1:] if data[0] == MARK else data)
        slot = self._slot_at(frame.address) if frame is not None else None
        if (frame is not None and slot is not None and frame.reply
                and slot.evidence.reply(frame, time.monotonic())):
            slot.lstat_refused = True

    def _on_tx(self, data: bytes) -> None:
        for frame in self._tx.feed(data):
            slot = self._slot_at(frame.address)
            if slot is not None and not frame.reply:
                slot.evidence.command(frame)

    def _on_event(self, index: int, event: dict[str, Any]) -> int:
        try:
            slot = self._slots[index]
            kind = event.get("event")
            if kind == EVENT_NOTIFICATION:
                if event.get("type") == NOTIFY_PD_STATUS and not event.get("arg0"):
                    slot.offline_notified = True
                elif event.get("type") == NOTIFY_SC_STATUS:
                    slot.sc_active = bool(event.get("arg0"))
                    slot.sc_scbkd = bool(event.get("arg0")) and event.get("arg1") == 1
            elif kind == EVENT_STATUS:
                slot.on_status(event)
            elif kind in (EVENT_CARDREAD, EVENT_KEYPRESS):
                slot.on_input(event)
        except Exception as exc:  # noqa: BLE001 - an exception must not reach libosdp
            _log.error("osdp_event_failed", port=self.port, error=str(exc))
        return 0

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

    def check(self, slot: Slot, what: str, grace: float) -> None:
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

    def wait_online(self, slot: Slot, timeout: float, what: str) -> None:
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

    def snapshot(self, slot: Slot) -> dict[str, Any]:
        """The slot's link and PD status, copied under the lock."""
        with self._cv:
            return {"online": slot.state is LinkState.ONLINE and self.failure is None,
                    "secure": slot.sc_active, "state": slot.state.value,
                    "reason": self.failure or slot.reason, **slot.status}

    def submit(self, slot: Slot, command: dict[str, Any], what: str) -> None:
        """Queue ``command`` for the PD; DeviceError when it is not online."""
        with self._cv:
            self._submit(slot, command, what)

    def _submit(self, slot: Slot, command: dict[str, Any], what: str) -> None:
        if self.failure is not None or slot.state is not LinkState.ONLINE or self._ctx is None:
            raise DeviceError(f"{what}: {self.port} address {slot.config.address} is not "
                              f"online ({self.failure or slot.reason or slot.state.value})")
        if not self._ctx.submit_command(slot.index, command):
            raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                              "libosdp refused the command")

    def set_output(self, slot: Slot, output_no: int, code: int, what: str) -> None:
        """Drive an output and wait until the PD acknowledged it."""
        command = output_command(output_no, code)
        done, result = threading.Event(), list[int]()
        with self._cv:
            slot.outputs[output_no] = code
            level, items = slot.caps.get(CAP_OUTPUT, (0, 0))
            if slot.state is LinkState.ONLINE and (level == 0 or output_no >= items):
                raise DeviceError(f"{what}: {self.port} address {slot.config.address}: the "
                                  f"PD announces {items if level else 0} outputs, "
                                  f"no output {output_no}")
            self._submit(slot, command, what)
            slot.pending.append((command, done, result))
        if not done.wait(OUTPUT_CONFIRM_S):
            with self._cv:
                for entry in list(slot.pending):
                    if entry[1] is done:
                        slot.pending.remove(entry)
            raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                              f"output {output_no} not acknowledged")
        if result[0] == ABANDONED:
            raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                              f"output {output_no} not confirmed: the bus restarted")
        if result[0] != COMPLETION_OK:
            raise DeviceError(f"{what}: {self.port} address {slot.config.address}: "
                              f"output {output_no} failed (status {result[0]})")


def output_command(output_no: int, code: int) -> dict[str, Any]:
    """libosdp's ``osdp_OUT`` command for one output."""
    return {"command": CMD_OUTPUT, "output_no": output_no, "control_code": code,
            "timer_count": 0}
