"""One publisher per folder: the folder lock, and one-shot commands handed to ``serve``.

Every sequence number of a folder must come from one ordered publisher. ``serve`` holds
``serve.lock`` exclusively; a one-shot command takes it shared and, when it cannot (a
``serve`` is running), does not connect to the broker at all: with the shipped broker
configuration (``use_username_as_clientid``) a second connection with the office
certificate would take over serve's session. It queues its operation in the database's
request queue instead and waits for serve's answer.

The request format (the ``requests`` table of ``central.db``; both sides are this code,
so it only has to agree with itself across one upgrade):

- ``op``: the operation's name: ``snapshot``, ``delta``, ``revoke``, ``command``,
  ``heartbeat``, ``heartbeat_all``, ``announce_keys``, ``retire_key``,
  ``confirm_enrollment``, ``reject_enrollment``, ``start_site_key``, ``finish_site_key``;
- ``args``: a JSON object of its fields: ``snapshot`` ``{"gateway", "chunk_entries"}``;
  ``delta`` ``{"gateway", "upsert": [b64 credential hash…], "remove": [b64…]}``;
  ``revoke`` ``{"target", "items": [{"kind", "hash"}…]}``; ``command``
  ``{"gateway", "action"}``; ``heartbeat`` ``{"gateway"}``; ``heartbeat_all`` ``{}``;
  ``announce_keys`` ``{}``; ``retire_key`` ``{"kid", "grace_s"}``;
  ``confirm_enrollment`` ``{"gateway", "enrollment"}``; ``reject_enrollment``
  ``{"gateway", "enrollment", "reason"}``; ``start_site_key`` ``{"gateway"}``;
  ``finish_site_key`` ``{"gateway", "force"}``. Hashes and ids only, never a card or permit
  number;
- the outcome: ``result`` (JSON: the seq or version; for ``heartbeat_all`` an object of
  seqs by gateway; for the enrollment operations ``{"enr": seq}`` and, when the list
  changed, ``"list": version``) or ``error_kind`` ``usage`` (exit 2 for the command),
  ``failure``, ``expired`` with ``error`` text.

A request waits at most ``REQUEST_TIMEOUT_S`` to be taken; once serve has taken it, its
outcome (sent or not) is worth waiting for.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, assert_never

import structlog

from protocol.messages import Revoked
from protocol.signing import b64, unb64
from provisioning.db import OfficeDatabase, RequestOutcome
from provisioning.errors import CentralUsageError, PublishError
from provisioning.publish import (
    AnnounceKeys,
    HeartbeatAll,
    Operation,
    OpResult,
    PublishDelta,
    PublishSnapshot,
    RetireKey,
    Revoke,
    SendCommand,
    SendHeartbeat,
)
from provisioning.site_rotation import FinishSiteKey, SiteKeyOp, StartSiteKey
from provisioning.tenants import ConfirmEnrollment, EnrollmentOp, RejectEnrollment

log = structlog.get_logger()

LOCK_NAME = "serve.lock"
"""Held exclusively by ``serve`` (one per folder) and shared by a one-shot publisher."""
REQUEST_TIMEOUT_S = 30.0
"""How long a one-shot command waits for the running ``serve`` to take its request."""
KEEP_DONE_MS = 86_400_000
"""Finished requests are forgotten a day later (at the next start of ``serve``)."""

Request = Operation | EnrollmentOp | SiteKeyOp
"""Everything a one-shot command can hand to a running ``serve``."""


def wall_ms() -> int:
    """Real time (requests cross processes, whose test clocks may differ)."""
    return time.time_ns() // 1_000_000


class FolderLock:
    """``serve.lock`` of one folder, held for the life of its holder."""

    def __init__(self, folder: Path) -> None:
        self._path = folder / LOCK_NAME
        self._fd: int | None = None

    def hold(self, *, exclusive: bool) -> bool:
        """Take the lock (``serve``: exclusive; a one-shot publisher: shared); False when
        someone else holds it the other way. Holding it already counts."""
        if self._fd is not None:
            return True
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        """Let go of the lock, if held."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


# -- the request format ---------------------------------------------------------------


def encode(op: Request) -> tuple[str, str]:  # noqa: PLR0912 - one case per operation
    """``(op, args)`` of the request format (see the module docstring)."""
    args: dict[str, Any]
    match op:
        case PublishSnapshot(gateway, chunk_entries):
            name, args = "snapshot", {"gateway": gateway, "chunk_entries": chunk_entries}
        case PublishDelta(gateway, upsert, remove):
            name, args = "delta", {"gateway": gateway, "upsert": [b64(c) for c in upsert],
                                   "remove": [b64(c) for c in remove]}
        case Revoke(target, items):
            name, args = "revoke", {"target": target,
                                    "items": [i.model_dump() for i in items]}
        case SendCommand(gateway, action):
            name, args = "command", {"gateway": gateway, "action": action}
        case SendHeartbeat(gateway):
            name, args = "heartbeat", {"gateway": gateway}
        case HeartbeatAll():
            name, args = "heartbeat_all", {}
        case AnnounceKeys():
            name, args = "announce_keys", {}
        case RetireKey(kid, grace_s):
            name, args = "retire_key", {"kid": kid, "grace_s": grace_s}
        case ConfirmEnrollment(gateway, enrollment):
            name, args = "confirm_enrollment", {"gateway": gateway, "enrollment": enrollment}
        case RejectEnrollment(gateway, enrollment, reason):
            name, args = "reject_enrollment", {"gateway": gateway, "enrollment": enrollment,
                                               "reason": reason}
        case StartSiteKey(gateway):
            name, args = "start_site_key", {"gateway": gateway}
        case FinishSiteKey(gateway, force):
            name, args = "finish_site_key", {"gateway": gateway, "force": force}
        case _:
            assert_never(op)
    return name, json.dumps(args)


