"""``permitgate doctor``: is this gateway ready to run? Checks, and fixes in plain words.

It lists the serial ports present, then checks every configured device, the store folder,
the site key, the sync files (when sync is on) and the clock, and prints one line per
check: ``ok``, ``warn`` (works, but worth a look), ``FAIL`` (the agent will not work) or
``--`` (nothing to check). Exit status 0 when nothing failed, 1 otherwise.

Probes are safe: a serial device is opened and closed again, with nothing written (a
serial port's owner is unknown until it answers, and writing to the wrong one can switch
a relay or confuse a modem); a GPIO line is only looked up in the chip's line table,
never requested, since requesting a relay's line as an output would drive the lock. The
doctor never creates the store, a key or any other file, except for a temporary file in
the store folder that proves it is writable and is deleted at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import serial

from agent.certexpiry import RENEW_HINT, certificate_expiry, check_as_root, user_name
from agent.clock import ClockJudge, ClockState
from agent.config import Config
from agent.keys import load_site_key, resolve_secret_path
from agent.resolve import config_dir, resolve_store_path
from agent.secrets_check import require_private
from agent.store import Store, lists_path
from common.sqlite import StoreError
from protocol.hashing import SecretError
from protocol.signing import load_trusted_keys

Status = Literal["ok", "warn", "fail", "skip"]
_LABEL: dict[Status, str] = {"ok": "ok  ", "warn": "warn", "fail": "FAIL", "skip": "--  "}

BY_ID = Path("/dev/serial/by-id")
"""udev's stable names of USB serial devices (vendor, model, serial number)."""
UNSTABLE_PREFIXES = ("/dev/ttyUSB", "/dev/ttyACM")
"""Kernel names numbered in order of detection: they can swap after a reboot or replug."""


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: what was checked, what was found and, if it is a problem, the fix."""

    status: Status
    subject: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """The finding as the doctor prints it."""
        text = f"  {_LABEL[self.status]}  {self.subject}: {self.detail}"
        return f"{text} — {self.fix}" if self.fix else text


@dataclass(frozen=True, slots=True)
class SerialPort:
    """A serial device present on this machine."""

    device: str
    description: str
    by_id: tuple[str, ...] = ()


@dataclass(slots=True)
class Report:
    """Everything the doctor found."""

    ports: list[SerialPort] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether any check failed."""
        return any(c.status == "fail" for c in self.checks)


# -- serial ports ------------------------------------------------------------------------


def by_id_links() -> dict[str, list[str]]:
    """``/dev/serial/by-id`` links by the device they point to (resolved)."""
    links: dict[str, list[str]] = {}
    try:
        entries = sorted(BY_ID.iterdir())
    except OSError:
        return links  # no USB serial device plugged in: udev has not made the folder
    for link in entries:
        try:
            target = str(link.resolve(strict=True))
        except OSError:
            continue  # a dangling link: its device is gone
        links.setdefault(target, []).append(str(link))
    return links


def serial_ports() -> list[SerialPort]:
    """Serial ports pyserial finds, plus any device only a by-id link names."""
    from serial.tools import list_ports  # noqa: PLC0415 - only the doctor needs it

    links = by_id_links()
    ports: dict[str, SerialPort] = {}
    for info in list_ports.comports():
        device = str(Path(info.device).resolve())
        description = info.description if info.description != "n/a" else ""
        ports[device] = SerialPort(device, description, tuple(links.get(device, ())))
    for target, names in links.items():
        ports.setdefault(target, SerialPort(target, "", tuple(names)))
    return [ports[k] for k in sorted(ports)]


# -- probes --------------------------------------------------------------------------------


def _present_hint(ports: list[SerialPort]) -> str:
    names = [name for p in ports for name in (p.by_id or (p.device,))]
    if not names:
        return "no serial device is connected at all"
    return "connected now: " + ", ".join(names)


def probe_serial(subject: str, what: str, options: dict[str, Any],
                 ports: list[SerialPort]) -> Check:
    """Does the configured port exist, and does it open? Nothing is written."""
    path = str(options.get("port", ""))
    if not path or not Path(path).exists():  # a dangling by-id link does not exist
        return _missing_port(subject, what, path, ports)
    baudrate = options.get("baudrate", 9600)
    try:
        port = serial.Serial(port=path, baudrate=baudrate if isinstance(baudrate, int)
                             else 9600, timeout=0, exclusive=True)
    except (OSError, ValueError) as exc:  # SerialException is an OSError
        return _open_failure(subject, what, path, exc)
    with contextlib.suppress(OSError):  # it opened: a failed close changes nothing
        port.close()
    resolved = str(Path(path).resolve())
    stable = [n for p in ports if p.device == resolved for n in p.by_id]
    if path.startswith(UNSTABLE_PREFIXES):
        tip = (f"{path} may name another device after a reboot; use " + " or ".join(stable)
               if stable else f"{path} may name another device after a reboot; a "
               "/dev/serial/by-id/... or /dev/serial/by-path/... name is stable")
        return Check("warn", subject, f"{path} opens", tip)
    return Check("ok", subject, f"{path} opens")


