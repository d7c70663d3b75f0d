"""The ``permitgate`` command: exit statuses, messages and output of every sub-command.

Exit-status and stderr behaviour is checked on the real command, run as a child process
(``python -m agent.cli``); output formatting is checked in-process through
``agent.cli.main(argv, out=...)``. Stores are built with :class:`agent.store.Store` the way
the runtime writes them, so no agent has to run.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog

from agent import cli
from agent.config import parse_config
from agent.keys import load_site_key
from agent.resolve import resolve_store_path
from agent.runtime import Agent
from agent.store import CredentialEntry, Store
from common import logs
from drivers.base import CardRead
from drivers.simulated import SimBus, SimulatedRelay
from protocol.chain import Event
from protocol.hashing import CredentialHasher, log_prefix
from tests.agentconf import KEY, SIMULATED, DoorSpec, ReaderSpec, agent_toml

GRANTED_CARD = "em4100:67003B51C6"
UNKNOWN_CARD = "em4100:DEADBEEF00"
DEMO_RAW_IDS = ("67003B51C6", "67003BA86C", "1A2B3C4D5E", "0F0E0D0C0B", "0102030405",
                "A1B2C3D4E5", "5A5A5A5A5A", "DEADBEEF00", "68003B51C6")
"""Every card id the demo presents (the last one is its garbled frame), as raw hex."""
DEMO_REASONS = ("granted", "unknown_card", "revoked", "expired", "not_yet_valid",
                "wrong_door", "outside_schedule", "anti_passback")
SIM_TAP_HINT = "permitgate sim tap front-in em4100:67003B51C6"
"""The one line where the demo shows a demo card id on purpose: a command to copy."""
HEX64 = re.compile(r"[0-9a-f]{64}")
ROOT = Path(__file__).resolve().parent.parent


# -- helpers -------------------------------------------------------------------------


LIVE_PID = os.getpid()
"""A process that is surely alive, recorded as the agent's pid in built stores."""

