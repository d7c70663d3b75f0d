"""The ``permitgate`` command.

Exit status: 0 success, 1 a runtime failure (store, devices, a broken event chain),
2 unusable input (configuration, keys, arguments).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import structlog
from structlog.typing import EventDict

from agent import __version__
from agent.certexpiry import RENEW_HINT, gateway_certificate
from agent.cli_migrate import add_migrate_command
from agent.cli_provision import add_provision_command
from agent.cli_tenants import TenantUsageError, add_tenant_commands
from agent.config import DEFAULT_CONFIG_NAME, Config, ConfigError, load_config
from agent.datalock import AlreadyRunningError
from agent.diskspace import free_bytes, looks_full, usage
from agent.provision import ProvisionError
from agent.resolve import resolve_store_path
from agent.runtime import Agent, check_drivers
from agent.store import Store, StoredEvent
from agent.sync_status import sync_report
from common import logs
from common.sqlite import StoreError
from common.timefmt import age
from drivers.registry import DriverError
from protocol.hashing import SITE_KEY_BYTES, SecretError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

KNOWN_EVENT_KINDS = (
    "access_granted", "access_denied",
    "door_locked", "door_unlocked", "door_opened", "door_closed", "door_forced",
    "door_held_open", "rex_pressed",
    "relay_fault", "contact_fault", "rex_fault",
    "relay_restored", "contact_restored", "rex_restored",
    "reader_online", "reader_offline", "reader_tamper", "reader_power",
    "agent_started", "agent_stopped", "clock_checked", "clock_changed", "prune_held",
    "disk_full", "disk_space_restored", "events_dropped",
    "mode_changed",
    "snapshot_applied", "delta_applied", "revocations_applied", "keys_announced",
    "sync_refused", "sync_stale", "sync_fresh", "event_store_high_water",
    "card_captured", "tenant_enrolled", "tenant_confirmed", "tenant_rejected",
    "tenant_moved_out", "tenant_lease_ended",
    "web_sign_in", "web_sign_in_failed", "web_signed_out", "web_account_created",
    "web_account_changed", "web_account_deleted",
)
"""Every event kind the agent writes (docs/events.md, "Event kinds"; a test keeps the two
in step). ``events --kind`` accepts these and any kind already stored."""


class UsageError(Exception):
    """A command-line argument is unusable; the message says which."""


class FailureError(Exception):
    """A runtime failure (exit status 1) that is not the store's; the message says which."""


def _config_path(args: argparse.Namespace) -> Path | None:
    raw = args.config or os.environ.get("PERMITGATE_CONFIG")
    return Path(raw) if raw else None


def _load(args: argparse.Namespace) -> tuple[Config, Path | None]:
    path = _config_path(args)
    config = load_config(path)
    try:
        check_drivers(config)
    except DriverError as exc:
        # Name the file, as configuration errors do: "readers[0].options.port" alone does
        # not say which of several configurations (--config, $PERMITGATE_CONFIG) was read.
        raise DriverError(f"{path or DEFAULT_CONFIG_NAME}: {exc}") from exc
    return config, path


def _open_store(args: argparse.Namespace) -> tuple[Config, Store]:
    config, path = _load(args)
    return config, _existing_store(config, path)


def _existing_store(config: Config, path: Path | None) -> Store:
    db = resolve_store_path(config, path)
    if not db.exists():
        raise StoreError(f"{db}: no database yet (start the agent once with "
                         "'permitgate run')")
    try:
        return Store(db)
    except StoreError as exc:
        if looks_full(exc, db.parent):
            raise StoreError(f"{db}: cannot be opened: the disk is full "
                             f"({free_bytes(db.parent)} bytes free). A running agent denies "
                             "every card it cannot record and opens the store by itself "
                             "once there is room: free space on this file system") from exc
        raise


