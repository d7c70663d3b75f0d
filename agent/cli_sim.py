"""``permitgate sim``: drive a running agent's simulated devices.

``sim tap READER CARD`` presents a card at a simulated reader and prints the decision it
led to; ``sim input NAME on|off`` sets a simulated door input. Both are checked against
the configuration first, then sent over the agent's control socket (``sim.sock``,
agent/control.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from agent.cli_common import EXIT_OK, FailureError, UsageError, load
from agent.config import Config
from agent.resolve import resolve_store_path


def add_sim_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``sim`` on ``permitgate``'s subparsers."""
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
    config, path = load(args)
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
