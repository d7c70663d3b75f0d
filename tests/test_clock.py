"""The clock judge (agent/clock.py) in-process, and the real agent under libfaketime:
jumps forward and back, starts in 1970 and 2020, recovery; pruning never follows a wrong
clock."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.clock import ClockJudge, ClockState
from agent.store import Store
from tests.agentconf import write_agent
from tests.conftest import wait_for

DAY_MS = 86_400_000
FLOOR = datetime(2026, 1, 1, tzinfo=UTC)
NOW_S = datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp()


class Meta:
    """An in-memory floor store."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def meta(self, key: str) -> str | None:
        """A stored value."""
        return self.values.get(key)

    def set_meta(self, key: str, value: str) -> None:
        """Store a value."""
        self.values[key] = value


class Clocks:
    """A settable wall clock and monotonic clock."""

    def __init__(self) -> None:
        self.wall = NOW_S
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        """Let time pass on both clocks."""
        self.wall += seconds
        self.mono += seconds


def judge_for(meta: Meta, clocks: Clocks, *, ntp: bool = False) -> ClockJudge:
    """A judge on ``meta`` reading ``clocks``."""
    return ClockJudge(meta, floor=FLOOR, max_ahead_s=30 * 86_400, wall=lambda: clocks.wall,
                      monotonic=lambda: clocks.mono, ntp=lambda: ntp)


def test_jump_forward_while_running_is_ahead_and_recovers() -> None:
    """A forward jump of the wall clock while running is 'ahead' at once (the monotonic
    clock did not move), and 'ok' again when the clock is set back right."""
    meta, clocks = Meta(), Clocks()
    judge = judge_for(meta, clocks)
    assert judge.judge().state is ClockState.OK
    clocks.advance(3600)
    assert judge.judge().state is ClockState.OK
    clocks.wall += 400 * 86_400
    judgement = judge.judge()
    assert judgement.state is ClockState.AHEAD and judgement.offset_s is not None
    assert judgement.offset_s > 399 * 86_400
    clocks.wall -= 400 * 86_400
    assert judge.judge().state is ClockState.OK


def test_restart_after_the_clock_went_back_is_behind() -> None:
    """A restart 30 days earlier than the stored trusted floor is 'behind', whatever the
    newest event says."""
    meta, clocks = Meta(), Clocks()
    judge_for(meta, clocks).judge()
    clocks.wall -= 30 * 86_400
    assert judge_for(meta, clocks).judge().state is ClockState.BEHIND


def test_restart_far_ahead_is_ahead_until_a_trusted_source_confirms() -> None:
    """After a restart, a clock more than max_ahead past the floor is 'ahead'; the
    office's signed time (or NTP) confirming it makes it 'ok'."""
    meta, clocks = Meta(), Clocks()
    judge_for(meta, clocks).judge()
    clocks.wall += 40 * 86_400
    judge = judge_for(meta, clocks)
    assert judge.judge().state is ClockState.AHEAD
    judge.observe(int(clocks.wall * 1000), "office")
    assert judge.judge().state is ClockState.OK
    assert meta.values["clock_trusted_source"] == "office"
    assert judge_for(Meta(), clocks, ntp=True).judge().state is ClockState.OK


def test_start_before_the_floor_date_is_unset() -> None:
    """A clock before the configured floor date (1970 after a boot without RTC, or
    2020) is 'unset'."""
    for when in (86_400.0, datetime(2020, 6, 1, tzinfo=UTC).timestamp()):
        clocks = Clocks()
        clocks.wall = when
        assert judge_for(Meta(), clocks).judge().state is ClockState.UNSET


def test_office_time_lowers_a_floor_a_wrong_clock_raised() -> None:
    """The office's signed time replaces the floor even when it is lower: a floor raised
    by a clock that was wrong does not outlive the correction."""
    meta, clocks = Meta(), Clocks()
    judge = judge_for(meta, clocks)
    judge.judge()
    judge.observe(int((clocks.wall - 3 * 86_400) * 1000), "office")
    clocks.wall -= 3 * 86_400
    assert judge.judge().state is ClockState.OK


def test_floor_is_written_rarely() -> None:
    """The floor moved by the agent's own clock is written at most once a minute."""
    meta, clocks = Meta(), Clocks()
    judge = judge_for(meta, clocks)
    judge.judge()
    first = meta.values["clock_trusted_ms"]
    clocks.advance(10)
    judge.judge()
    assert meta.values["clock_trusted_ms"] == first
    clocks.advance(60)
    judge.judge()
    assert meta.values["clock_trusted_ms"] != first


# -- the real agent under libfaketime -----------------------------------------------------