def configure_run_logs(config: Config, fmt: str) -> None:
    """The agent's logs as ``common.logs`` sets them up; on a terminal (console format)
    with times in the site's time zone and without fields that hold nothing (a
    ``door_unlocked`` has no reason, rather than ``reason=None``). JSON lines (the journal)
    keep UTC times and every field."""
    logs.configure(config.logging.level, fmt)
    processors = list(structlog.get_config()["processors"])
    if not processors or not isinstance(processors[-1], structlog.dev.ConsoleRenderer):
        return
    zone = config.zone

    def site_time(_logger: Any, _name: str, event: EventDict) -> EventDict:
        fields = {k: v for k, v in event.items() if v is not None}
        fields["timestamp"] = datetime.now(zone).isoformat(sep=" ", timespec="milliseconds")
        return fields

    processors = [p for p in processors if not isinstance(p, structlog.processors.TimeStamper)]
    structlog.configure(processors=[*processors[:-1], site_time, processors[-1]])


# -- commands ------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    """Run the agent until SIGTERM/SIGINT."""
    config, path = _load(args)
    configure_run_logs(config, args.log_format or config.logging.format)
    agent = Agent(config, config_path=path)
    if path is None:
        out.write("permitgate: no --config given, running the embedded defaults (a simulated "
                  f"building; database under {agent.store_path.parent}).\n"
                  "  tap a card from another terminal: permitgate sim tap front-in "
                  "em4100:67003B51C6\n")
        out.flush()
        from agent.demo import seed_demo  # noqa: PLC0415 - demo code only for defaults

        original_start = agent.start

        def start_and_seed() -> None:
            original_start()
            assert agent.store is not None and agent.hasher is not None
            seed_demo(agent.store, agent.hasher, datetime.now(config.zone))

        agent.start = start_and_seed  # type: ignore[method-assign]
    agent.run_forever()
    return EXIT_FAILURE if agent.failed else EXIT_OK


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    """Validate the configuration and every driver's options; open nothing."""
    config, path = _load(args)
    readers = config.readers
    out.write(f"{path or '<embedded defaults>'}: OK\n"
              f"  site {config.site.site_id}, gateway {config.site.gateway_id}, "
              f"time zone {config.site.timezone}\n"
              f"  {len(config.doors)} door(s): "
              f"{', '.join(f'{d.id} ({d.fail_mode}, {d.unlock_s:g} s)' for d in config.doors)}\n"
              f"  {len(config.readers)} reader(s): "
              f"{', '.join(f'{r.id} ({r.driver}, {r.door} {r.direction})' for r in readers)}\n"
              f"  store {resolve_store_path(config, path)}\n")
    return EXIT_OK


def local_time(ms: int, zone: tzinfo, timespec: str = "milliseconds") -> str:
    """Unix milliseconds as the site's local time with its offset,
    ``2026-11-26 19:32:35.155+01:00``; ``--since`` reads the same form back."""
    return datetime.fromtimestamp(ms / 1000, zone).isoformat(sep=" ", timespec=timespec)


