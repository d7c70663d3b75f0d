"""Tests for the pure access decision in :mod:`agent.decision`.

The table pins one outcome per check in the contract's order; the hypothesis properties pin
what must hold whatever else is true (a revoked card never opens, lockdown never grants, a
failed lookup never grants, decide never raises, ...).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta
from math import floor
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import WEEKDAYS, WeeklySchedule
from agent.decision import (
    Decision,
    Direction,
    Grant,
    Lookup,
    Mode,
    Passback,
    Policy,
    Presence,
    Reason,
    Request,
    decide,
    in_schedule,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
ENTRY, EXIT = Direction.ENTRY, Direction.EXIT

# 2026-03-02 is a Monday, 2026-03-07 a Saturday; 2026-03-09 (a Monday) is a holiday below.
HOLIDAY = date(2026, 3, 9)
SCHEDULES: dict[str, WeeklySchedule] = {
    "office": WeeklySchedule(mon=("08:00-18:00",), tue=("08:00-18:00",), wed=("08:00-18:00",),
                             thu=("08:00-18:00",), fri=("08:00-18:00",)),
    # Every evening to midnight and every early morning: the "24:00" end and the wrap.
    "night": WeeklySchedule(**dict.fromkeys(WEEKDAYS, ("22:00-24:00", "00:00-06:00"))),
    "early": WeeklySchedule(mon=("07:00-08:00",)),
    "holiday_open": WeeklySchedule(mon=("08:00-18:00",), holiday=("10:00-12:00",)),
}
NORMAL = Policy(holidays=frozenset({HOLIDAY}), schedules=SCHEDULES)


def local(day: int, hour: int, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    """An aware instant in March 2026, Asia/Shanghai wall time."""
    return datetime(2026, 3, day, hour, minute, second, micro, tzinfo=SHANGHAI)


MON_10 = local(2, 10)
MON_10_S = int(MON_10.timestamp())


MON_10_S = int(MON_10.timestamp())


def policy(**changes: Any) -> Policy:
    """The normal test policy with ``changes`` applied."""
    return dataclasses.replace(NORMAL, **changes)


def request(now: datetime = MON_10, door: str = "front", direction: Direction = ENTRY,
            door_schedule: str = "always") -> Request:
    """A read at ``door`` at ``now``."""
    return Request(door, direction, now, door_schedule)


def held(**grant: Any) -> Lookup:
    """A lookup that found a grant with the given fields and nothing else."""
    return Lookup(grant=Grant(**grant))


GRANTED = Decision(True, Reason.GRANTED)


def denied(reason: Reason) -> Decision:
    """A deny with ``reason``."""
    return Decision(False, reason)


# (id, request, lookup, policy, expected)
CASES: list[tuple[str, Request, Lookup, Policy, Decision]] = [
    ("granted", request(), held(), NORMAL, GRANTED),
    ("unknown_card", request(), Lookup(), NORMAL, denied(Reason.UNKNOWN_CARD)),
    ("revoked", request(), Lookup(grant=Grant(), revoked=True), NORMAL,
     denied(Reason.REVOKED)),
    ("revoked_without_grant", request(), Lookup(revoked=True), NORMAL,
     denied(Reason.REVOKED)),
    # -- validity -------------------------------------------------------------------------
    ("not_yet_valid", request(), held(valid_from=MON_10_S + 1), NORMAL,
     denied(Reason.NOT_YET_VALID)),
    ("valid_from_inclusive", request(), held(valid_from=MON_10_S), NORMAL, GRANTED),
    ("expired_at_valid_until_exclusive", request(), held(valid_until=MON_10_S), NORMAL,
     denied(Reason.EXPIRED)),
    ("valid_one_second_before_until", request(), held(valid_until=MON_10_S + 1), NORMAL,
     GRANTED),
    ("valid_one_microsecond_before_until",
     request(local(2, 10, 0, 0, 999_999)), held(valid_until=MON_10_S + 1), NORMAL, GRANTED),
    ("expired_after_until", request(local(2, 10, 0, 1)), held(valid_until=MON_10_S), NORMAL,
     denied(Reason.EXPIRED)),
    ("empty_validity_before", request(), held(valid_from=MON_10_S + 5,
                                              valid_until=MON_10_S - 5), NORMAL,
     denied(Reason.NOT_YET_VALID)),
    ("not_yet_valid_half_second_before_epoch",
     request(datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC)), held(valid_from=0),
     NORMAL, denied(Reason.NOT_YET_VALID)),
    ("not_yet_valid_checked_before_door", request(door="front"),
     held(valid_from=MON_10_S + 1, doors=frozenset({"back"})), NORMAL,
     denied(Reason.NOT_YET_VALID)),
    # -- doors ----------------------------------------------------------------------------
    ("wrong_door", request(door="front"), held(doors=frozenset({"back"})), NORMAL,
     denied(Reason.WRONG_DOOR)),
    ("wrong_door_empty_set", request(), held(doors=frozenset()), NORMAL,
     denied(Reason.WRONG_DOOR)),
    ("listed_door", request(door="back"), held(doors=frozenset({"front", "back"})), NORMAL,
     GRANTED),
    ("wrong_door_checked_before_schedule", request(local(7, 10)),
     held(doors=frozenset({"back"}), schedule="office"), NORMAL, denied(Reason.WRONG_DOOR)),
    # -- weekly schedules (credential) ------------------------------------------------------
    ("office_inside", request(), held(schedule="office"), NORMAL, GRANTED),
    ("office_start_inclusive", request(local(2, 8)), held(schedule="office"), NORMAL, GRANTED),
    ("office_just_before_start", request(local(2, 7, 59, 59, 999_999)),
     held(schedule="office"), NORMAL, denied(Reason.OUTSIDE_SCHEDULE)),
    ("office_last_microsecond", request(local(2, 17, 59, 59, 999_999)),
     held(schedule="office"), NORMAL, GRANTED),
    ("office_end_exclusive", request(local(2, 18)), held(schedule="office"), NORMAL,
     denied(Reason.OUTSIDE_SCHEDULE)),
    ("office_saturday", request(local(7, 10)), held(schedule="office"), NORMAL,
     denied(Reason.OUTSIDE_SCHEDULE)),
    ("night_window_to_2400_start", request(local(2, 22)), held(schedule="night"), NORMAL,
     GRANTED),
    ("night_window_to_2400_last_second", request(local(2, 23, 59, 59, 999_999)),
     held(schedule="night"), NORMAL, GRANTED),
    ("night_after_midnight", request(local(3, 0)), held(schedule="night"), NORMAL, GRANTED),
    ("night_morning_end_exclusive", request(local(3, 6)), held(schedule="night"), NORMAL,
     denied(Reason.OUTSIDE_SCHEDULE)),
    ("night_midday", request(), held(schedule="night"), NORMAL,
     denied(Reason.OUTSIDE_SCHEDULE)),
    ("unknown_credential_schedule", request(), held(schedule="no-such-schedule"), NORMAL,
     denied(Reason.OUTSIDE_SCHEDULE)),
    ("always_needs_no_definition", request(local(7, 3)), held(schedule="always"),
     Policy(), GRANTED),
    # -- holidays -------------------------------------------------------------------------
    ("holiday_uses_holiday_windows", request(local(9, 11)), held(schedule="holiday_open"),
     NORMAL, GRANTED),
    ("holiday_ignores_weekday_windows", request(local(9, 9)), held(schedule="holiday_open"),
     NORMAL, denied(Reason.OUTSIDE_SCHEDULE)),
    ("holiday_window_end_exclusive", request(local(9, 12)), held(schedule="holiday_open"),
     NORMAL, denied(Reason.OUTSIDE_SCHEDULE)),
    ("same_weekday_not_holiday", request(local(2, 9)), held(schedule="holiday_open"), NORMAL,
     GRANTED),
    ("holiday_without_holiday_windows_closed", request(local(9, 10)),
     held(schedule="office"), NORMAL, denied(Reason.OUTSIDE_SCHEDULE)),
    ("holiday_does_not_close_always", request(local(9, 10)), held(), NORMAL, GRANTED),
    # -- door-level schedule ----------------------------------------------------------------
    ("door_schedule_inside", request(door_schedule="office"), held(), NORMAL, GRANTED),
    ("door_schedule_outside", request(local(7, 10), door_schedule="office"), held(), NORMAL,
     denied(Reason.OUTSIDE_SCHEDULE)),
    ("door_schedule_on_holiday", request(local(9, 10), door_schedule="office"), held(),
     NORMAL, denied(Reason.OUTSIDE_SCHEDULE)),
    ("both_schedules_must_hold", request(door_schedule="night"), held(schedule="office"),
     NORMAL, denied(Reason.OUTSIDE_SCHEDULE)),
    ("both_schedules_hold", request(door_schedule="office"), held(schedule="holiday_open"),
     NORMAL, GRANTED),
    ("unknown_door_schedule", request(door_schedule="no-such-schedule"), held(), NORMAL,
     denied(Reason.OUTSIDE_SCHEDULE)),
    # -- anti-passback ----------------------------------------------------------------------
    ("passback_off_same_direction", request(),
     Lookup(grant=Grant(), presence=Presence(ENTRY, MON_10_S - 60)),
     policy(passback=Passback.OFF), GRANTED),
    ("passback_hard_entry_twice", request(),
     Lookup(grant=Grant(), presence=Presence(ENTRY, MON_10_S - 60)),
     policy(passback=Passback.HARD), denied(Reason.ANTI_PASSBACK)),
    ("passback_hard_exit_twice", request(direction=EXIT),
     Lookup(grant=Grant(), presence=Presence(EXIT, MON_10_S - 60)),
     policy(passback=Passback.HARD), denied(Reason.ANTI_PASSBACK)),
    ("passback_soft_entry_twice", request(),
     Lookup(grant=Grant(), presence=Presence(ENTRY, MON_10_S - 60)),
     policy(passback=Passback.SOFT), Decision(True, Reason.GRANTED_PASSBACK_VIOLATION)),
    ("passback_hard_entry_then_exit", request(direction=EXIT),
     Lookup(grant=Grant(), presence=Presence(ENTRY, MON_10_S - 60)),
     policy(passback=Passback.HARD), GRANTED),
    ("passback_hard_exit_then_entry", request(),
     Lookup(grant=Grant(), presence=Presence(EXIT, MON_10_S - 60)),
     policy(passback=Passback.HARD), GRANTED),
    ("passback_hard_first_passage", request(), held(), policy(passback=Passback.HARD),
     GRANTED),
    ("passback_reset_expires_presence", request(),
     Lookup(grant=Grant(), presence=Presence(ENTRY, MON_10_S - 3600)),
     policy(passback=Passback.HARD, passback_reset_s=3600), GRANTED),
    ("passback_reset_one_second_short", request(),
     Lookup(grant=Grant(), presence=Presence(ENTRY, MON_10_S - 3599)),
     policy(passback=Passback.HARD, passback_reset_s=3600), denied(Reason.ANTI_PASSBACK)),
    ("passback_reset_zero_never_expires", request(),
     Lookup(grant=Grant(), presence=Presence(ENTRY, MON_10_S - 10 * 365 * 86400)),
     policy(passback=Passback.HARD, passback_reset_s=0), denied(Reason.ANTI_PASSBACK)),
    ("passback_checked_after_schedule", request(local(7, 10)),
     Lookup(grant=Grant(schedule="office"), presence=Presence(ENTRY, MON_10_S)),
     policy(passback=Passback.HARD), denied(Reason.OUTSIDE_SCHEDULE)),
    # -- site modes -----------------------------------------------------------------------
    ("lockdown", request(), held(), policy(mode=Mode.LOCKDOWN), denied(Reason.LOCKDOWN)),
    ("lockdown_unknown_card", request(), Lookup(), policy(mode=Mode.LOCKDOWN),
     denied(Reason.LOCKDOWN)),
    ("lockdown_revoked_says_revoked", request(), Lookup(grant=Grant(), revoked=True),
     policy(mode=Mode.LOCKDOWN), denied(Reason.REVOKED)),
    ("free_passage_unknown_card", request(), Lookup(), policy(mode=Mode.FREE_PASSAGE),
     Decision(True, Reason.GRANTED_FREE_PASSAGE)),
    ("free_passage_expired_outside_schedule", request(local(7, 10)),
     held(valid_until=0, schedule="office", doors=frozenset({"back"})),
     policy(mode=Mode.FREE_PASSAGE), Decision(True, Reason.GRANTED_FREE_PASSAGE)),
    ("free_passage_still_denies_revoked", request(), Lookup(revoked=True),
     policy(mode=Mode.FREE_PASSAGE), denied(Reason.REVOKED)),
    ("free_passage_ignores_passback", request(),
     Lookup(grant=Grant(), presence=Presence(ENTRY, MON_10_S)),
     policy(mode=Mode.FREE_PASSAGE, passback=Passback.HARD),
     Decision(True, Reason.GRANTED_FREE_PASSAGE)),
    # -- store errors ---------------------------------------------------------------------
    ("door_fault", dataclasses.replace(request(), door_fault=True), Lookup(grant=Grant()),
     NORMAL, denied(Reason.DOOR_FAULT)),
    ("door_fault_revoked_stays_revoked", dataclasses.replace(request(), door_fault=True),
     Lookup(grant=Grant(), revoked=True), NORMAL, denied(Reason.REVOKED)),
    ("door_fault_unknown_stays_unknown", dataclasses.replace(request(), door_fault=True),
     Lookup(), NORMAL, denied(Reason.UNKNOWN_CARD)),
    ("stale_unconfirmed", request(), Lookup(grant=Grant(confirmed_at=MON_10_S - 10)),
     policy(stale_cutoff=MON_10_S - 5), denied(Reason.STALE_UNCONFIRMED)),
    ("stale_never_confirmed", request(), Lookup(grant=Grant()),
     policy(stale_cutoff=MON_10_S - 5), denied(Reason.STALE_UNCONFIRMED)),
    ("stale_but_confirmed_recently", request(), Lookup(grant=Grant(confirmed_at=MON_10_S)),
     policy(stale_cutoff=MON_10_S - 5), GRANTED),
    ("stale_cutoff_inclusive", request(), Lookup(grant=Grant(confirmed_at=MON_10_S - 5)),
     policy(stale_cutoff=MON_10_S - 5), GRANTED),
    ("stale_revoked_still_revoked", request(),
     Lookup(grant=Grant(confirmed_at=MON_10_S), revoked=True),
     policy(stale_cutoff=MON_10_S - 5), denied(Reason.REVOKED)),
    ("store_error", request(), Lookup(error="OperationalError: disk I/O error"), NORMAL,
     denied(Reason.STORE_ERROR)),
    ("store_error_despite_grant", request(), Lookup(grant=Grant(), error="boom"), NORMAL,
     denied(Reason.STORE_ERROR)),
    ("store_error_in_free_passage", request(), Lookup(error="boom"),
     policy(mode=Mode.FREE_PASSAGE), denied(Reason.STORE_ERROR)),
    ("store_error_with_empty_message", request(), Lookup(grant=Grant(), error=""), NORMAL,
     denied(Reason.STORE_ERROR)),
]


@pytest.mark.parametrize(("req", "lookup", "pol", "expected"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_decide_table(req: Request, lookup: Lookup, pol: Policy, expected: Decision) -> None:
    """Each documented check yields its own reason, in the contract's order."""
    assert decide(req, lookup, pol) == expected