LIBFAKETIME = next((p for p in Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1")),
                   None)
"""libfaketime preloaded straight into the agent: the ``faketime`` command runs its child
in a second process that does not pass SIGTERM on, so the agent would never stop."""
needs_faketime = pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime is not "
                                    "installed (Debian: faketime)")


def faketime_env(offset: str) -> dict[str, str]:
    """The environment for a process under libfaketime at ``offset`` ('+400d', or
    '@2020-06-01 00:00:00'): only the wall clock is faked, as a real clock jump leaves the
    monotonic clock alone (faking it too breaks Python's timed waits)."""
    return {**os.environ, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}


def run_agent(config: Path, offset: str, *args: str, timeout: float = 60) -> str:
    """Run ``permitgate ARGS -c CONFIG`` under faketime at ``offset`` (e.g. '+400d')."""
    result = subprocess.run([sys.executable, "-m", "agent.cli", *args, "-c", str(config)],
                            capture_output=True, text=True, timeout=timeout,
                            env=faketime_env(offset), check=False)
    return result.stdout + result.stderr


def start_stop(config: Path, offset: str, folder: Path, *, until: str = "clock_checked"
               ) -> list[tuple[str, str | None]]:
    """Start the agent at ``offset``, wait until it recorded ``until`` after this start,
    stop it (the stop waits for housekeeping, so a prune pass in progress finishes);
    the (kind, reason) of every event stored so far."""
    starts = [k for k, _ in kinds_of(folder)].count("agent_started")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=faketime_env(offset))

    def reached() -> bool:
        kinds = [k for k, _ in kinds_of(folder)]
        if kinds.count("agent_started") <= starts:
            return False
        return until in kinds[len(kinds) - 1 - kinds[::-1].index("agent_started"):]

    try:
        wait_for(reached, f"{until} after the start at {offset}", timeout=30)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return kinds_of(folder)


def kinds_of(folder: Path) -> list[tuple[str, str | None]]:
    """(kind, reason) of the stored events."""
    if not (folder / "pg.db").exists():
        return []
    store = Store(folder / "pg.db")
    try:
        return [(e.kind, e.reason) for e in store.iter_events()]
    finally:
        store.close()


@needs_faketime
def test_forward_jump_of_400_days_prunes_nothing_and_raises_the_alarm(tmp_path: Path) -> None:
    """Restarted 400 days ahead, the real agent judges its clock 'ahead', records the
    alarm, holds pruning (retention 1 day) and keeps every event; 'events verify' and
    'doctor' agree; back at the right time it is 'ok' again."""
    config = write_agent(tmp_path, store={"event_retention_days": 1,
                                          "prune_interval_s": 0.5},
                         policy={"clock_trust_ntp": False})
    first = start_stop(config, "+0d", tmp_path)
    assert ("clock_checked", "ok") in first
    later = start_stop(config, "+400d", tmp_path, until="prune_held")
    assert ("clock_checked", "ahead") in later and ("prune_held", "clock_ahead") in later
    assert later[:len(first)] == first
    assert "OK" in run_agent(config, "+400d", "events", "verify")
    assert "far ahead of the trusted time" in run_agent(config, "+400d", "doctor")
    again = start_stop(config, "+0d", tmp_path)
    assert again[-1] == ("agent_stopped", None) and ("clock_checked", "ok") in again[
        len(later):]


@needs_faketime
def test_backward_jump_is_behind_for_agent_and_doctor(tmp_path: Path) -> None:
    """Restarted 30 days back, the agent says 'behind' (not 'ok') and so does doctor."""
    config = write_agent(tmp_path, policy={"clock_trust_ntp": False})
    start_stop(config, "+0d", tmp_path)
    events = start_stop(config, "-30d", tmp_path)
    assert events[-2:] != [] and ("clock_checked", "behind") in events
    assert "is behind the trusted time" in run_agent(config, "-30d", "doctor")


@needs_faketime
@pytest.mark.parametrize("when", ["@1970-01-02 00:00:00", "@2020-06-01 00:00:00"])
def test_start_in_the_past_is_unset(tmp_path: Path, when: str) -> None:
    """Started in 1970 or 2020 (before the floor date), the agent says 'unset' and the
    events it records carry that clock state."""
    config = write_agent(tmp_path, policy={"clock_trust_ntp": False})
    events = start_stop(config, when, tmp_path)
    assert ("clock_checked", "unset") in events
    store = Store(tmp_path / "pg.db")
    try:
        stopped = [e for e in store.iter_events() if e.kind == "agent_stopped"]
    finally:
        store.close()
    assert stopped and stopped[-1].data.get("clock") == "unset"