def _ago(ms: int | None, zone: tzinfo) -> str:
    if ms is None:
        return "never"
    return f"{local_time(ms, zone, 'seconds')} ({age(time.time() - ms / 1000)})"


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_report(config: Config, store: Store) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data."""
    devices: dict[str, dict[str, Any]] = {}
    for row in store.device_states():
        state = json.loads(row["state"])
        devices.setdefault(row["kind"], {})[row["id"]] = {**state, "since_ms": row["since_ms"]}
    syncs = {row["stream"]: row for row in store.sync_states()}
    allowlist = syncs.get("list")
    counts = store.counts()
    agent = devices.get("system", {}).get("agent", {"state": "never started"})
    if agent.get("state") == "running" and not _pid_alive(agent.get("pid")):
        # Recorded as running, but that process is gone: it was killed or crashed before
        # it could record its stop (the next start records the recovery).
        agent = {**agent, "state": "not running (ended without a clean stop)"}
    doors = {}
    for d in config.doors:
        door = devices.get("door", {}).get(d.id, {"lock": "unknown"})
        if d.contact is None:
            door = {**door, "contact": "not monitored"}
        doors[d.id] = door
    return {
        "site": config.site.site_id,
        "gateway": config.site.gateway_id,
        "agent": agent,
        "mode": devices.get("system", {}).get("mode", {"mode": config.policy.mode})["mode"],
        "clock": devices.get("system", {}).get("clock", {"state": "unknown"}),
        "disk": {**devices.get("system", {}).get("disk", {"state": "ok"}),
                 **usage(store.path.parent)},
        "doors": doors,
        "readers": {r.id: devices.get("reader", {}).get(r.id, {"state": "unknown"})
                    for r in config.readers},
        "allowlist": {"entries": counts["credentials"],
                      "version": allowlist["version"] if allowlist else None,
                      "applied_ms": allowlist["updated_ms"] if allowlist else None},
        "revocations": counts["revocations"],
        "events": counts["events"],
        "outbox": counts["outbox"],
        "last_sync_ms": max((r["updated_ms"] for r in syncs.values()), default=None),
        "sync": sync_report(config.sync, store, devices.get("system", {}).get("sync")),
        "schema_version": store.schema_version(),
        "version": __version__,
    }


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """Show doors, readers, allowlist, outbox, last sync and clock state."""
    config, store = _open_store(args)
    try:
        report = status_report(config, store)
    finally:
        store.close()
    cert = gateway_certificate(config, _config_path(args))
    report["certificate"] = None if cert is None else cert.as_dict()
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
        return EXIT_OK
    zone = config.zone
    agent = report["agent"]
    out.write(f"site {report['site']}  gateway {report['gateway']}\n"
              f"agent      {agent.get('state')}"
              f"{' (pid ' + str(agent['pid']) + ')' if agent.get('pid') else ''}"
              f", since {_ago(agent.get('since_ms'), zone)}\n"
              f"version    {_version_line(report)}\n"
              f"mode       {report['mode']}\n"
              f"clock      {report['clock']['state']}, time zone {config.site.timezone}\n")
    disk = report["disk"]
    free_mb = disk.get("free_bytes", 0) / (1 << 20)
    full = "FULL: cards it cannot record are denied; " if disk["state"] == "full" else ""
    out.write(f"disk       {full}{free_mb:.1f} MiB free\n")
    for door_id, door in report["doors"].items():
        alarm = f", ALARM {door['alarm']}" if door.get("alarm") else ""
        if door.get("faults"):
            alarm += f", FAULT {' '.join(door['faults'])}"
        out.write(f"door       {door_id}: {door.get('lock')}, {door.get('contact', '?')}"
                  f"{alarm}\n")
    for reader_id, reader in report["readers"].items():
        out.write(f"reader     {reader_id}: {reader.get('state')}\n")
    allow = report["allowlist"]
    applied = ("none received yet" if allow["version"] is None
               else f"version {allow['version']}, applied {_ago(allow['applied_ms'], zone)}")
    out.write(f"allowlist  {allow['entries']} entries, {applied}\n"
              f"revoked    {report['revocations']}\n")
    sync = report["sync"]
    if not sync["enabled"]:
        # Without sync nothing is delivered and nothing is synced: an outbox count and a
        # "last sync: never" would only suggest a fault.
        out.write(f"events     {report['events']} stored\n"
                  "sync       off\n")
    else:
        out.write(f"events     {report['events']} stored, {report['outbox']} not yet "
                  "delivered (outbox)\n"
                  f"last sync  {_ago(report['last_sync_ms'], zone)}\n")
        stale = {True: "STALE", False: "fresh", None: "not checked"}[sync["stale"]]
        refused = ", ".join(f"{k} {v}" for k, v in sync["refused"].items()) or "none"
        out.write(f"sync       {sync['link'] or 'not started'}, lists {stale}, "
                  f"refused {refused}\n")
    if cert is not None:
        if cert.state == "unchecked":
            # There, but not readable by this user (root-only credentials): a note on how
            # to check it, not an alarm about the certificate.
            out.write(f"tls cert   NOTE {cert.message}; check it with: {cert.check_with}\n")
        else:
            label = {"ok": "", "expiring": "WARNING ", "expired": "ALARM "}.get(cert.state,
                                                                               "ALARM ")
            hint = "" if cert.state == "ok" else f"; {RENEW_HINT}"
            out.write(f"tls cert   {label}{cert.message}{hint}\n")
    return EXIT_OK


def _version_line(report: dict[str, Any]) -> str:
    """This program's version, and the running agent's when that is another (an upgrade
    installed but the agent not restarted since)."""
    running = report["agent"].get("version")
    if report["agent"].get("state") != "running" or running in (None, report["version"]):
        return str(report["version"])
    return f"{report['version']} installed; the agent runs {running} (restart it)"


_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_since(text: str, zone: tzinfo | None = None) -> int:
    """``"15m"``, ``"2h"``, ``"7d"`` ago, or an ISO 8601 time, as Unix milliseconds.

    An ISO time without an offset is read in ``zone`` (the site's, as ``events`` prints
    times), or in the local time zone of this machine when ``zone`` is None.
    """
    match = _DURATION.match(text)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return int((time.time() - int(match.group(1)) * unit) * 1000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r}: use a duration such as 15m, 2h, 7d or an ISO "
                         "time such as 2026-11-26T08:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zone) if zone is not None else when.astimezone()
    return int(when.timestamp() * 1000)


_COLUMNS = ("SEQ", "TIME", "KIND", "DOOR/READER", "DIR", "REASON", "CRED", "DATA")
_WIDTHS = (6, 29, 16, 14, 5, 14, 10, 0)
"""The text columns of ``events``, and the narrowest width of each (``-f`` keeps these:
rows printed later cannot widen rows already printed)."""


def _event_cells(ev: StoredEvent, zone: tzinfo) -> list[str]:
    where = "/".join(x for x in (ev.door, ev.reader) if x)
    # A field that holds nothing is left out, never shown as "None".
    extra = " ".join(f"{k}={_value(v)}" for k, v in ev.data.items() if v is not None)
    return [str(ev.seq), local_time(ev.ts_ms, zone), ev.kind, where, ev.direction or "",
            ev.reason or "", ev.cred or "", extra]


def _value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return json.dumps(text) if any(c.isspace() for c in text) or not text else text


def _header(zone_name: str) -> list[str]:
    labels = list(_COLUMNS)
    labels[1] = f"TIME ({zone_name})"
    return labels


def _widths(rows: Sequence[Sequence[str]]) -> list[int]:
    """Each column as wide as its widest cell (the last, DATA, is not padded)."""
    widths = list(_WIDTHS)
    for row in rows:
        widths[:-1] = [max(w, len(cell)) for w, cell in zip(widths[:-1], row, strict=False)]
    return widths


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = [cell.rjust(w) if i == 0 else cell.ljust(w)
              for i, (cell, w) in enumerate(zip(cells, widths, strict=True))]
    return "  ".join(padded).rstrip() + "\n"


def _print_events(events: Sequence[StoredEvent], out: TextIO, as_json: bool,
                  zone: tzinfo, widths: Sequence[int] | None = None) -> None:
    for ev in events:
        if as_json:
            out.write(json.dumps(ev.as_dict(), sort_keys=True) + "\n")
        else:
            out.write(_line(_event_cells(ev, zone), widths or _WIDTHS))


def _check_filters(args: argparse.Namespace, config: Config, store: Store) -> None:
    """A ``--kind`` or ``--door`` that nothing known matches is a usage error listing the
    known ones: a typo would otherwise look like "no such events"."""
    kind, door = args.kind, args.door
    if kind is not None and kind not in KNOWN_EVENT_KINDS and not store.events(
            kind=kind, limit=1):
        close = difflib.get_close_matches(kind, KNOWN_EVENT_KINDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"--kind {kind!r}: no such event kind; {hint}known kinds: "
                         f"{', '.join(sorted(KNOWN_EVENT_KINDS))} (docs/events.md)")
    doors = [d.id for d in config.doors]
    if door is not None and door not in doors and not store.events(door=door, limit=1):
        raise UsageError(f"--door {door!r}: no such door in the configuration or the "
                         f"event log (doors: {', '.join(doors)})")


def _verify(store: Store, out: TextIO) -> int:
    report = store.verify_chain()
    if report.ok and report.checked == 0:
        out.write("OK: no events stored\n")
        return EXIT_OK
    if report.ok:
        out.write(f"OK: {report.checked} events, seq {report.first_seq} to "
                  f"{report.last_seq}, hash chain intact\n")
        return EXIT_OK
    out.write(f"BROKEN: {len(report.problems)} problem(s) in {report.checked} events\n")
    for problem in report.problems:
        out.write(f"  {problem}\n")
    return EXIT_FAILURE


def _table_start(events: Sequence[StoredEvent], out: TextIO, zone_name: str, *,
                 follow: bool, filtered: bool) -> list[int]:
    """Write the column headers (or say that there is nothing to show); the widths of
    the columns."""
    header = _header(zone_name)
    if not events and not follow:
        out.write("no matching events\n" if filtered else "no events stored\n")
        return list(_WIDTHS)
    # Following, a later row may be wider than any so far: keep the default widths.
    zone = ZoneInfo(zone_name)
    widths = (list(_WIDTHS) if follow
              else _widths([header, *(_event_cells(e, zone) for e in events)]))
    if len(header[1]) > widths[1]:
        header[1] = "TIME"  # a zone name too long for the column
    out.write(_line(header, widths))
    return widths


def cmd_events(args: argparse.Namespace, out: TextIO) -> int:
    """Tail, filter or verify the event log."""
    config, path = _load(args)
    zone = config.zone
    # A bad --since is a usage error whatever state the store is in, so check it first.
    since = parse_since(args.since, zone) if getattr(args, "since", None) else None
    store = _existing_store(config, path)
    try:
        if args.action == "verify":
            return _verify(store, out)
        _check_filters(args, config, store)
        events = store.events(kind=args.kind, door=args.door, reason=args.reason,
                              since_ms=since, limit=args.n, newest_first=True)
        events.reverse()
        follow = args.action == "tail" and args.follow
        widths = list(_WIDTHS)
        if not args.json:
            filtered = any(x is not None for x in (args.kind, args.door, args.reason, since))
            widths = _table_start(events, out, config.site.timezone, follow=follow,
                                  filtered=filtered)
        _print_events(events, out, args.json, zone, widths)
        if follow:
            newest = store.events(newest_first=True, limit=1)
            after = newest[0].seq if newest else 0
            while True:
                out.flush()
                time.sleep(0.5)
                fresh = store.events(after_seq=after, kind=args.kind, door=args.door,
                                     reason=args.reason)
                _print_events(fresh, out, args.json, zone, widths)
                if fresh:
                    after = fresh[-1].seq
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        store.close()
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the self-contained demo."""
    from agent.demo import run_demo  # noqa: PLC0415 - keep the daemon's import light

    logs.configure("warning", "console", sys.stderr)
    return run_demo(out, Path(args.keep) if args.keep else None)