def test_table_covers_every_reason() -> None:
    """The decision table exercises every Reason that ``decide`` gives at least once
    (``captured`` is the card path's, for a tap taken for enrollment: tests/
    test_tenant_ops.py)."""
    assert {case[4].reason for case in CASES} == set(Reason) - {Reason.CAPTURED}


@pytest.mark.parametrize(("now", "expected"), [
    pytest.param(local(2, 7, 30), GRANTED, id="07:30_shanghai_inside"),
    # The same instant as above, written in UTC: Sunday 23:30, outside Monday 07:00-08:00.
    pytest.param(local(2, 7, 30).astimezone(UTC), denied(Reason.OUTSIDE_SCHEDULE),
                 id="same_instant_in_utc_is_sunday_night"),
    pytest.param(datetime(2026, 3, 2, 7, 30, tzinfo=UTC).astimezone(SHANGHAI),
                 denied(Reason.OUTSIDE_SCHEDULE), id="07:30_utc_is_15:30_shanghai"),
])
def test_schedule_uses_local_wall_time(now: datetime, expected: Decision) -> None:
    """Schedule windows are read on the wall clock of request.now's zone (site-local)."""
    assert decide(request(now), held(schedule="early"), NORMAL) == expected


def test_holiday_is_the_local_date() -> None:
    """A holiday is matched on the local date: 00:30 Shanghai is a holiday while UTC is not."""
    just_after_midnight = local(9, 0, 30)  # 2026-03-08 16:30 UTC, the day before
    assert just_after_midnight.astimezone(UTC).date() == HOLIDAY - timedelta(days=1)
    pol = policy(schedules={"h": WeeklySchedule(holiday=("00:00-01:00",))})
    assert decide(request(just_after_midnight), held(schedule="h"), pol) == GRANTED