def _missing_port(subject: str, what: str, path: str, ports: list[SerialPort]) -> Check:
    if path.startswith(str(BY_ID)):
        return Check("fail", subject, f"{path} does not exist",
                     f"no {what} with this id is connected — check the cable and power; "
                     f"{_present_hint(ports)}")
    return Check("fail", subject, f"{path} does not exist",
                 f"is the {what} plugged in and powered? Use a /dev/serial/by-id/... "
                 f"name, which stays the same across reboots; {_present_hint(ports)}")


def _open_failure(subject: str, what: str, path: str, exc: Exception) -> Check:
    code = getattr(exc, "errno", None)
    if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY):
        return Check("warn", subject, f"{path} is in use by another process",
                     "if the agent is running that is expected; otherwise find the "
                     f"holder with 'fuser -v {path}' (ModemManager grabs USB serial "
                     "ports: disable it or add a udev rule ID_MM_DEVICE_IGNORE=1)")
    if code == errno.EACCES:
        return Check("fail", subject, f"{path}: permission denied",
                     "add the agent's user to the dialout group "
                     "('sudo usermod -aG dialout permitgate') and restart the agent")
    return Check("fail", subject, f"{path} cannot be opened: {exc}",
                 f"check the {what}'s cable and power, then run the doctor again")


def probe_gpio(subject: str, options: dict[str, Any]) -> Check:
    """Does the chip exist, and are the lines there and free? Nothing is requested."""
    chip = str(options.get("chip", "/dev/gpiochip0"))
    lines = [options[k] for k in ("line", "d0", "d1") if isinstance(options.get(k), int)]
    if not Path(chip).exists():
        return Check("fail", subject, f"{chip} does not exist",
                     "this machine shows no such GPIO chip: 'gpiodetect' lists the chips "
                     "(on a Raspberry Pi 5 with an older kernel the header is "
                     "/dev/gpiochip4)")
    found = _gpio_lines(subject, chip, lines)
    if isinstance(found, Check):
        return found
    missing, used = found
    if missing:
        return Check("fail", subject, "; ".join(missing + used),
                     "'gpioinfo' lists the lines and their numbers")
    if used:
        return Check("warn", subject, "; ".join(used),
                     "expected while the agent runs; otherwise 'gpioinfo' shows the holder")
    return Check("ok", subject, f"{chip} line(s) {', '.join(map(str, lines))} free")


def _gpio_lines(subject: str, chip: str, lines: list[int]
                ) -> Check | tuple[list[str], list[str]]:
    """Lines that do not exist and lines in use, or a Check when the chip is unusable."""
    try:
        import gpiod  # noqa: PLC0415 - optional extra
    except ImportError:
        return Check("fail", subject, "gpiod is not installed",
                     "pip install 'permitgate[gpio]'")
    missing: list[str] = []
    used: list[str] = []
    try:
        if not gpiod.is_gpiochip_device(chip):
            return Check("fail", subject, f"{chip} is not a GPIO chip",
                         "'gpiodetect' lists the GPIO chips")
        with gpiod.Chip(chip) as handle:
            count = handle.get_info().num_lines
            for line in lines:
                if line >= count:
                    missing.append(f"line {line} does not exist ({chip} has {count})")
                elif (info := handle.get_line_info(line)).used:
                    used.append(f"line {line} is in use by {info.consumer or 'another'}")
    except OSError as exc:
        return Check("fail", subject, f"{chip} cannot be read: {exc}",
                     "is the agent's user in the gpio group?")
    return missing, used


def probe_device(subject: str, what: str, driver: str, options: dict[str, Any],
                 ports: list[SerialPort]) -> Check:
    """The safe probe that fits a device's options."""
    if driver == "simulated":
        return Check("skip", subject, "simulated, no device to check")
    if "port" in options:
        return probe_serial(subject, what, options, ports)
    if "chip" in options or driver in ("gpio", "wiegand"):
        return probe_gpio(subject, options)
    return Check("skip", subject, f"driver {driver!r}: the doctor has no safe probe for it")


