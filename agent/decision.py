"""The access decision: a pure function from a card read and what is stored about it to
an outcome with a reason.

``decide`` does no I/O, reads no clock and never raises: the time, the stored grant, the
revocation state, the presence state (for anti-passback) and the site policy all come in
as arguments, and a lookup that failed arrives as ``Lookup.error`` and becomes a deny.
The order of the checks is the contract (docs/decisions.md): a revoked credential is
denied before anything else is considered, lockdown denies every card, free passage then
admits any card that is not revoked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from enum import StrEnum
from math import floor

from agent.config import WEEKDAYS, WeeklySchedule


class Direction(StrEnum):
    """Which side of the door a reader serves."""

    ENTRY = "entry"
    EXIT = "exit"


class Mode(StrEnum):
    """Site-wide operating mode."""

    NORMAL = "normal"
    LOCKDOWN = "lockdown"
    FREE_PASSAGE = "free_passage"


class Passback(StrEnum):
    """Anti-passback enforcement."""

    OFF = "off"
    SOFT = "soft"
    HARD = "hard"


class Reason(StrEnum):
    """Why a decision came out as it did; every decision carries exactly one."""

    GRANTED = "granted"
    GRANTED_FREE_PASSAGE = "granted_free_passage"
    GRANTED_PASSBACK_VIOLATION = "granted_passback_violation"
    UNKNOWN_CARD = "unknown_card"
    REVOKED = "revoked"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    WRONG_DOOR = "wrong_door"
    OUTSIDE_SCHEDULE = "outside_schedule"
    ANTI_PASSBACK = "anti_passback"
    LOCKDOWN = "lockdown"
    STORE_ERROR = "store_error"
    DOOR_FAULT = "door_fault"
    """Everything else would grant, but the door's relay is faulted (not claimed or not
    answering): the door cannot be opened, so the record says so instead of 'granted'."""
    CAPTURED = "captured"
    """Not decided: the tap was captured for an enrollment (the door stays shut)."""
    STALE_UNCONFIRMED = "stale_unconfirmed"
    """The lists are stale (no valid heartbeat from the office for too long) and the
    offline policy admits only permits the office confirmed recently; this one was not."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What the allowlist says about one credential.

    ``valid_from``/``valid_until`` are Unix seconds (``valid_until`` exclusive) or None for
    unbounded; ``doors`` None means every door; ``schedule`` names a weekly schedule.
    """

    valid_from: int | None = None
    valid_until: int | None = None
    doors: frozenset[str] | None = None
    schedule: str = "always"
    confirmed_at: int | None = None
    """When the office last confirmed the permit with the registry (Unix s), or None."""


@dataclass(frozen=True, slots=True)
class Presence:
    """The last granted passage of a credential, for anti-passback."""

    direction: Direction
    at: int


@dataclass(frozen=True, slots=True)
class Lookup:
    """Everything the store knows about a credential at decision time."""

    grant: Grant | None = None
    revoked: bool = False
    presence: Presence | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """Site policy as the decision needs it; built once from the configuration."""

    mode: Mode = Mode.NORMAL
    passback: Passback = Passback.OFF
    passback_reset_s: int = 24 * 3600
    holidays: frozenset[date] = frozenset()
    schedules: Mapping[str, WeeklySchedule] = field(default_factory=dict)
    stale_cutoff: int | None = None
    """Set while the lists are stale under the ``recent_only`` offline policy: a grant
    whose ``confirmed_at`` is older than this (Unix s) is denied."""


@dataclass(frozen=True, slots=True)
class Request:
    """A card presented at a door: where, which side, and when (site-local, aware)."""

    door: str
    direction: Direction
    now: datetime
    door_schedule: str = "always"
    door_fault: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: open or not, and why."""

    granted: bool
    reason: Reason


def in_schedule(name: str, when: datetime, policy: Policy) -> bool:
    """Whether ``when`` (site-local) falls inside schedule ``name``; unknown names never do."""
    if name == "always":
        return True
    schedule = policy.schedules.get(name)
    if schedule is None:
        return False
    day = "holiday" if when.date() in policy.holidays else WEEKDAYS[when.weekday()]
    moment = when.time().replace(tzinfo=None)
    return any(_within(moment, start, end) for start, end in schedule.windows(day))


def _within(moment: time, start: time, end: time | None) -> bool:
    return start <= moment and (end is None or moment < end)


def _passback_violated(request: Request, presence: Presence | None, policy: Policy,
                       now_s: int) -> bool:
    if presence is None:
        return False
    if policy.passback_reset_s and now_s - presence.at >= policy.passback_reset_s:
        return False
    return presence.direction == request.direction


# PLR0911: one early return per check, in the contract's order; merging them hides the order.
def decide(request: Request, lookup: Lookup, policy: Policy) -> Decision:  # noqa: PLR0911
    """Decide whether the door opens for this read. Pure; never raises."""
    if lookup.error is not None:
        return Decision(False, Reason.STORE_ERROR)
    if lookup.revoked:
        return Decision(False, Reason.REVOKED)
    if policy.mode is Mode.LOCKDOWN:
        return Decision(False, Reason.LOCKDOWN)
    if policy.mode is Mode.FREE_PASSAGE:
        return Decision(True, Reason.GRANTED_FREE_PASSAGE)
    grant = lookup.grant
    if grant is None:
        return Decision(False, Reason.UNKNOWN_CARD)
    if policy.stale_cutoff is not None and (grant.confirmed_at is None
                                            or grant.confirmed_at < policy.stale_cutoff):
        return Decision(False, Reason.STALE_UNCONFIRMED)
    # floor, not int(): int() rounds towards zero, so half a second before a valid_from of 0
    # (or any instant before 1970, e.g. an RTC-less board's boot clock) would count as on it.
    now_s = floor(request.now.timestamp())
    if grant.valid_from is not None and now_s < grant.valid_from:
        return Decision(False, Reason.NOT_YET_VALID)
    if grant.valid_until is not None and now_s >= grant.valid_until:
        return Decision(False, Reason.EXPIRED)
    if grant.doors is not None and request.door not in grant.doors:
        return Decision(False, Reason.WRONG_DOOR)
    if not (in_schedule(grant.schedule, request.now, policy)
            and in_schedule(request.door_schedule, request.now, policy)):
        return Decision(False, Reason.OUTSIDE_SCHEDULE)
    outcome = Decision(True, Reason.GRANTED)
    if policy.passback is not Passback.OFF and _passback_violated(
            request, lookup.presence, policy, now_s):
        if policy.passback is Passback.HARD:
            return Decision(False, Reason.ANTI_PASSBACK)
        outcome = Decision(True, Reason.GRANTED_PASSBACK_VIOLATION)
    return Decision(False, Reason.DOOR_FAULT) if request.door_fault else outcome