def test_validity_uses_the_instant_not_the_zone() -> None:
    """Validity bounds compare the absolute instant, whichever zone request.now is written in."""
    for now in (MON_10, MON_10.astimezone(UTC), MON_10.astimezone(ZoneInfo("America/Lima"))):
        assert decide(request(now), held(valid_until=MON_10_S), NORMAL) == \
            denied(Reason.EXPIRED)
        assert decide(request(now), held(valid_from=MON_10_S), NORMAL) == GRANTED


@pytest.mark.parametrize(("name", "pol", "expected"), [
    pytest.param("always", Policy(), True, id="always_builtin"),
    pytest.param("office", Policy(), False, id="undefined_never"),
    pytest.param("office", NORMAL, True, id="defined_inside"),
    pytest.param("early", NORMAL, False, id="defined_outside"),
])
def test_in_schedule(name: str, pol: Policy, expected: bool) -> None:
    """in_schedule treats 'always' as built in and unknown names as never open."""
    assert in_schedule(name, MON_10, pol) is expected


def test_dst_wall_time() -> None:
    """In a zone with daylight saving, windows follow the wall clock on both sides of a change."""
    berlin = ZoneInfo("Europe/Berlin")
    pol = Policy(schedules={"morning": WeeklySchedule(sun=("08:00-09:00",))})
    # 2026-03-29 is the Sunday Berlin moves from UTC+1 to UTC+2.
    before = datetime(2026, 3, 22, 8, 30, tzinfo=berlin)
    after = datetime(2026, 3, 29, 8, 30, tzinfo=berlin)
    assert before.utcoffset() != after.utcoffset()
    for now in (before, after):
        assert decide(request(now), held(schedule="morning"), pol) == GRANTED


