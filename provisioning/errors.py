"""The office's errors, shared by every room (``permitgate-central`` maps them to exit
statuses: ``CentralError`` 1, ``CentralUsageError`` 2)."""

from __future__ import annotations


class CentralError(Exception):
    """A runtime failure (database, broker); the message says which."""


class PublishError(CentralError):
    """The broker could not be reached or did not acknowledge a message."""


class CentralUsageError(ValueError):
    """An argument or a key file is unusable; the message names it."""