def _devices(config: Config) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    for reader in config.readers:
        yield f"reader {reader.id}", "reader", reader.driver, reader.options
    for door in config.doors:
        yield (f"door {door.id} relay", "relay board" if door.relay.driver == "relay_board"
               else "relay", door.relay.driver, door.relay.options)
        for attr, name in (("contact", "contact"), ("rex", "exit button")):
            dev = getattr(door, attr)
            if dev is not None:
                yield f"door {door.id} {name}", name, dev.driver, dev.options


# -- files and clock -----------------------------------------------------------------------


def check_store(config: Config, config_path: Path | None) -> Check:
    """Can the agent create or write its database?"""
    db = resolve_store_path(config, config_path)
    folder = db.parent
    if not folder.exists():
        ancestor = folder
        while not ancestor.exists():
            ancestor = ancestor.parent
        if os.access(ancestor, os.W_OK | os.X_OK):
            return Check("ok", "store", f"{folder} will be created at the first start")
        return Check("fail", "store", f"{folder} does not exist and {ancestor} is not "
                     "writable", f"create it for the agent's user: 'sudo install -d -o "
                     f"permitgate -m 0750 {folder}'")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return Check("fail", "store", f"{folder} is not writable: {exc.strerror}",
                     f"give the agent's user the folder: 'sudo chown permitgate {folder}'")
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        return Check("fail", "store", f"{db} is not writable",
                     f"give the agent's user the database: 'sudo chown permitgate {db}*'")
    state = "exists" if db.exists() else "will be created at the first start"
    return Check("ok", "store", f"{folder} is writable; the database {state}")


def check_site_key(config: Config, config_path: Path | None) -> Check:
    """Is the site key there, readable, well-formed and private?"""
    store_dir = resolve_store_path(config, config_path).parent
    path = resolve_secret_path(config.keys.site_key, store_dir, config_dir(config_path))
    if not path.exists():
        if config.keys.generate_missing:
            return Check("warn", "site key", f"{path} does not exist; the agent will make "
                         "one", "fine for a demo; a real site needs the central office's key")
        return Check("fail", "site key", f"{path} does not exist",
                     "install the site key from the central office there (mode 0600), or "
                     f"for a test site run 'permitgate keygen {path}'")
    try:
        load_site_key(path)
    except SecretError as exc:
        return Check("fail", "site key", str(exc),
                     "install the site key from the central office again")
    try:
        require_private(path)
    except SecretError as exc:
        return Check("fail", "site key", str(exc).split("; ")[0] + " (the agent refuses "
                     "to start with it)", f"chmod 600 {path}")
    return Check("ok", "site key", f"{path} present")


def check_sync(config: Config, config_path: Path | None) -> list[Check]:
    """With sync on: trusted keys, TLS files and the password file."""
    sync = config.sync
    if not sync.enabled:
        return [Check("skip", "sync", "disabled; the gateway runs on its local lists")]
    store_dir = resolve_store_path(config, config_path).parent
    cfg_dir = config_dir(config_path)
    checks: list[Check] = []
    keys_path = resolve_secret_path(sync.trusted_keys, store_dir, cfg_dir)
    try:
        count = len(load_trusted_keys(keys_path))
    except (OSError, ValueError) as exc:
        checks.append(Check("fail", "sync trusted keys", str(exc),
                            "install the central office's public keys file "
                            "('<key id> <base64 key>' a line)"))
    else:
        checks.append(Check("ok", "sync trusted keys", f"{keys_path}: {count} key(s)"))
    files: list[tuple[str, str | None]] = []
    if sync.tls:
        files += [("ca_file", sync.ca_file), ("cert_file", sync.cert_file),
                  ("key_file", sync.key_file)]
    files.append(("password_file", sync.password_file))
    for key, name in files:
        if name is None:
            continue
        path = resolve_secret_path(name, store_dir, cfg_dir)
        check_with = check_as_root(path.parent if "/" not in name else None, config_path)
        try:
            with path.open("rb"):
                pass
        except PermissionError:
            # There, but not for this user (the root-only credentials folder, which the
            # agent gets through systemd): nothing is known about the file itself.
            checks.append(Check("warn", f"sync {key}", f"{path}: cannot be checked by this "
                                f"user ({user_name()}): permission denied",
                                f"check it with: {check_with}"))
        except OSError as exc:
            checks.append(Check("fail", f"sync {key}", f"{path}: {exc.strerror}",
                                "install the file issued for this gateway by the central "
                                "office"))
        else:
            checks.append(Check("ok", f"sync {key}", f"{path} present"))
            if key == "cert_file":
                checks.append(check_certificate_expiry(path, check_with))
    return checks