# -- property-based -----------------------------------------------------------------------

ZONES = [SHANGHAI, UTC, ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")]
DOORS = ["front", "back", "garage"]
SCHEDULE_NAMES = ["office", "night", "a", "b"]
# Grants and doors may also name "always" and a schedule the policy does not define.
USED_SCHEDULES = [*SCHEDULE_NAMES, "always", "always", "missing"]

instants = st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2100, 1, 1),
                        timezones=st.sampled_from(ZONES))


@st.composite
def windows(draw: st.DrawFn) -> str:
    """A valid "HH:MM-HH:MM" window, sometimes ending at 24:00."""
    start = draw(st.integers(0, 24 * 60 - 1))
    end = draw(st.integers(start + 1, 24 * 60))
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


weekly_schedules = st.builds(
    WeeklySchedule,
    **{day: st.lists(windows(), max_size=2).map(tuple) for day in (*WEEKDAYS, "holiday")})


# Offsets in seconds from the read: None (unbounded), within days, or right at the edge.
offsets = st.one_of(st.none(), st.integers(-3 * 86400, 3 * 86400), st.integers(-2, 2))
grant_shapes = st.builds(
    Grant, valid_from=offsets, valid_until=offsets,
    doors=st.one_of(st.none(), st.frozensets(st.sampled_from(DOORS))),
    schedule=st.sampled_from(USED_SCHEDULES))