def _sim_message(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    """The request ``sim tap``/``sim input`` sends, checked against the configuration."""
    from agent import control  # noqa: PLC0415 - the sim command's own import

    if args.sim_action == "input":
        inputs = control.simulated_inputs(config)
        if args.name not in inputs:
            raise UsageError(f"no simulated input {args.name!r} in the configuration "
                             f"(simulated inputs: {', '.join(sorted(inputs)) or 'none'})")
        return {"op": "input", "name": args.name, "active": args.level == "on"}
    if args.reader not in {r.id for r in config.readers}:
        raise UsageError(f"no reader {args.reader!r} in the configuration")
    if args.reader not in control.simulated_readers(config):
        raise UsageError(f"reader {args.reader!r} is not simulated: present a real card")
    # The card is not repeated in the message: it may be a real card's number.
    problem = control.card_problem(args.card)
    if problem is not None:
        raise UsageError(f"card id refused: {problem}")
    return {"op": "tap", "reader": args.reader, "card": args.card}


def _sim_send(sock_path: Path, msg: dict[str, Any]) -> dict[str, Any]:
    """The agent's reply to ``msg``; ``FailureError`` when no agent answers."""
    from agent import control  # noqa: PLC0415 - the sim command's own import

    try:
        return control.request(sock_path, msg)
    except (FileNotFoundError, ConnectionRefusedError):
        raise FailureError(f"no agent with simulated devices is listening at {sock_path} "
                           "(start it with 'permitgate run')") from None
    except TimeoutError:
        raise FailureError(f"the agent at {sock_path} did not answer within "
                           f"{control.CLIENT_TIMEOUT_S:g} s") from None
    except OSError as exc:
        # e.g. PermissionError (the agent's socket is mode 0600, owned by its user) or a
        # socket path longer than AF_UNIX allows (108 bytes on Linux).
        raise FailureError(f"cannot reach the agent at {sock_path}: "
                           f"{exc.strerror or exc}") from None
    except ValueError:
        raise FailureError(f"the agent at {sock_path} answered with something other "
                           "than a JSON object") from None


def cmd_sim(args: argparse.Namespace, out: TextIO) -> int:
    """Send a tap or an input change to a running agent's simulated devices; print what
    it answered (for a tap, the decision and its reason)."""
    config, path = _load(args)
    sock_path = resolve_store_path(config, path).parent / "sim.sock"
    reply = _sim_send(sock_path, _sim_message(args, config))
    if reply.get("ok") is not True:
        error, message = str(reply.get("error")), str(reply.get("message"))
        text = f"the agent refused the {args.sim_action}: {message} ({error})"
        if error in {"bad_request", "unknown_op", "unknown_reader", "unknown_input",
                     "too_large", "malformed"}:
            raise UsageError(text)
        raise FailureError(text)
    if args.sim_action == "tap":
        verdict = "OPEN  " if reply.get("granted") is True else "DENIED"
        out.write(f"{verdict} {reply.get('reason')}\n")
    else:
        out.write(f"{args.name} {args.level}\n")
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace, out: TextIO) -> int:
    """Write a new random site key (for a test site or the central office)."""
    path = Path(args.path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path}: exists already; refusing to overwrite a key") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot create the key file: {exc.strerror}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(SITE_KEY_BYTES).hex() + "\n")
    out.write(f"wrote a {SITE_KEY_BYTES}-byte site key to {path} (mode 0600)\n")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    """Check devices, files and the clock; print fixes (agent/doctor.py)."""
    from agent.doctor import run_doctor  # noqa: PLC0415 - keep the daemon's import light

    config, path = _load(args)
    return run_doctor(config, path, out)