def check_certificate_expiry(path: Path, check_with: str | None = None) -> Check:
    """Is the gateway's TLS certificate far from its expiry (``agent.certexpiry``)? One
    this user may not read is a warning that says how to check it (``check_with``)."""
    found = certificate_expiry(path, check_with=check_with)
    if found.state == "unchecked":
        return Check("warn", "sync certificate", found.message,
                     f"check it with: {found.check_with}")
    status: Status = "ok" if found.state == "ok" else \
        "warn" if found.state == "expiring" else "fail"
    return Check(status, "sync certificate", found.message,
                 "" if status == "ok" else RENEW_HINT)


class _ReadOnlyFloor:
    """The stored trusted floor, read but never written (the doctor changes nothing)."""

    def __init__(self, values: dict[str, str | None]) -> None:
        self._values = values

    def meta(self, key: str) -> str | None:
        return self._values.get(key)

    def set_meta(self, key: str, value: str) -> None:
        del key, value


def check_clock(config: Config, config_path: Path | None) -> Check:
    """Is the clock past the configured floor, and not behind (or far ahead of) the
    trusted floor the agent keeps? Judged as the agent judges it at start
    (agent/clock.py)."""
    floor = datetime.combine(config.policy.clock_floor, datetime.min.time(), config.zone)
    db = resolve_store_path(config, config_path)
    values: dict[str, str | None] = {}
    if db.exists() and lists_path(db).exists():  # opening a partial store would create
        try:
            store = Store(db)
        except (StoreError, OSError):
            store = None
        if store is not None:
            try:
                values = {key: store.meta(key) for key in ("clock_trusted_ms",
                                                            "clock_trusted_source")}
            except (StoreError, OSError):
                values = {}
            finally:
                store.close()
    judge = ClockJudge(_ReadOnlyFloor(values), floor=floor,
                       max_ahead_s=config.policy.clock_max_ahead_days * 86_400,
                       trust_ntp=config.policy.clock_trust_ntp)
    judgement = judge.judge()
    now = datetime.now(config.zone).isoformat(timespec="seconds")
    fix = ("enable time sync ('sudo timedatectl set-ntp true') or fit a real-time clock: "
           "validity dates and schedules are judged by this clock")
    trusted = ""
    if judgement.trusted_ms is not None:
        at = datetime.fromtimestamp(judgement.trusted_ms / 1000, config.zone)
        trusted = (f" (trusted floor {at:%Y-%m-%d %H:%M}, from "
                   f"{judgement.source or 'an earlier run'})")
    if judgement.state is ClockState.UNSET:
        return Check("fail", "clock", f"{now} is before the floor "
                     f"{config.policy.clock_floor.isoformat()} (clock not set)", fix)
    if judgement.state is ClockState.BEHIND:
        return Check("fail", "clock", f"{now} is behind the trusted time{trusted}", fix)
    if judgement.state is ClockState.AHEAD:
        return Check("fail", "clock", f"{now} is far ahead of the trusted time{trusted}; "
                     "nothing is pruned by age until NTP or the office confirms it", fix)
    return Check("ok", "clock", now)


# -- the report ----------------------------------------------------------------------------


def diagnose(config: Config, config_path: Path | None) -> Report:
    """Run every check."""
    report = Report(ports=serial_ports())
    for subject, what, driver, options in _devices(config):
        report.checks.append(probe_device(subject, what, driver, options, report.ports))
    report.checks.append(check_store(config, config_path))
    report.checks.append(check_site_key(config, config_path))
    report.checks.extend(check_sync(config, config_path))
    report.checks.append(check_clock(config, config_path))
    return report


def run_doctor(config: Config, config_path: Path | None, out: TextIO) -> int:
    """Print the report; 0 when no check failed, 1 otherwise."""
    report = diagnose(config, config_path)
    out.write(f"permitgate doctor: {config_path or '<embedded defaults>'}\n\nserial ports\n")
    if not report.ports:
        out.write("  none found\n")
    for port in report.ports:
        extra = "".join(f"\n      {name}" for name in port.by_id)
        out.write(f"  {port.device}  {port.description}".rstrip() + extra + "\n")
    out.write("\nchecks\n")
    for check in report.checks:
        out.write(check.line() + "\n")
    failed = sum(c.status == "fail" for c in report.checks)
    warned = sum(c.status == "warn" for c in report.checks)
    out.write(f"\n{failed} problem(s), {warned} warning(s)\n" if failed or warned
              else "\nall checks passed\n")
    return 1 if report.failed else 0