presence_shapes = st.one_of(st.none(), st.builds(
    Presence, direction=st.sampled_from(Direction), at=st.integers(-2 * 86400, 10)))
lookup_shapes = st.builds(
    Lookup, grant=st.one_of(st.none(), grant_shapes), revoked=st.booleans(),
    presence=presence_shapes, error=st.one_of(st.none(), st.none(), st.text(max_size=20)))
policy_shapes = st.builds(
    Policy, mode=st.sampled_from(Mode), passback=st.sampled_from(Passback),
    passback_reset_s=st.one_of(st.just(0), st.integers(1, 3 * 86400)),
    holidays=st.frozensets(st.integers(-1, 1).map(lambda d: date(2000, 1, 1) + timedelta(d))),
    schedules=st.dictionaries(st.sampled_from(SCHEDULE_NAMES), weekly_schedules))
request_shapes = st.builds(
    Request, door=st.sampled_from(DOORS), direction=st.sampled_from(Direction), now=instants,
    door_schedule=st.sampled_from(USED_SCHEDULES))


def _shift(value: int | None, by: int) -> int | None:
    return None if value is None else value + by


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Request, Lookup, Policy]:
    """A read, a lookup and a policy, with times drawn near the read so edges are hit."""
    req = draw(request_shapes)
    now_s = floor(req.now.timestamp())
    lookup = draw(lookup_shapes)
    if lookup.grant is not None:
        g = lookup.grant
        lookup = dataclasses.replace(lookup, grant=dataclasses.replace(
            g, valid_from=_shift(g.valid_from, now_s), valid_until=_shift(g.valid_until, now_s)))
    if lookup.presence is not None:
        lookup = dataclasses.replace(lookup, presence=dataclasses.replace(
            lookup.presence, at=lookup.presence.at + now_s))
    pol = draw(policy_shapes)
    # Holidays were drawn around 2000-01-01; move them around the read's local date.
    moved = req.now.date() - date(2000, 1, 1)
    pol = dataclasses.replace(pol, holidays=frozenset(d + moved for d in pol.holidays))
    return req, lookup, pol