_DECODERS: dict[str, Callable[[dict[str, Any]], Request]] = {
    "snapshot": lambda a: PublishSnapshot(a["gateway"], int(a["chunk_entries"])),
    "delta": lambda a: PublishDelta(a["gateway"], tuple(unb64(c) for c in a["upsert"]),
                                    tuple(unb64(c) for c in a["remove"])),
    "revoke": lambda a: Revoke(a["target"], tuple(Revoked(**item) for item in a["items"])),
    "command": lambda a: SendCommand(a["gateway"], a["action"]),
    "heartbeat": lambda a: SendHeartbeat(a["gateway"]),
    "heartbeat_all": lambda _a: HeartbeatAll(),
    "announce_keys": lambda _a: AnnounceKeys(),
    "retire_key": lambda a: RetireKey(a["kid"], int(a["grace_s"])),
    "confirm_enrollment": lambda a: ConfirmEnrollment(a["gateway"], a["enrollment"]),
    "reject_enrollment": lambda a: RejectEnrollment(a["gateway"], a["enrollment"],
                                                    a["reason"]),
    "start_site_key": lambda a: StartSiteKey(a["gateway"]),
    "finish_site_key": lambda a: FinishSiteKey(a["gateway"], bool(a["force"])),
}


def decode(name: str, args_json: str) -> Request:
    """The operation a request names; ``ValueError`` when it names none."""
    decoder = _DECODERS.get(name)
    if decoder is None:
        raise ValueError(f"unknown operation {name!r}")
    return decoder(json.loads(args_json))


def decode_result(text: str) -> OpResult:
    """A request's ``result``."""
    value = json.loads(text)
    if isinstance(value, dict):
        return {str(k): int(v) for k, v in value.items()}
    return int(value)


# -- both ends of the queue -----------------------------------------------------------


class RequestQueue:
    """The request queue of one folder: ``submit`` on the command's side, ``serve_pending``
    and ``reset`` on serve's."""

    def __init__(self, db: OfficeDatabase, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self._db = db
        self.timeout_s = timeout_s

    def submit(self, op: Request) -> OpResult:
        """Queue ``op`` for the running ``serve`` and wait for its outcome."""
        name, args = encode(op)
        request = self._db.queue_request(name, args, wall_ms())
        log.debug("request_queued", op=name, request=request)
        deadline = time.monotonic() + self.timeout_s
        while True:
            outcome = self._db.request_outcome(request)
            if outcome is not None:
                break
            if time.monotonic() > deadline:
                # Withdrawn only if serve has not claimed it; once claimed, its outcome
                # (sent or not) is worth waiting for.
                if self._db.withdraw_request(request, wall_ms()):
                    raise PublishError(f"the running 'serve' did not take the request within "
                                       f"{self.timeout_s:g} s; nothing was sent")
                deadline = time.monotonic() + self.timeout_s
            time.sleep(0.05)
        if outcome.error_kind == "usage":
            raise CentralUsageError(outcome.error)
        if outcome.error_kind is not None:
            raise PublishError(f"serve: {outcome.error or outcome.error_kind}")
        return decode_result(outcome.result or "null")

    def serve_pending(self, perform: Callable[[Request], OpResult]) -> None:
        """Perform what one-shot commands queued for this ``serve`` (worker thread)."""
        for pending in self._db.open_requests():
            result, kind, error = None, None, None
            if not self._db.take_request(pending.id, wall_ms()):
                continue  # withdrawn by its command meanwhile
            if wall_ms() - pending.requested_ms > self.timeout_s * 1000:
                # Its command is about to give up; doing it now would surprise whoever ran
                # it (a request left over from before a restart, say).
                kind, error = "expired", "not taken in time"
            else:
                try:
                    result = json.dumps(perform(decode(pending.op, pending.args)))
                except CentralUsageError as exc:
                    kind, error = "usage", str(exc)
                except Exception as exc:  # noqa: BLE001 - reported to the waiting command
                    kind, error = "failure", f"{type(exc).__name__}: {exc}"
            self._db.finish_request(pending.id, wall_ms(), RequestOutcome(result, kind, error))
            log.info("request_served", op=pending.op, request=pending.id,
                     outcome=kind or "ok")

    def reset(self) -> None:
        """At the start of ``serve``: forget old requests, close any a stopped serve had
        taken but not finished (whether it was sent is unknown)."""
        self._db.reset_requests(wall_ms(), KEEP_DONE_MS)

