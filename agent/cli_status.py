"""``permitgate status``: the agent's state as the store recorded it.

Doors, readers, the mode, the clock, the disk, the allowlist, revocations, the outbox, the
sync link (agent/sync_status.py) and the TLS certificate's expiry (agent/certexpiry.py),
as text or ``--json``; an agent recorded as running whose process is gone is shown as
ended without a clean stop.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import tzinfo
from typing import Any, TextIO

from agent import __version__
from agent.certexpiry import RENEW_HINT, gateway_certificate
from agent.cli_common import EXIT_OK, config_path, open_store
from agent.cli_events import local_time
from agent.config import Config
from agent.diskspace import usage
from agent.store import Store
from agent.sync_status import sync_report
from common.timefmt import age


def add_status_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``status`` on ``permitgate``'s subparsers."""
    status = sub.add_parser("status", parents=[common], help="show the agent's state")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)


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
    config, store = open_store(args)
    try:
        report = status_report(config, store)
    finally:
        store.close()
    cert = gateway_certificate(config, config_path(args))
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