PROPERTY = settings(deadline=None)


@PROPERTY
@given(scenarios())
def test_never_raises_and_granted_matches_reason(case: tuple[Request, Lookup, Policy]) -> None:
    """decide never raises, and granted is true exactly for the reasons named granted*."""
    decision = decide(*case)
    assert isinstance(decision.reason, Reason)
    assert decision.granted == decision.reason.startswith("granted")


@PROPERTY
@given(scenarios())
def test_revoked_never_granted(case: tuple[Request, Lookup, Policy]) -> None:
    """A revoked credential is never granted, whatever the mode, grant, presence or time."""
    req, lookup, pol = case
    decision = decide(req, dataclasses.replace(lookup, revoked=True), pol)
    assert not decision.granted
    assert decision.reason in {Reason.REVOKED, Reason.STORE_ERROR}


@PROPERTY
@given(scenarios())
def test_lockdown_never_grants(case: tuple[Request, Lookup, Policy]) -> None:
    """Lockdown never grants."""
    req, lookup, pol = case
    assert not decide(req, lookup, dataclasses.replace(pol, mode=Mode.LOCKDOWN)).granted


@PROPERTY
@given(scenarios(), st.text(max_size=30))
def test_lookup_error_never_grants(case: tuple[Request, Lookup, Policy], error: str) -> None:
    """A failed lookup is a store_error deny, whatever else the lookup holds."""
    req, lookup, pol = case
    assert decide(req, dataclasses.replace(lookup, error=error), pol) == \
        denied(Reason.STORE_ERROR)


