"""The ``permitgate`` command.

Exit status: 0 success, 1 a runtime failure (store, devices, a broken event chain),
2 unusable input (configuration, keys, arguments).

This module holds the parser, the entry point and the small commands (``run``,
``check-config``, ``demo``, ``keygen``, ``doctor``, ``safe-state``). The others are in
modules of their own, each registering its commands on the parser: agent/cli_status.py,
agent/cli_events.py, agent/cli_sim.py, agent/cli_migrate.py, agent/cli_tenants.py and
agent/cli_provision.py. What they share (exit statuses, ``UsageError``, the configuration
and store loaders) is in agent/cli_common.py, and importable from here as before.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict

from agent import __version__
from agent.cli_common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    FailureError,
    UsageError,
    config_path,
    existing_store,
    load,
    open_store,
)
from agent.cli_events import KNOWN_EVENT_KINDS, add_events_command, local_time, parse_since
from agent.cli_migrate import add_migrate_command
from agent.cli_provision import add_provision_command
from agent.cli_sim import add_sim_command
from agent.cli_status import add_status_command, status_report
from agent.cli_tenants import TenantUsageError, add_tenant_commands
from agent.config import Config, ConfigError
from agent.datalock import AlreadyRunningError
from agent.provision import ProvisionError
from agent.resolve import resolve_store_path
from agent.runtime import Agent
from common import logs
from common.sqlite import StoreError
from drivers.registry import DriverError
from protocol.hashing import SITE_KEY_BYTES, SecretError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "KNOWN_EVENT_KINDS", "FailureError",
           "UsageError", "build_parser", "configure_run_logs", "local_time", "main",
           "parse_since", "status_report"]

# The loaders under the names they had here; agent/cli_tenants.py, agent/cli_migrate.py
# and tests call them as ``cli._load`` and ``cli._open_store``.
_config_path = config_path
_load = load
_open_store = open_store
_existing_store = existing_store


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


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the self-contained demo."""
    from agent.demo import run_demo  # noqa: PLC0415 - keep the daemon's import light

    logs.configure("warning", "console", sys.stderr)
    return run_demo(out, Path(args.keep) if args.keep else None)


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
    add_status_command(sub, common)
    add_events_command(sub, common)

    demo = sub.add_parser("demo", help="a self-contained run showing decisions and reasons")
    demo.add_argument("--keep", metavar="DIR", help="keep the demo's database in DIR")
    demo.set_defaults(func=cmd_demo)
    add_sim_command(sub, common)

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