def cmd_safe_state(args: argparse.Namespace, out: TextIO) -> int:
    """Drive every relay to its door's safe state (systemd ``ExecStopPost=``)."""
    from drivers import registry  # noqa: PLC0415

    config, _ = _load(args)
    failed = 0
    for door in config.doors:
        problem: Exception | None = None
        try:
            relay = registry.create("relay", door.relay.driver, f"{door.id}.relay",
                                    door.relay.options)
        except Exception as exc:  # noqa: BLE001 - try every door, report each
            relay, problem = None, exc
        if relay is not None:
            try:
                relay.open()
                relay.set(door.fail_mode == "safe")
            except Exception as exc:  # noqa: BLE001 - try every door, report each
                problem = exc
            finally:
                # Release the relay on every path, a failed set included.
                try:
                    relay.close()
                except Exception as exc:  # noqa: BLE001 - reported with the door below
                    problem = problem or exc
        if problem is None:
            state = "unlocked (fail-safe)" if door.fail_mode == "safe" else "locked"
            out.write(f"{door.id}: {state}\n")
        else:
            failed += 1
            out.write(f"{door.id}: FAILED to reach safe state: {problem}\n")
    return EXIT_FAILURE if failed else EXIT_OK


# -- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``permitgate``."""
    # -c is accepted before or after the subcommand; SUPPRESS keeps a subcommand's
    # absent -c from overwriting one given earlier on the line.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help="configuration "
                        "file (default: $PERMITGATE_CONFIG, else the embedded defaults)")
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("-c", "--config", help="configuration file (default: "
                        "$PERMITGATE_CONFIG, else the embedded simulated defaults)")
    parser = argparse.ArgumentParser(prog="permitgate", parents=[top], description=(
        "Offline residence-permit door access agent."))
    parser.add_argument("--version", action="version", version=f"permitgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the agent")
    run.add_argument("--log-format", choices=("auto", "json", "console"))
    run.set_defaults(func=cmd_run)
    sub.add_parser("check-config", parents=[common], help="validate the configuration"
                   ).set_defaults(func=cmd_check_config)
    status = sub.add_parser("status", parents=[common], help="show the agent's state")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    events = sub.add_parser("events", parents=[common], help="read and verify the event log")
    ev_sub = events.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, helptext in (("tail", "the newest events"), ("filter", "events matching "
                                                                      "filters")):
        p = ev_sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("-n", type=_positive, default=20 if name == "tail" else None,
                       help="at most N events")
        p.add_argument("--kind", help="e.g. access_denied, door_forced")
        p.add_argument("--door")
        p.add_argument("--reason", help="e.g. revoked, expired, unknown_card")
        p.add_argument("--since", help="15m, 2h, 7d, or an ISO time")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        if name == "tail":
            p.add_argument("-f", "--follow", action="store_true")
        p.set_defaults(func=cmd_events, follow=False)
    ev_sub.add_parser("verify", parents=[common], help="check the hash chain for gaps and "
                      "edits").set_defaults(func=cmd_events)

    demo = sub.add_parser("demo", help="a self-contained run showing decisions and reasons")
    demo.add_argument("--keep", metavar="DIR", help="keep the demo's database in DIR")
    demo.set_defaults(func=cmd_demo)

    sim = sub.add_parser("sim", parents=[common], help="drive a running agent's simulated "
                         "devices")
    sim_sub = sim.add_subparsers(dest="sim_action", required=True, metavar="ACTION")
    tap = sim_sub.add_parser("tap", parents=[common], help="present a card")
    tap.add_argument("reader")
    tap.add_argument("card", help="normalised card id, e.g. em4100:67003B51C6")
    tap.set_defaults(func=cmd_sim)
    inp = sim_sub.add_parser("input", parents=[common], help="set a door input")
    inp.add_argument("name", help="e.g. front.contact or front.rex")
    inp.add_argument("level", choices=("on", "off"))
    inp.set_defaults(func=cmd_sim)

    keygen = sub.add_parser("keygen", help="write a new random site key file")
    keygen.add_argument("path")
    keygen.set_defaults(func=cmd_keygen)
    sub.add_parser("doctor", parents=[common], help="check devices, files and the clock"
                   ).set_defaults(func=cmd_doctor)
    sub.add_parser("safe-state", parents=[common], help="put every relay in its safe state"
                   ).set_defaults(func=cmd_safe_state)
    add_migrate_command(sub, common)
    add_tenant_commands(sub, common)
    add_provision_command(sub)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the ``permitgate`` console script."""
    stdout = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, stdout))
    except (ConfigError, DriverError, SecretError, UsageError, AlreadyRunningError,
            TenantUsageError, ProvisionError) as exc:
        sys.stderr.write(f"permitgate: {exc}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except (StoreError, FailureError, OSError) as exc:
        # OSError: the environment refused (permission denied on the state directory, a
        # name too long); a message and status 1, not a traceback.
        sys.stderr.write(f"permitgate: {exc}\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())