@PROPERTY
@given(scenarios())
def test_free_passage_grants_all_but_revoked_and_errors(
        case: tuple[Request, Lookup, Policy]) -> None:
    """In free passage a card is granted exactly when the lookup worked and it is not revoked."""
    req, lookup, pol = case
    decision = decide(req, lookup, dataclasses.replace(pol, mode=Mode.FREE_PASSAGE))
    assert decision.granted == (lookup.error is None and not lookup.revoked)
    if decision.granted:
        assert decision.reason is Reason.GRANTED_FREE_PASSAGE


@PROPERTY
@given(scenarios(), st.one_of(st.none(), st.builds(
    Presence, direction=st.sampled_from(Direction), at=st.integers(-2**40, 2**40))))
def test_presence_irrelevant_with_passback_off(case: tuple[Request, Lookup, Policy],
                                               other: Presence | None) -> None:
    """With anti-passback off, the stored presence never changes the outcome."""
    req, lookup, pol = case
    pol = dataclasses.replace(pol, passback=Passback.OFF)
    assert decide(req, lookup, pol) == decide(req, dataclasses.replace(lookup, presence=other),
                                              pol)


@PROPERTY
@given(scenarios())
def test_hard_and_soft_differ_only_in_passback(case: tuple[Request, Lookup, Policy]) -> None:
    """Hard anti-passback denies exactly where soft grants with a passback violation."""
    req, lookup, pol = case
    hard = decide(req, lookup, dataclasses.replace(pol, passback=Passback.HARD))
    soft = decide(req, lookup, dataclasses.replace(pol, passback=Passback.SOFT))
    if soft.reason is Reason.GRANTED_PASSBACK_VIOLATION:
        assert hard == denied(Reason.ANTI_PASSBACK)
    else:
        assert hard == soft
        assert hard.reason is not Reason.ANTI_PASSBACK


@PROPERTY
@given(scenarios(), st.integers(0, 10**6), st.integers(0, 10**6), st.booleans(), st.booleans())
def test_widening_validity_only_lifts_validity_denies(
        case: tuple[Request, Lookup, Policy], earlier: int, later: int,
        open_from: bool, open_until: bool) -> None:
    """Widening a grant's validity never changes an outcome other than not_yet_valid/expired."""
    req, lookup, pol = case
    if lookup.grant is None:
        return
    g = lookup.grant
    wider = dataclasses.replace(
        g,
        valid_from=None if open_from or g.valid_from is None else g.valid_from - earlier,
        valid_until=None if open_until or g.valid_until is None else g.valid_until + later)
    before = decide(req, lookup, pol)
    after = decide(req, dataclasses.replace(lookup, grant=wider), pol)
    if before.reason not in {Reason.NOT_YET_VALID, Reason.EXPIRED}:
        assert after == before
    if before.granted:
        assert after.granted