def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``permitgate ARGS`` as a child process with a clean environment."""
    base = {k: v for k, v in os.environ.items()
            if k not in {"PERMITGATE_CONFIG", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET"}}
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=cwd,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)


def run_main(*argv: str) -> tuple[int, str]:
    """Run ``agent.cli.main`` in-process; its exit status and what it wrote to ``out``."""
    out = io.StringIO()
    status = cli.main(list(argv), out=out)
    return status, out.getvalue()


def write_config(folder: Path, *, name: str = "permitgate.toml", site_id: str = "test-site",
                 store: str = "pg.db", reader_driver: str = "simulated",
                 reader_options: Mapping[str, Any] | None = None,
                 relay_driver: str = "simulated", back_state: Path | None = None) -> Path:
    """A two-door site: ``front`` (fail-secure) and ``back`` (fail-safe), each relay
    mirroring its state to a file; ``readers[0]`` is configurable. No site key is
    written: the commands that need one get it from the test."""
    def relay(driver: str, state_file: Path) -> dict[str, Any]:
        return {"driver": driver, "options": {"state_file": state_file}}

    path = folder / name
    path.write_text(agent_toml(
        folder, site_id=site_id, site={"timezone": "Europe/Berlin"}, store={"path": store},
        doors=(DoorSpec("front", unlock_s=None, relay=relay(relay_driver, folder / "front.json"),
                        extra={"fail_mode": "secure"}),
               DoorSpec("back", unlock_s=None,
                        relay=relay("simulated", back_state or folder / "back.json"),
                        contact=SIMULATED, extra={"fail_mode": "safe"})),
        readers=(ReaderSpec("front-in", driver=reader_driver, debounce_s=None,
                            options=reader_options),
                 ReaderSpec("back-in", door="back", debounce_s=None))))
    return path


def line_of(text: str, needle: str) -> int:
    """The 1-based number of the only line of ``text`` containing ``needle``."""
    numbers = [i for i, line in enumerate(text.split("\n"), start=1) if needle in line]
    assert len(numbers) == 1, (needle, numbers)
    return numbers[0]


def relay_file(path: Path) -> dict[str, Any]:
    """The state a simulated relay mirrored to ``path``."""
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` parsed as one JSON object."""
    parsed = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process calls must not read a configuration named by the caller's environment."""
    monkeypatch.delenv("PERMITGATE_CONFIG", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@dataclass(frozen=True)
class Site:
    """A configuration and the store it names, filled as a running agent would fill it."""

    folder: Path
    config: Path
    db: Path
    now_ms: int


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A store with device states, a three-entry allowlist (version 7), one revoked
    permit and eight events: five three days old, three a minute old; seq 1-3 acked."""
    config = write_config(tmp_path)
    db = tmp_path / "pg.db"
    hasher = CredentialHasher(KEY)
    now_ms = time.time_ns() // 1_000_000
    clock = [now_ms - 3 * 86_400_000]
    store = Store(db, clock_ms=lambda: clock[0])
    try:
        door_ok = json.dumps({"lock": "locked", "contact": "closed", "alarm": None,
                              "mode": "normal"})
        door_forced = json.dumps({"lock": "locked", "contact": "open", "alarm": "forced",
                                  "mode": "normal"})
        store.append(Event("agent_started", data={"version": "test", "pid": LIVE_PID,
                                                  "config": str(config)}),
                     device=("system", "agent", json.dumps({"state": "running", "pid": LIVE_PID})))
        store.append(Event("clock_checked", reason="ok", data={"now_ms": clock[0]}),
                     device=("system", "clock", json.dumps({"state": "ok"})))
        store.append(Event("reader_online", door="front", reader="front-in",
                           direction="entry", data={"attempt": 0}),
                     device=("reader", "front-in", json.dumps({"state": "online"})))
        store.append(Event("door_locked", door="front", reason="startup"),
                     device=("door", "front", door_ok))
        store.append(Event("access_denied", door="back", reader="back-in", direction="entry",
                           reason="unknown_card",
                           cred=log_prefix(hasher.credential(UNKNOWN_CARD))))
        clock[0] = now_ms - 60_000
        store.append(Event("access_granted", door="front", reader="front-in",
                           direction="entry", reason="granted",
                           cred=log_prefix(hasher.credential(GRANTED_CARD))))
        store.append(Event("access_denied", door="front", reader="front-in",
                           direction="entry", reason="revoked",
                           cred=log_prefix(hasher.credential("em4100:1A2B3C4D5E"))))
        store.append(Event("door_forced", door="back"), device=("door", "back", door_forced))
        store.replace_allowlist([CredentialEntry(hasher.credential(c)) for c in (
            GRANTED_CARD, "em4100:67003BA86C", "em4100:1A2B3C4D5E")], version=7)
        store.revoke([(hasher.permit("DEMO-PERMIT-303"), "permit")], version=2)
        store.mark_acked(3)
    finally:
        store.close()
    return Site(tmp_path, config, db, now_ms)


# -- check-config --------------------------------------------------------------------


def test_check_config_valid_file_prints_a_summary(tmp_path: Path) -> None:
    """A valid file exits 0 with a summary naming the file, site, doors and readers."""
    config = write_config(tmp_path)
    result = run_cli("check-config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"{config}: OK" in result.stdout
    assert "site test-site, gateway test-gw, time zone Europe/Berlin" in result.stdout
    assert "2 door(s): front (secure, 5 s), back (safe, 5 s)" in result.stdout
    assert "2 reader(s): front-in (simulated, front entry), back-in (simulated, back entry)" \
        in result.stdout
    assert f"store {tmp_path / 'pg.db'}" in result.stdout


def test_check_config_opens_no_device_and_creates_no_store(tmp_path: Path) -> None:
    """Validating a configuration writes neither the store nor any relay state file."""
    config = write_config(tmp_path)
    status, _ = run_main("check-config", "-c", str(config))
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["permitgate.toml"]


def test_check_config_unknown_key_names_file_key_and_line(tmp_path: Path) -> None:
    """An unknown key exits 2 and stderr names the file, the dotted key and its line."""
    config = write_config(tmp_path)
    text = config.read_text().replace('gateway_id = "test-gw"\n',
                                      'gateway_id = "test-gw"\ncolour = "blue"\n')
    config.write_text(text)
    result = run_cli("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{config}:{line_of(text, 'colour')}: site.colour: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_wrong_type_names_file_key_and_line(tmp_path: Path) -> None:
    """A value of the wrong type (a quoted number) exits 2 naming file, key, line and value."""
    config = write_config(tmp_path)
    text = config.read_text().replace('fail_mode = "safe"\n',
                                      'fail_mode = "safe"\nunlock_s = "5"\n')
    config.write_text(text)
    result = run_cli("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{config}:{line_of(text, 'unlock_s')}: doors[1].unlock_s:" in result.stderr
    assert "'5'" in result.stderr


def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    """A configuration path that does not exist exits 2 with "not found" and the path."""
    missing = tmp_path / "nope.toml"
    result = run_cli("check-config", "-c", str(missing), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{missing}: configuration file not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("options", "key", "problem"), [
    ({"port": "/dev/ttyUSB0", "speed": 9600}, "readers[0].options.speed", "unknown key"),
    ({"baudrate": 9600}, "readers[0].options.port", "Field required"),
    ({"port": "/dev/ttyUSB0", "format": "wiegand"}, "readers[0].options.format", "em4100"),
])
def test_check_config_serial_reader_option_error_names_the_option(
        tmp_path: Path, options: dict[str, Any], key: str, problem: str) -> None:
    """A serial reader's bad, missing or unknown option exits 2 naming the file and the
    option's full key ``readers[0].options.<name>``."""
    config = write_config(tmp_path, reader_driver="serial", reader_options=options)
    result = run_cli("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"permitgate: {config}: ")
    assert key in result.stderr
    assert problem in result.stderr


@pytest.mark.parametrize(("kind", "reader_driver", "relay_driver"), [
    ("reader", "teleporter", "simulated"),
    ("relay", "simulated", "teleporter"),
])
def test_check_config_unknown_driver_is_named(tmp_path: Path, kind: str, reader_driver: str,
                                              relay_driver: str) -> None:
    """An unknown reader or relay driver exits 2 naming the file, the key, the driver and
    the known ones."""
    config = write_config(tmp_path, reader_driver=reader_driver, relay_driver=relay_driver)
    result = run_cli("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    key = "readers[0].driver" if kind == "reader" else "doors[0].relay.driver"
    assert f"{config}: {key}: unknown {kind} driver 'teleporter'" in result.stderr
    assert "simulated" in result.stderr


def test_permitgate_config_env_var_is_used_without_config_option(tmp_path: Path) -> None:
    """With no --config, ``$PERMITGATE_CONFIG`` names the file checked."""
    config = write_config(tmp_path, site_id="from-env")
    result = run_cli("check-config", cwd=tmp_path, env={"PERMITGATE_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert f"{config}: OK" in result.stdout
    assert "site from-env" in result.stdout


def test_config_option_wins_over_env_var(tmp_path: Path) -> None:
    """An explicit --config is used even when ``$PERMITGATE_CONFIG`` names another file."""
    chosen = write_config(tmp_path, name="chosen.toml", site_id="chosen")
    result = run_cli("check-config", "-c", str(chosen), cwd=tmp_path,
                     env={"PERMITGATE_CONFIG": str(tmp_path / "absent.toml")})
    assert result.returncode == 0, result.stderr
    assert "site chosen" in result.stdout


def test_env_var_naming_a_missing_file_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    """``$PERMITGATE_CONFIG`` naming a missing file exits 2; it never falls back to the
    embedded simulated building."""
    missing = tmp_path / "absent.toml"
    result = run_cli("check-config", cwd=tmp_path, env={"PERMITGATE_CONFIG": str(missing)})
    assert result.returncode == 2
    assert f"{missing}: configuration file not found" in result.stderr


def test_empty_env_var_means_the_embedded_defaults(tmp_path: Path) -> None:
    """An empty ``$PERMITGATE_CONFIG`` and no --config check the embedded defaults."""
    result = run_cli("check-config", cwd=tmp_path, env={"PERMITGATE_CONFIG": ""})
    assert result.returncode == 0, result.stderr
    assert "<embedded defaults>: OK" in result.stdout
    assert "site demo-site" in result.stdout


# -- usage errors --------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "named"), [
    (("frobnicate",), "'frobnicate'"),
    ((), "COMMAND"),
    (("events", "tail", "-n", "0"), "'0' must be at least 1"),
    (("events", "tail", "-n", "ten"), "'ten' is not a whole number"),
    (("events", "purge"), "'purge'"),
    (("sim", "input", "front.contact", "maybe"), "'maybe'"),
    (("status", "--colour"), "--colour"),
])
def test_usage_errors_exit_2_naming_the_bad_value(tmp_path: Path, argv: Sequence[str],
                                                  named: str) -> None:
    """Arguments argparse refuses exit 2 with a usage line and the offending value."""
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: permitgate" in result.stderr
    assert named in result.stderr


def test_bad_since_exits_2_even_before_any_database_exists(tmp_path: Path) -> None:
    """``events tail --since yesterday`` is a usage error (exit 2 naming the value), not a
    missing-store failure, when the agent has never run."""
    config = write_config(tmp_path)
    result = run_cli("events", "tail", "--since", "yesterday", "-c", str(config),
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "--since 'yesterday'" in result.stderr
    assert "15m" in result.stderr
    assert not (tmp_path / "pg.db").exists()


def test_bad_since_exits_2_on_a_store_with_events(site: Site) -> None:
    """``events filter --since`` with an unparseable value exits 2 naming it."""
    result = run_cli("events", "filter", "--since", "last tuesday", "-c", str(site.config),
                     cwd=site.folder)
    assert result.returncode == 2
    assert "--since 'last tuesday'" in result.stderr
    assert result.stdout == ""


def test_parse_since_accepts_durations_and_iso_times() -> None:
    """Durations count back from now and an ISO time with an offset is taken as written."""
    before_ms = time.time() * 1000
    since = cli.parse_since("2h")
    after_ms = time.time() * 1000
    assert before_ms - 7_200_000 - 1 <= since <= after_ms - 7_200_000 + 1
    assert cli.parse_since("2026-11-26T08:00:00+00:00") == int(
        datetime(2026, 11, 26, 8, tzinfo=UTC).timestamp() * 1000)
    with pytest.raises(cli.UsageError, match="--since '5 minutes'"):
        cli.parse_since("5 minutes")


def test_parse_since_reads_a_time_without_offset_in_the_site_zone() -> None:
    """An ISO time without an offset is read in the zone given (the site's, the zone
    ``events`` prints), so a time copied from the output selects that event."""
    assert cli.parse_since("2026-11-26 09:00", ZoneInfo("Asia/Shanghai")) == int(
        datetime(2026, 11, 26, 1, tzinfo=UTC).timestamp() * 1000)


# -- status --------------------------------------------------------------------------


def test_status_without_a_database_says_to_start_the_agent(tmp_path: Path) -> None:
    """``status`` before the agent ever ran exits 1, says to start it, and creates
    no database."""
    config = write_config(tmp_path)
    result = run_cli("status", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert "no database yet" in result.stderr
    assert "permitgate run" in result.stderr
    assert str(tmp_path / "pg.db") in result.stderr
    assert not (tmp_path / "pg.db").exists()


def test_status_json_reports_allowlist_outbox_doors_readers_and_clock(site: Site) -> None:
    """``status --json`` carries allowlist entries and version, the outbox count, each
    door's and reader's state, and the clock state."""
    result = run_cli("status", "--json", "-c", str(site.config), cwd=site.folder)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["site"] == "test-site"
    assert report["gateway"] == "test-gw"
    assert report["allowlist"]["entries"] == 3
    assert report["allowlist"]["version"] == 7
    assert report["revocations"] == 1
    assert report["events"] == 8
    assert report["outbox"] == 5
    assert report["clock"]["state"] == "ok"
    assert report["agent"]["state"] == "running"
    assert report["agent"]["pid"] == LIVE_PID
    assert report["mode"] == "normal"
    assert report["doors"]["front"]["lock"] == "locked"
    assert report["doors"]["front"]["alarm"] is None
    assert report["doors"]["back"]["alarm"] == "forced"
    assert report["doors"]["back"]["contact"] == "open"
    assert report["readers"]["front-in"]["state"] == "online"
    assert report["readers"]["back-in"] == {"state": "unknown"}
    assert report["schema_version"] >= 1
    assert report["last_sync_ms"] >= report["allowlist"]["applied_ms"]


def test_status_text_shows_each_door_reader_and_count(site: Site) -> None:
    """Plain ``status`` prints one line per door and reader, alarms, the counts, and the
    site's time zone with the clock."""
    status, text = run_main("status", "-c", str(site.config))
    assert status == 0
    lines = text.splitlines()
    assert lines[0] == "site test-site  gateway test-gw"
    assert lines[1].startswith(f"agent      running (pid {LIVE_PID}), since ")
    assert "mode       normal" in lines
    assert "clock      ok, time zone Europe/Berlin" in lines
    assert "door       front: locked, not monitored" in lines
    assert "door       back: locked, open, ALARM forced" in lines
    assert "reader     front-in: online" in lines
    assert "reader     back-in: unknown" in lines
    assert any(line.startswith("allowlist  3 entries, version 7, applied ") for line in lines)
    assert "revoked    1" in lines


def test_status_text_times_are_in_the_site_time_zone(site: Site) -> None:
    """``status`` shows the agent's start in the site's zone (``[site] timezone``, here
    Europe/Berlin) with its offset, not in UTC."""
    status, text = run_main("status", "-c", str(site.config))
    assert status == 0
    started = datetime.fromtimestamp(site.now_ms / 1000 - 3 * 86_400,
                                     ZoneInfo("Europe/Berlin"))
    assert f"since {started.isoformat(sep=' ', timespec='seconds')} (3 d ago)" in text


def test_status_with_sync_off_shows_no_outbox_or_last_sync(site: Site) -> None:
    """With sync off, ``status`` says so and shows neither an outbox count nor a last
    sync, which would only suggest a fault."""
    status, text = run_main("status", "-c", str(site.config))
    assert status == 0
    lines = text.splitlines()
    assert "events     8 stored" in lines
    assert "sync       off" in lines
    assert "outbox" not in text
    assert "last sync" not in text


def test_status_with_sync_on_shows_outbox_and_last_sync(site: Site) -> None:
    """With sync on, ``status`` shows the events not yet delivered and the last sync."""
    site.config.write_text(site.config.read_text() + "\n[sync]\nenabled = true\n")
    status, text = run_main("status", "-c", str(site.config))
    assert status == 0
    lines = text.splitlines()
    assert "events     8 stored, 5 not yet delivered (outbox)" in lines
    assert any(line.startswith("last sync  ") for line in lines)
    assert "sync       not started, lists not checked, refused none" in lines


def test_status_on_a_path_the_system_refuses_is_a_message_not_a_traceback(
        tmp_path: Path) -> None:
    """An operating-system refusal while finding the store (here a folder name longer than
    255 bytes; for an operator, the agent's 0700 state folder) exits 1 with a message."""
    config = write_config(tmp_path, store=f"{'x' * 300}/pg.db")
    result = run_cli("status", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("permitgate: ")
    assert "File name too long" in result.stderr
    assert "Traceback" not in result.stderr


# -- events --------------------------------------------------------------------------


def test_events_tail_n_json_gives_the_newest_in_order_as_json(site: Site) -> None:
    """``events tail -n 3 --json`` prints the three newest events, oldest first, one JSON
    object per line with seq, event_id and a linked hash."""
    result = run_cli("events", "tail", "-n", "3", "--json", "-c", str(site.config),
                     cwd=site.folder)
    assert result.returncode == 0, result.stderr
    events = json_lines(result.stdout)
    assert [e["seq"] for e in events] == [6, 7, 8]
    assert [e["kind"] for e in events] == ["access_granted", "access_denied", "door_forced"]
    assert len({e["event_id"] for e in events}) == 3
    for event in events:
        assert HEX64.fullmatch(event["hash"])
    assert events[1]["prev_hash"] == events[0]["hash"]
    assert events[2]["prev_hash"] == events[1]["hash"]


def test_events_tail_defaults_to_all_of_a_short_log(site: Site) -> None:
    """``events tail`` without -n shows up to 20 events, here all eight, in seq order,
    under one line of column headers."""
    status, text = run_main("events", "tail", "-c", str(site.config))
    assert status == 0
    header, *rows = text.splitlines()
    assert header.split()[:2] == ["SEQ", "TIME"]
    seqs = [int(line.split()[0]) for line in rows]
    assert seqs == list(range(1, 9))


def test_events_text_has_column_headers_naming_the_time_zone(site: Site) -> None:
    """The text output of ``events`` starts with a header naming every column, the time
    column with the site's zone, and each header sits above its column."""
    status, text = run_main("events", "tail", "-n", "2", "-c", str(site.config))
    assert status == 0
    header, row, _ = text.splitlines()
    assert header.split() == ["SEQ", "TIME", "(Europe/Berlin)", "KIND", "DOOR/READER", "DIR",
                              "REASON", "CRED", "DATA"]
    assert header.index("KIND") == row.index("access_denied")
    assert header.index("DOOR/READER") == row.index("front/front-in")
    assert header.index("REASON") == row.index("revoked")


def test_events_text_row_shows_place_reason_and_cred_prefix_only(site: Site) -> None:
    """A text row carries seq, the time in the site's zone (Europe/Berlin, with its
    offset), kind, door/reader, direction, reason and the short credential prefix, never
    the card id."""
    status, text = run_main("events", "filter", "--reason", "granted", "-c",
                            str(site.config))
    assert status == 0
    [_, row] = text.splitlines()
    prefix = log_prefix(CredentialHasher(KEY).credential(GRANTED_CARD))
    fields = row.split()
    assert fields[0] == "6"
    local = datetime.fromtimestamp((site.now_ms - 60_000) / 1000, ZoneInfo("Europe/Berlin"))
    assert " ".join(fields[1:3]) == local.isoformat(sep=" ", timespec="milliseconds")
    assert fields[3:] == ["access_granted", "front/front-in", "entry", "granted", prefix]
    assert "67003B51C6" not in text


def test_events_text_leaves_out_fields_that_hold_nothing(tmp_path: Path) -> None:
    """A ``door_unlocked`` without a reason, and a data field that is null, print no
    field at all: nothing reads ``None``."""
    config = write_config(tmp_path)
    store = Store(tmp_path / "pg.db")
    store.append(Event("door_unlocked", door="front"))
    store.append(Event("door_locked", door="front", reason="startup",
                       data={"error": None, "attempt": 2}))
    store.close()
    status, text = run_main("events", "tail", "-c", str(config))
    assert status == 0
    _, unlocked, locked = text.splitlines()
    assert unlocked.split()[3:] == ["door_unlocked", "front"]
    assert locked.split()[3:] == ["door_locked", "front", "startup", "attempt=2"]
    assert "None" not in text
    assert "null" not in text


def test_events_on_an_empty_log_say_so(tmp_path: Path) -> None:
    """``events tail`` on a store with no events says there are none rather than printing
    a bare header."""
    config = write_config(tmp_path)
    Store(tmp_path / "pg.db").close()
    status, text = run_main("events", "tail", "-c", str(config))
    assert status == 0
    assert text == "no events stored\n"


@pytest.mark.parametrize(("filters", "seqs"), [
    (("--kind", "access_denied"), [5, 7]),
    (("--door", "back"), [5, 8]),
    (("--reason", "revoked"), [7]),
    (("--since", "1h"), [6, 7, 8]),
    (("--kind", "access_denied", "--since", "1h"), [7]),
    (("--door", "front", "-n", "2"), [6, 7]),
    (("--kind", "door_held_open"), []),
])
def test_events_filter_selects_by_kind_door_reason_and_since(
        site: Site, filters: Sequence[str], seqs: list[int]) -> None:
    """``events filter`` combines --kind, --door, --reason, --since and -n (newest N)."""
    result = run_cli("events", "filter", *filters, "--json", "-c", str(site.config),
                     cwd=site.folder)
    assert result.returncode == 0, result.stderr
    assert [e["seq"] for e in json_lines(result.stdout)] == seqs


def test_events_filter_unknown_kind_exits_2_listing_the_known_kinds(site: Site) -> None:
    """A ``--kind`` that is neither a kind the agent writes nor one stored exits 2, names
    the closest kind and lists the known ones, instead of printing nothing."""
    result = run_cli("events", "filter", "--kind", "acess_denied", "-c", str(site.config),
                     cwd=site.folder)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "--kind 'acess_denied': no such event kind" in result.stderr
    assert "did you mean 'access_denied'?" in result.stderr
    assert "door_forced, door_held_open" in result.stderr


def test_events_filter_unknown_door_exits_2_listing_the_doors(site: Site) -> None:
    """A ``--door`` that is neither configured nor in the log exits 2 listing the doors."""
    result = run_cli("events", "tail", "--door", "frnot", "-c", str(site.config),
                     cwd=site.folder)
    assert result.returncode == 2
    assert "--door 'frnot': no such door" in result.stderr
    assert "(doors: front, back)" in result.stderr


def test_events_filter_accepts_a_stored_kind_and_door_it_does_not_know(site: Site) -> None:
    """A kind or door found in the log is accepted although the agent no longer writes or
    configures it (an older version's kind, a door since removed)."""
    store = Store(site.db)
    store.append(Event("legacy_kind", door="garage"))
    store.close()
    status, text = run_main("events", "filter", "--kind", "legacy_kind", "--door", "garage",
                            "--json", "-c", str(site.config))
    assert status == 0
    assert [e["seq"] for e in json_lines(text)] == [9]


def test_events_filter_known_kind_without_events_says_none_match(site: Site) -> None:
    """A known kind with no stored events exits 0 saying nothing matched."""
    status, text = run_main("events", "filter", "--kind", "door_held_open", "-c",
                            str(site.config))
    assert status == 0
    assert text == "no matching events\n"


def test_known_event_kinds_are_those_documented() -> None:
    """The kinds ``events --kind`` knows are exactly the kinds docs/events.md lists."""
    text = (ROOT / "docs" / "events.md").read_text()
    table = text.split("## Event kinds", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            documented.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    assert documented == set(cli.KNOWN_EVENT_KINDS)


def test_events_since_iso_time_with_offset(site: Site) -> None:
    """``--since`` with an ISO time and offset keeps events at or after that instant."""
    two_days_ago = datetime.fromtimestamp(site.now_ms / 1000, UTC) - timedelta(days=2)
    status, text = run_main("events", "filter", "--json", "--since",
                            two_days_ago.isoformat(), "-c", str(site.config))
    assert status == 0
    assert [e["seq"] for e in json_lines(text)] == [6, 7, 8]


def test_events_verify_intact_store_exits_0(site: Site) -> None:
    """``events verify`` on an untouched store exits 0 and reports the range checked."""
    result = run_cli("events", "verify", "-c", str(site.config), cwd=site.folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "OK: 8 events, seq 1 to 8, hash chain intact\n"


def test_events_verify_names_the_edited_row(site: Site) -> None:
    """Turning a denial into a grant with raw SQL makes ``events verify`` exit 1 and name
    the seq of the edited row."""
    conn = sqlite3.connect(site.db)
    try:
        with conn:
            changed = conn.execute("UPDATE events SET reason='granted' WHERE seq=7").rowcount
    finally:
        conn.close()
    assert changed == 1
    result = run_cli("events", "verify", "-c", str(site.config), cwd=site.folder)
    assert result.returncode == 1
    assert result.stdout.startswith("BROKEN: 1 problem(s) in 8 events\n")
    assert "seq 7: contents edited" in result.stdout


def test_events_verify_names_a_deleted_row(site: Site) -> None:
    """Deleting a row with raw SQL makes ``events verify`` exit 1 reporting the gap."""
    conn = sqlite3.connect(site.db)
    try:
        with conn:
            conn.execute("DELETE FROM events WHERE seq=4")
    finally:
        conn.close()
    result = run_cli("events", "verify", "-c", str(site.config), cwd=site.folder)
    assert result.returncode == 1
    assert "gap: expected seq 4, found 5" in result.stdout
    assert "seq 5: link broken" in result.stdout


def test_events_verify_on_an_empty_store_says_so(tmp_path: Path) -> None:
    """``events verify`` on a store with no events exits 0 saying so, not "seq None"."""
    config = write_config(tmp_path)
    Store(tmp_path / "pg.db").close()
    status, text = run_main("events", "verify", "-c", str(config))
    assert status == 0
    assert text == "OK: no events stored\n"


def test_events_without_a_database_exit_1(tmp_path: Path) -> None:
    """``events tail`` before the agent ever ran exits 1 and says to start it."""
    config = write_config(tmp_path)
    result = run_cli("events", "tail", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert "no database yet" in result.stderr


# -- keygen --------------------------------------------------------------------------


def test_keygen_writes_a_private_64_hex_key(tmp_path: Path) -> None:
    """``keygen PATH`` writes 64 lower-case hex characters, mode 0600, that the agent
    accepts as a site key."""
    path = tmp_path / "site.key"
    result = run_cli("keygen", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout
    text = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_site_key(path) == bytes.fromhex(text.strip())


def test_keygen_gives_a_different_key_each_time(tmp_path: Path) -> None:
    """Two keygen runs give two different keys."""
    assert run_main("keygen", str(tmp_path / "a.key"))[0] == 0
    assert run_main("keygen", str(tmp_path / "b.key"))[0] == 0
    assert (tmp_path / "a.key").read_text() != (tmp_path / "b.key").read_text()


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    """``keygen`` on an existing file exits 2 and leaves the file as it was."""
    path = tmp_path / "site.key"
    path.write_text("keep me\n")
    result = run_cli("keygen", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "exists already" in result.stderr
    assert str(path) in result.stderr
    assert path.read_text() == "keep me\n"


def test_keygen_into_a_missing_folder_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    """``keygen`` into a folder that does not exist exits 2 naming the path."""
    path = tmp_path / "no-such-folder" / "site.key"
    result = run_cli("keygen", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{path}: cannot create the key file" in result.stderr
    assert "Traceback" not in result.stderr


# -- safe-state ----------------------------------------------------------------------


def test_safe_state_locks_fail_secure_and_unlocks_fail_safe_doors(tmp_path: Path) -> None:
    """``safe-state`` leaves the fail-secure door's relay locked and the fail-safe door's
    relay unlocked, and says so per door."""
    config = write_config(tmp_path)
    result = run_cli("safe-state", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert relay_file(tmp_path / "front.json") == {"relay": "front.relay", "unlocked": False}
    assert relay_file(tmp_path / "back.json") == {"relay": "back.relay", "unlocked": True}
    assert result.stdout == "front: locked\nback: unlocked (fail-safe)\n"


def test_safe_state_reads_the_env_var_like_the_other_commands(tmp_path: Path) -> None:
    """``safe-state`` with no --config drives the relays of ``$PERMITGATE_CONFIG``'s doors."""
    config = write_config(tmp_path)
    result = run_cli("safe-state", cwd=tmp_path, env={"PERMITGATE_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert relay_file(tmp_path / "front.json")["unlocked"] is False


def test_safe_state_tries_every_door_and_closes_every_relay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay that fails to switch is reported and exits 1; the other door still reaches
    its safe state, and every relay is closed, the failed one included."""
    config = write_config(tmp_path, back_state=tmp_path / "missing-folder" / "back.json")
    closed: list[str] = []
    monkeypatch.setattr(SimulatedRelay, "close", lambda self: closed.append(self.name))
    status, text = run_main("safe-state", "-c", str(config))
    assert status == 1
    assert "front: locked\n" in text
    assert "back: FAILED to reach safe state" in text
    assert relay_file(tmp_path / "front.json")["unlocked"] is False
    assert closed == ["front.relay", "back.relay"]


def test_safe_state_with_an_invalid_configuration_exits_2(tmp_path: Path) -> None:
    """``safe-state`` refuses an invalid configuration with exit 2 before touching a relay."""
    config = write_config(tmp_path, relay_driver="teleporter")
    result = run_cli("safe-state", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown relay driver 'teleporter'" in result.stderr
    assert not (tmp_path / "back.json").exists()


# -- sim -----------------------------------------------------------------------------


def test_sim_tap_without_an_agent_exits_1_saying_how_to_start_one(tmp_path: Path) -> None:
    """``sim tap`` with no agent listening exits 1; stderr names the socket and says to
    run the agent."""
    config = write_config(tmp_path)
    result = run_cli("sim", "tap", "front-in", GRANTED_CARD, "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"no agent with simulated devices is listening at {tmp_path / 'sim.sock'}" \
        in result.stderr
    assert "permitgate run" in result.stderr


def test_sim_tap_to_a_stale_socket_exits_1(tmp_path: Path) -> None:
    """A socket file left behind by a killed agent counts as no agent listening."""
    config = write_config(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(tmp_path / "sim.sock"))
    stale.close()
    result = run_cli("sim", "tap", "front-in", GRANTED_CARD, "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert "no agent with simulated devices is listening" in result.stderr


def test_sim_tap_with_an_unreachable_socket_path_exits_1(tmp_path: Path) -> None:
    """A socket path longer than AF_UNIX allows exits 1 with a message, not a traceback."""
    config = write_config(tmp_path, store=f"{'d' * 120}/pg.db")
    result = run_cli("sim", "tap", "front-in", GRANTED_CARD, "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot reach the agent at" in result.stderr
    assert "Traceback" not in result.stderr


def test_sim_tap_unknown_reader_exits_2(tmp_path: Path) -> None:
    """``sim tap`` naming a reader the configuration lacks exits 2 naming it."""
    config = write_config(tmp_path)
    result = run_cli("sim", "tap", "side-door", GRANTED_CARD, "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "no reader 'side-door' in the configuration" in result.stderr


def test_sim_tap_reaches_a_listening_socket(tmp_path: Path) -> None:
    """``sim tap`` sends one JSON datagram naming the reader and card to the agent's
    socket next to the store, prints the decision the agent answers, and exits 0."""
    config = write_config(tmp_path)
    received: list[Any] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "sim.sock"))
        listener.settimeout(10.0)

        def answer() -> None:
            data, sender = listener.recvfrom(4096)
            received.append(json.loads(data))
            listener.sendto(json.dumps({"ok": True, "op": "tap", "reader": "front-in",
                                        "granted": True, "reason": "granted"}).encode(),
                            sender)

        responder = threading.Thread(target=answer)
        responder.start()
        status, text = run_main("sim", "tap", "front-in", GRANTED_CARD, "-c", str(config))
        responder.join(10.0)
    assert status == 0
    assert text == "OPEN   granted\n"
    assert received == [{"op": "tap", "reader": "front-in", "card": GRANTED_CARD}]


# -- demo ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoRun:
    """One run of ``permitgate demo --keep DIR``."""

    result: subprocess.CompletedProcess[str]
    keep: Path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The demo, run once as a child process for the tests that read its output."""
    folder = tmp_path_factory.mktemp("demo")
    keep = folder / "kept"
    result = run_cli("demo", "--keep", str(keep), cwd=folder, timeout=120.0)
    return DemoRun(result, keep)


def test_demo_exits_0_and_shows_every_reason(demo_run: DemoRun) -> None:
    """The demo exits 0 and prints a decision line for each of its eight reasons."""
    assert demo_run.result.returncode == 0, demo_run.result.stdout + demo_run.result.stderr
    decided = re.findall(r"^\s+(?:OPEN|DENIED)\s+(\w+)\s", demo_run.result.stdout, re.M)
    assert set(decided) == set(DEMO_REASONS)
    assert len(decided) == 10


def test_demo_reports_an_intact_hash_chain(demo_run: DemoRun) -> None:
    """The demo ends by saying its hash chain is intact."""
    assert re.search(r"^\d+ events recorded, hash chain intact\.$", demo_run.result.stdout,
                     re.M)


def test_demo_output_shows_no_card_id_it_read(demo_run: DemoRun) -> None:
    """No card id the demo presents appears in its logs (stderr) or its decision lines;
    the one demo id on stdout is in the ``sim tap`` command it suggests."""
    for raw in DEMO_RAW_IDS:
        assert raw not in demo_run.result.stderr
    mentions = [line.strip() for line in demo_run.result.stdout.splitlines()
                if any(raw in line for raw in DEMO_RAW_IDS)]
    assert all(line.startswith(SIM_TAP_HINT) for line in mentions), mentions


def test_demo_keep_leaves_a_database_whose_chain_verifies(demo_run: DemoRun,
                                                          tmp_path: Path) -> None:
    """``demo --keep DIR`` leaves its database in DIR, and ``events verify`` on it exits 0
    with stored credentials only as short hash prefixes."""
    db = demo_run.keep / "permitgate.db"
    assert db.is_file()
    config = write_config(tmp_path, store=str(db))
    result = run_cli("events", "verify", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hash chain intact" in result.stdout
    store = Store(db)
    try:
        events = list(store.iter_events())
    finally:
        store.close()
    creds = [e.cred for e in events if e.kind.startswith("access_")]
    assert len(creds) == 10
    assert all(c is not None and re.fullmatch(r"[0-9a-f]{10}", c) for c in creds)
    dumped = json.dumps([e.as_dict() for e in events])
    for raw in DEMO_RAW_IDS:
        assert raw not in dumped


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """Put structlog's process-wide configuration back after a test reconfigures it."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.usefixtures("restore_structlog")
def test_decision_logs_carry_the_cred_prefix_never_the_card_id(tmp_path: Path,
                                                               fmt: str) -> None:
    """The agent's rendered log lines for a grant and a denial name the credential by its
    short hash prefix and never contain the card id."""
    (tmp_path / "site.key").write_text(KEY.hex())
    config_path = write_config(tmp_path)
    config = parse_config(config_path.read_text(), str(config_path))
    hasher = CredentialHasher(KEY)
    seed = Store(tmp_path / "pg.db")
    seed.replace_allowlist([CredentialEntry(hasher.credential(GRANTED_CARD))], 1)
    seed.close()
    buffer = io.StringIO()
    logs.configure("debug", fmt, buffer)
    agent = Agent(config, config_path=config_path, bus=SimBus())
    try:
        agent.start()
        reader = config.readers[0]
        assert agent.handle_read(reader, CardRead(GRANTED_CARD)).granted
        assert not agent.handle_read(reader, CardRead(UNKNOWN_CARD)).granted
    finally:
        agent.stop()
    output = buffer.getvalue()
    assert "access_granted" in output and "access_denied" in output
    assert log_prefix(hasher.credential(GRANTED_CARD)) in output
    assert log_prefix(hasher.credential(UNKNOWN_CARD)) in output
    for raw in ("67003B51C6", "DEADBEEF00", "67003b51c6", "deadbeef00"):
        assert raw not in output


@pytest.mark.usefixtures("restore_structlog")
def test_run_logs_on_a_terminal_show_site_time_and_no_empty_fields(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The agent's console log lines carry the time in the site's zone (with its offset)
    and leave out fields that hold nothing: no ``reason=None``."""
    config_path = write_config(tmp_path)
    config = parse_config(config_path.read_text().replace("Europe/Berlin", "Asia/Shanghai"),
                          str(config_path))
    cli.configure_run_logs(config, "console")
    structlog.get_logger().info("door_unlocked", door="front", reason=None)
    [line] = capsys.readouterr().out.splitlines()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\+08:00 ", line), line
    assert "door=front" in line
    assert "reason" not in line


@pytest.mark.usefixtures("restore_structlog")
def test_run_logs_as_json_keep_utc_and_every_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """JSON log lines (the journal's) keep their UTC timestamp and every field."""
    config_path = write_config(tmp_path)
    config = parse_config(config_path.read_text(), str(config_path))
    cli.configure_run_logs(config, "json")
    structlog.get_logger().info("door_unlocked", door="front", reason=None)
    line = json.loads(capsys.readouterr().out)
    assert line["reason"] is None
    assert line["timestamp"].endswith("Z")


def test_readme_command_table_lists_every_command() -> None:
    """README's table of commands has a row for every ``permitgate`` subcommand (what
    ``permitgate --help`` lists), and none that does not exist."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `permitgate ([a-z-]+)", table, re.M))
    commands = set(re.findall(r"^    ([a-z-]+)  ", cli.build_parser().format_help(), re.M))
    assert "doctor" in commands
    assert listed == commands


@pytest.mark.parametrize("argv", [
    ["-c", "{cfg}", "check-config"],
    ["check-config", "-c", "{cfg}"],
    ["-c", "/nonexistent.toml", "check-config", "-c", "{cfg}"],
], ids=["before", "after", "after-wins"])
def test_config_option_before_or_after_the_command(tmp_path: Path, argv: list[str]) -> None:
    """-c works before or after the subcommand, and the one after it wins."""
    config = write_config(tmp_path)
    out = io.StringIO()
    assert cli.main([a.format(cfg=config) for a in argv], out=out) == 0
    assert f"{config}: OK" in out.getvalue()


def test_status_reports_an_agent_that_ended_without_stopping(tmp_path: Path) -> None:
    """An agent recorded as running whose process is gone (SIGKILL, crash) is shown as not
    running rather than running."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    config = write_config(tmp_path)
    cfg = parse_config(config.read_text(), str(config))
    store = Store(resolve_store_path(cfg, config))
    store.append(Event("agent_started"), device=(
        "system", "agent", json.dumps({"state": "running", "pid": int(gone.stdout)})))
    store.close()
    out = io.StringIO()
    assert cli.main(["status", "--json", "-c", str(config)], out=out) == 0
    assert json.loads(out.getvalue())["agent"]["state"].startswith("not running")
