"""Argument types shared by the gateway's and the office's command lines."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """A whole number, at least 1 (an ``argparse`` type: a bad value is a usage error
    naming it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value
