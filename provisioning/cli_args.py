"""The argument types of ``permitgate-central``'s options (provisioning/central_cli.py
and the command modules it registers), and the parent parser of ``--chunk-rate``."""

from __future__ import annotations

import argparse

from common.argtypes import positive
from provisioning.central import DEFAULT_CHUNK_RATE

__all__ = ["positive", "rate", "seconds"]


def seconds(text: str) -> float:
    """A number of seconds, 0 (off) or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (off) or more")
    return value


RATE_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def rate(text: str) -> int:
    """Bytes per second: a whole number, optionally with k, M or G (powers of 1,000)."""
    unit = text[-1:].lower() if text[-1:].isalpha() else ""
    try:
        value = int(float(text[:len(text) - len(unit)]) * RATE_UNITS[unit])
    except (KeyError, ValueError, OverflowError):  # nan, inf too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes per second "
                                         "(such as 4000000 or 4M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (snapshots unpaced) or more "
                                         "bytes per second")
    return value


def pacing() -> argparse.ArgumentParser:
    """A parent parser with ``--chunk-rate``, for the commands that publish snapshots
    (``publish`` uses it when no ``serve`` runs, else ``serve``'s own setting applies)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--chunk-rate", type=rate, default=DEFAULT_CHUNK_RATE,
                        metavar="BYTES_PER_S", help="send each gateway a snapshot's chunks "
                        f"at most this fast (default {DEFAULT_CHUNK_RATE:,}, what a "
                        "Pi-class gateway applies; k, M allowed; 0: unpaced)")
    return parser