@PROPERTY
@given(scenarios(), st.frozensets(st.sampled_from(DOORS)), st.booleans())
def test_adding_doors_only_lifts_wrong_door(case: tuple[Request, Lookup, Policy],
                                            extra: frozenset[str], every_door: bool) -> None:
    """Adding doors to a grant never changes an outcome other than wrong_door."""
    req, lookup, pol = case
    if lookup.grant is None or lookup.grant.doors is None:
        return
    doors = None if every_door else lookup.grant.doors | extra
    wider = dataclasses.replace(lookup.grant, doors=doors)
    before = decide(req, lookup, pol)
    after = decide(req, dataclasses.replace(lookup, grant=wider), pol)
    if before.reason is not Reason.WRONG_DOOR:
        assert after == before


@PROPERTY
@given(scenarios())
def test_normal_grant_implies_every_condition(case: tuple[Request, Lookup, Policy]) -> None:
    """A card-based grant means the grant exists, holds now (exactly), covers the door and
    both schedules are open."""
    req, lookup, pol = case
    decision = decide(req, lookup, pol)
    if decision.reason not in {Reason.GRANTED, Reason.GRANTED_PASSBACK_VIOLATION}:
        return
    g = lookup.grant
    assert g is not None
    assert pol.mode is Mode.NORMAL
    assert lookup.error is None
    assert not lookup.revoked
    # Compared as instants, not as rounded seconds: this catches a wrong rounding of now.
    if g.valid_from is not None:
        assert req.now >= datetime.fromtimestamp(g.valid_from, UTC)
    if g.valid_until is not None:
        assert req.now < datetime.fromtimestamp(g.valid_until, UTC)
    assert g.doors is None or req.door in g.doors
    assert in_schedule(g.schedule, req.now, pol)
    assert in_schedule(req.door_schedule, req.now, pol)


@PROPERTY
@given(scenarios(), st.sampled_from(ZONES))
def test_without_schedules_zone_does_not_matter(case: tuple[Request, Lookup, Policy],
                                                zone: ZoneInfo) -> None:
    """With only 'always' schedules, the outcome depends on the instant, not its zone."""
    req, lookup, pol = case
    if lookup.grant is not None:
        lookup = dataclasses.replace(lookup,
                                     grant=dataclasses.replace(lookup.grant, schedule="always"))
    req = dataclasses.replace(req, door_schedule="always")
    moved = dataclasses.replace(req, now=req.now.astimezone(zone))
    assert decide(req, lookup, pol) == decide(moved, lookup, pol)


@PROPERTY
@given(scenarios(), st.dates())
def test_other_days_holidays_do_not_matter(case: tuple[Request, Lookup, Policy],
                                           extra: date) -> None:
    """Declaring a holiday on another local date never changes today's outcome."""
    req, lookup, pol = case
    if extra == req.now.date():
        return
    more = dataclasses.replace(pol, holidays=pol.holidays | {extra})
    assert decide(req, lookup, pol) == decide(req, lookup, more)


@PROPERTY
@given(scenarios())
def test_decide_is_deterministic(case: tuple[Request, Lookup, Policy]) -> None:
    """decide is a pure function: the same inputs give the same decision."""
    assert decide(*case) == decide(*case)


@PROPERTY
@given(instants, st.integers(-2, 2), st.booleans())
def test_validity_bounds_compare_exact_instants(now: datetime, offset: int,
                                                is_until: bool) -> None:
    """valid_from is inclusive and valid_until exclusive against the exact instant, even
    before 1970 and with fractions of a second."""
    bound = floor(now.timestamp()) + offset
    edge = datetime.fromtimestamp(bound, UTC)
    if is_until:
        expected = GRANTED if now < edge else denied(Reason.EXPIRED)
        grant = Grant(valid_until=bound)
    else:
        expected = GRANTED if now >= edge else denied(Reason.NOT_YET_VALID)
        grant = Grant(valid_from=bound)
    assert decide(request(now), Lookup(grant=grant), Policy()) == expected
