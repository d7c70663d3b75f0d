"""The typed operations the office publishes (``provisioning.publish.Publisher.perform``
runs them): plain values, so that a one-shot command can hand them to a running ``serve``
through the database (``provisioning.handoff``), and the bounds ``Publisher.check``
holds them to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from protocol.messages import Command, Revoked

MAX_CHUNK_ENTRIES = 10_000
"""The most entries (and revocations) one chunk may be given (``--chunk-entries``)."""
CHUNK_ENTRIES = 1_000
"""Entries per chunk by default: a gateway stages a chunk in one short step (about 20 ms
on the reference hardware) and applies the revocations waiting between steps, so a
revocation is not held up behind a long chunk (bench/revocation.py). A million entries
are 1,000 chunks, a tenth of ``protocol.messages.MAX_CHUNKS``."""
REVOCATION_ITEMS = 1_000
"""Items per revocation message when the office revokes many at once (``Central.revoke``
splits larger sets): a gateway parses one in about a millisecond, where a message of
``MAX_ITEMS`` holds its interpreter lock for 100 ms and more (docs/performance.md)."""

COMMAND_ACTIONS: tuple[str, ...] = get_args(Command.model_fields["action"].annotation)


@dataclass(frozen=True, slots=True)
class PublishSnapshot:
    """Send ``gateway`` its whole allowlist as the next version, in chunks of at most
    ``chunk_entries`` entries (and revocations)."""

    gateway: str
    chunk_entries: int = CHUNK_ENTRIES


@dataclass(frozen=True, slots=True)
class PublishDelta:
    """Send the stored entries of the credential hashes ``upsert`` and the removal of
    ``remove`` as the next version."""

    gateway: str
    upsert: tuple[bytes, ...] = ()
    remove: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Revoke:
    """Revoke ``items`` at gateway ``target``, or at every gateway with ``"*"``."""

    target: str
    items: tuple[Revoked, ...]


@dataclass(frozen=True, slots=True)
class SendCommand:
    """Send an operational command (one of ``COMMAND_ACTIONS``)."""

    gateway: str
    action: str


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    """Send 'your lists are current as of these versions'."""

    gateway: str


@dataclass(frozen=True, slots=True)
class HeartbeatAll:
    """A heartbeat to every registered gateway."""


@dataclass(frozen=True, slots=True)
class AnnounceKeys:
    """Send every gateway the office's signing keys and their states (``keys``)."""


@dataclass(frozen=True, slots=True)
class RetireKey:
    """Stop signing with ``kid`` and announce it retired (``retiring`` for ``grace_s``)."""

    kid: str
    grace_s: int = 0


Operation = (PublishSnapshot | PublishDelta | Revoke | SendCommand | SendHeartbeat
             | HeartbeatAll | AnnounceKeys | RetireKey)
OpResult = int | dict[str, int]
"""What an operation returns: the seq or version used, or (``HeartbeatAll``) one per
gateway."""
