"""Tests for configuration loading in :mod:`agent.config`.

Every error must be a ``ConfigError`` whose message names the file and the key, and the line
where the key (or, for a missing key, its table) is written.
"""

from __future__ import annotations

import math
import os
import re
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Literal, TypeGuard, get_args, get_origin
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from agent.config import (
    DEFAULT_CONFIG_NAME,
    Config,
    ConfigError,
    DoorConfig,
    KeysConfig,
    LoggingConfig,
    PolicyConfig,
    ReaderConfig,
    SiteConfig,
    StoreConfig,
    SyncConfig,
    _line_of,
    line_pattern_problem,
    load_config,
    parse_config,
    parse_window,
)

FULL = """\
# A two-door building in Shanghai.
[site]
site_id = "harbour-view"
gateway_id = "gw-01"
timezone = "Asia/Shanghai"

[store]
path = "/var/lib/permitgate/test.db"
event_retention_days = 90
max_events = 100000
prune_interval_s = 600

[keys]
site_key = "site.key"
generate_missing = false

[policy]
mode = "normal"
anti_passback = "hard"
anti_passback_reset_h = 12
holidays = [2026-10-01, 2026-10-02]
clock_floor = 2026-01-01

[policy.schedules.office]
mon = ["08:00-12:00", "13:00-18:00"]
tue = ["08:00-18:00"]
wed = ["08:00-18:00"]
thu = ["08:00-18:00"]
fri = ["08:00-18:00"]

[policy.schedules.night]
sat = ["22:00-24:00"]
sun = ["00:00-06:00"]
holiday = ["10:00-12:00"]

[logging]
level = "debug"
format = "json"

[[doors]]
id = "front"
name = "Front entrance"
unlock_s = 4
held_open_s = 25
relay = { driver = "gpio", options = { chip = "/dev/gpiochip0", line = 17 } }
contact = { driver = "gpio", options = { line = 27 } }

[[doors]]
id = "garage"
name = "Garage"
schedule = "office"
fail_mode = "safe"
rex_unlocks = false

[doors.relay]
driver = "gpio"
options = { line = 22 }

[[readers]]
id = "front-in"
door = "front"
direction = "entry"
driver = "rdm6300"
options = { port = "/dev/ttyAMA0" }
debounce_s = 1.0

[[readers]]
id = "front-out"
door = "front"
direction = "exit"
driver = "rdm6300"
options = { port = "/dev/ttyUSB0" }

[[readers]]
id = "garage-in"
door = "garage"
direction = "entry"
driver = "simulated"
"""

# Small enough that the line numbers in the tests below can be read off directly.
MINIMAL = """\
[site]
site_id = "s1"
gateway_id = "gw1"

[[doors]]
id = "front"

[[doors]]
id = "back"
unlock_s = 3

[[readers]]
id = "front-in"
door = "front"
direction = "entry"
driver = "simulated"
"""
#   1 [site]            5 [[doors]]        8 [[doors]]         12 [[readers]]
#   2 site_id           6 id = "front"     9 id = "back"       13 id = "front-in"
#   3 gateway_id                          10 unlock_s = 3      14 door = "front"


def lines_of(text: str) -> list[str]:
    """The text's lines, for building variants by line number."""
    return text.split("\n")


def insert(text: str, after: int, *new: str) -> str:
    """``text`` with ``new`` lines inserted after line ``after`` (0 = at the top)."""
    rows = lines_of(text)
    return "\n".join([*rows[:after], *new, *rows[after:]])


def replace_line(text: str, number: int, new: str) -> str:
    """``text`` with line ``number`` (1-based) replaced by ``new``."""
    rows = lines_of(text)
    rows[number - 1] = new
    return "\n".join(rows)


def config_error(tmp_path: Path, text: str) -> tuple[str, str]:
    """Load ``text`` from a file and return (file name, ConfigError message)."""
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(path), str(info.value)


# -- valid configurations ----------------------------------------------------------------


def test_full_config_parses(tmp_path: Path) -> None:
    """A complete configuration loads from a file with every value where it was written."""
    path = tmp_path / "site.toml"
    path.write_text(FULL, encoding="utf-8")
    config = load_config(path)
    assert config.site.site_id == "harbour-view"
    assert config.zone == ZoneInfo("Asia/Shanghai")
    assert config.store.path == Path("/var/lib/permitgate/test.db")
    assert config.store.event_retention_days == 90
    assert config.keys.generate_missing is False
    assert config.policy.anti_passback == "hard"
    assert config.policy.anti_passback_reset_h == 12.0
    assert config.policy.holidays == (date(2026, 10, 1), date(2026, 10, 2))
    assert set(config.policy.schedules) == {"office", "night"}
    assert config.policy.schedules["office"].windows("mon") == (
        (time(8), time(12)), (time(13), time(18)))
    assert config.policy.schedules["night"].windows("sat") == ((time(22), None),)
    assert config.policy.schedules["night"].windows("holiday") == ((time(10), time(12)),)
    assert config.policy.schedules["office"].windows("sun") == ()
    assert config.logging.format == "json"
    assert [d.id for d in config.doors] == ["front", "garage"]
    front, garage = config.doors
    assert front.relay.options == {"chip": "/dev/gpiochip0", "line": 17}
    assert front.contact is not None and front.contact.options == {"line": 27}
    assert front.rex is None
    assert front.schedule == "always"
    assert garage.relay.driver == "gpio"
    assert garage.schedule == "office"
    assert garage.fail_mode == "safe"
    assert garage.unlock_s == 5.0  # the default
    assert [(r.id, r.door, r.direction) for r in config.readers] == [
        ("front-in", "front", "entry"), ("front-out", "front", "exit"),
        ("garage-in", "garage", "entry")]
    assert config.door("garage") is garage


def test_minimal_config_takes_defaults() -> None:
    """Only site ids, a door and a reader are required; the rest takes documented defaults."""
    config = parse_config(MINIMAL, "min.toml")
    assert config.site.timezone == "UTC"
    assert config.policy.mode == "normal"
    assert config.policy.anti_passback == "off"
    assert config.policy.schedules == {}
    assert config.doors[0].fail_mode == "secure"
    assert config.doors[0].relay.driver == "simulated"


def test_embedded_defaults_parse() -> None:
    """The embedded defaults (load_config(None)) are a valid configuration."""
    config = load_config(None)
    assert isinstance(config, Config)
    assert config.doors
    assert config.readers
    assert {r.direction for r in config.readers} <= {"entry", "exit"}


def test_door_lookup_unknown_raises_key_error() -> None:
    """Config.door raises KeyError for an unknown id, so it can't silently end a caller's map()."""
    config = parse_config(MINIMAL, "min.toml")
    with pytest.raises(KeyError):
        config.door("side")
    with pytest.raises(KeyError):
        list(map(config.door, ["front", "side", "back"]))


def test_config_is_frozen() -> None:
    """A loaded configuration cannot be changed in place."""
    config = parse_config(MINIMAL, "min.toml")
    with pytest.raises(ValueError, match="frozen"):
        config.site.site_id = "other"


# -- errors with key, file and line --------------------------------------------------------

NO_DOORS = lines_of(MINIMAL)[:4] + lines_of(MINIMAL)[10:]

# (id, text, key as reported, words in the message, expected line or None)
LINE_CASES = [
    ("unknown_top_level_key", insert(MINIMAL, 0, 'colour = "red"'),
     "colour", "unknown key", 1),
    ("unknown_top_level_table", MINIMAL + '\n[sitee]\nsite_id = "x"\n',
     "sitee", "unknown key", 18),
    ("unknown_key_in_site", insert(MINIMAL, 3, 'site_name = "x"'),
     "site.site_name", "unknown key", 4),
    ("unknown_key_in_second_door", insert(MINIMAL, 10, "unlock_seconds = 3"),
     "doors[1].unlock_seconds", "unknown key", 11),
    ("unknown_key_in_first_door", insert(MINIMAL, 6, "colour = 3"),
     "doors[0].colour", "unknown key", 7),
    ("unknown_key_in_reader", insert(MINIMAL, 16, "baud = 9600"),
     "readers[0].baud", "unknown key", 17),
    ("unknown_key_in_second_door_subtable",
     insert(MINIMAL, 10, "[doors.relay]", 'driver = "gpio"', "pin = 5"),
     "doors[1].relay.pin", "unknown key", 13),
    ("unknown_key_in_inline_table", insert(MINIMAL, 10, 'relay = { driver = "gpio", pin = 5 }'),
     "doors[1].relay.pin", "unknown key", 11),
    ("wrong_type_string_for_number", replace_line(MINIMAL, 10, 'unlock_s = "slow"'),
     "doors[1].unlock_s", "got 'slow'", 10),
    ("numeric_string_for_number", replace_line(MINIMAL, 10, 'unlock_s = "5"'),
     "doors[1].unlock_s", "got '5'", 10),
    ("boolean_for_number", replace_line(MINIMAL, 10, "unlock_s = true"),
     "doors[1].unlock_s", "got True", 10),
    ("string_for_boolean", insert(MINIMAL, 3, "[keys]", 'generate_missing = "yes"'),
     "keys.generate_missing", "got 'yes'", 5),
    ("wrong_type_number_for_string", replace_line(MINIMAL, 2, "site_id = 5"),
     "site.site_id", "valid string", 2),
    ("wrong_type_string_for_list", "\n".join(['doors = "front"', *NO_DOORS]),
     "doors", "valid tuple", 1),
    ("out_of_range", replace_line(MINIMAL, 10, "unlock_s = 0"),
     "doors[1].unlock_s", "greater than 0", 10),
    ("bad_literal", replace_line(MINIMAL, 15, 'direction = "in"'),
     "readers[0].direction", "'entry' or 'exit'", 15),
    ("missing_required_in_site", replace_line(MINIMAL, 3, ""),
     "site.gateway_id", "required key is missing", 1),
    ("missing_id_in_second_door", replace_line(MINIMAL, 9, ""),
     "doors[1].id", "required key is missing", 8),
    ("missing_site_table", "\n".join(lines_of(MINIMAL)[4:]),
     "site", "required key is missing", None),
    ("missing_readers", "\n".join(lines_of(MINIMAL)[:11]),
     "readers", "required key is missing", None),
    ("empty_doors_list", "\n".join(["doors = []", *NO_DOORS]),
     "doors", "at least 1 item", 1),
    ("unknown_time_zone", insert(MINIMAL, 3, 'timezone = "Mars/Olympus"'),
     "site.timezone", "unknown time zone 'Mars/Olympus'", 4),
    ("time_zone_is_a_zoneinfo_directory", insert(MINIMAL, 3, 'timezone = "Asia"'),
     "site.timezone", "unknown time zone 'Asia'", 4),
    ("time_zone_wrong_case", insert(MINIMAL, 3, 'timezone = "asia/shanghai"'),
     "site.timezone", "unknown time zone", 4),
    ("window_impossible_time",
     MINIMAL + '\n[policy.schedules.night]\nmon = ["25:00-26:00"]\n',
     "policy.schedules.night.mon", "impossible time", 19),
    ("window_ends_before_start",
     MINIMAL + '\n[policy.schedules.day]\nmon = ["08:00-09:00"]\n'
     '[policy.schedules.night]\nmon = ["10:00-09:00"]\n',
     "policy.schedules.night.mon", "ends before it starts", 21),
    ("window_bad_format_in_multiline_array",
     MINIMAL + '\n[policy.schedules.night]\nmon = [\n  "08:00-09:00",\n  "9:00-10:00",\n]\n',
     "policy.schedules.night.mon", "is not 'HH:MM-HH:MM'", 19),
    ("unknown_weekday", MINIMAL + '\n[policy.schedules.night]\nmonday = ["08:00-09:00"]\n',
     "policy.schedules.night.monday", "unknown key", 19),
    ("always_cannot_be_redefined", MINIMAL + '\n[policy.schedules.always]\nmon = []\n',
     "policy.schedules", "'always' is built in", 18),
    ("schedule_name_upper_case", MINIMAL + '\n[policy.schedules.Night]\nmon = []\n',
     "policy.schedules.Night", "should match pattern", 18),
    ("door_id_upper_case", replace_line(MINIMAL, 9, 'id = "Back"'),
     "doors[1].id", "should match pattern", 9),
    ("door_id_with_space", replace_line(MINIMAL, 9, 'id = "back door"'),
     "doors[1].id", "should match pattern", 9),
    ("door_id_leading_dash", replace_line(MINIMAL, 9, 'id = "-back"'),
     "doors[1].id", "should match pattern", 9),
    ("door_id_too_long", replace_line(MINIMAL, 9, f'id = "{"d" * 64}"'),
     "doors[1].id", "should match pattern", 9),
    ("door_id_with_slash", replace_line(MINIMAL, 9, 'id = "back/+"'),
     "doors[1].id", "should match pattern", 9),
    ("site_id_upper_case", replace_line(MINIMAL, 2, 'site_id = "Site"'),
     "site.site_id", "should match pattern", 2),
    ("quoted_key", replace_line(MINIMAL, 10, '"unlock_s" = "slow"'),
     "doors[1].unlock_s", "got 'slow'", 10),
    ("dotted_key", insert(MINIMAL, 10, 'relay.driver = "gpio"', "relay.pin = 5"),
     "doors[1].relay.pin", "unknown key", 12),
]


@pytest.mark.parametrize(("text", "key", "words", "line"),
                         [case[1:] for case in LINE_CASES], ids=[case[0] for case in LINE_CASES])
def test_error_names_file_key_and_line(tmp_path: Path, text: str, key: str, words: str,
                                       line: int | None) -> None:
    """A schema error is a ConfigError naming the file, the key, the problem and the line."""
    source, message = config_error(tmp_path, text)
    assert message.startswith(f"{source}: invalid configuration")
    where = f"{source}:{line}: " if line is not None else f"{source}: "
    # A bad table name (a dict key) is reported as "<key>[key]".
    named = re.compile(re.escape(f"{where}{key}") + r"(\[key\])?: ")
    matching = [row for row in message.splitlines() if named.search(row)]
    assert matching, message
    assert any(words in row for row in matching), message


@pytest.mark.parametrize(("text", "words"), [
    pytest.param(replace_line(MINIMAL, 14, 'door = "side"'),
                 "readers[0].door: no door with id 'side'", id="reader_unknown_door"),
    pytest.param(replace_line(MINIMAL, 9, 'id = "front"'),
                 "doors: id 'front' is used twice", id="duplicate_door_id"),
    pytest.param(MINIMAL + '\n[[readers]]\nid = "front-in"\ndoor = "back"\n'
                 'direction = "exit"\ndriver = "simulated"\n',
                 "readers: id 'front-in' is used twice", id="duplicate_reader_id"),
    pytest.param(insert(MINIMAL, 10, 'schedule = "weekend"'),
                 "doors[1].schedule: no schedule named 'weekend' (known: always)",
                 id="door_unknown_schedule"),
])
def test_cross_reference_errors(tmp_path: Path, text: str, words: str) -> None:
    """References between sections (reader→door, door→schedule, unique ids) are checked."""
    source, message = config_error(tmp_path, text)
    assert message.startswith(f"{source}: invalid configuration")
    assert words in message


def test_every_problem_is_reported(tmp_path: Path) -> None:
    """All schema problems are listed at once, each on its own line with its count."""
    text = replace_line(insert(MINIMAL, 3, "bogus = 1"), 11, 'unlock_s = "slow"')
    source, message = config_error(tmp_path, text)
    assert message.startswith(f"{source}: invalid configuration (2 problem(s)):")
    assert f"{source}:4: site.bogus: unknown key" in message
    assert f"{source}:11: doors[1].unlock_s: " in message


def test_invalid_toml_names_file_and_parser_line(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the line the TOML parser reports."""
    text = replace_line(MINIMAL, 10, 'unlock_s = "3')
    source, message = config_error(tmp_path, text)
    assert message.startswith(f"{source}: not valid TOML: ")
    assert "(at line 10," in message


def test_duplicate_table_is_a_toml_error(tmp_path: Path) -> None:
    """A table declared twice is reported by the TOML parser with its line."""
    source, message = config_error(tmp_path, MINIMAL + "\n[site]\n")
    assert message.startswith(f"{source}: not valid TOML: ")
    assert "(at line 18," in message


def test_missing_file(tmp_path: Path) -> None:
    """A path that does not exist is a ConfigError naming the path."""
    path = tmp_path / "nowhere" / "site.toml"
    with pytest.raises(ConfigError, match="configuration file not found") as info:
        load_config(path)
    assert str(info.value).startswith(str(path))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory given as the configuration is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="cannot read configuration") as info:
        load_config(tmp_path)
    assert str(info.value).startswith(str(tmp_path))


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "site.toml"
    path.write_bytes(MINIMAL.encode("utf-8") + b'\n# caf\xe9\n')
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(path)


def test_parse_config_names_source() -> None:
    """parse_config names the source it is given, as load_config(None) names the defaults."""
    with pytest.raises(ConfigError) as info:
        parse_config("[site]\n", DEFAULT_CONFIG_NAME)
    assert str(info.value).startswith(f"{DEFAULT_CONFIG_NAME}: invalid configuration")


# -- windows -------------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "expected"), [
    pytest.param("08:00-18:00", (time(8), time(18)), id="day"),
    pytest.param("00:00-24:00", (time(0), None), id="whole_day"),
    pytest.param("22:30-24:00", (time(22, 30), None), id="to_midnight"),
    pytest.param("23:58-23:59", (time(23, 58), time(23, 59)), id="one_minute"),
])
def test_parse_window_valid(window: str, expected: tuple[time, time | None]) -> None:
    """Valid windows parse to (start, end) with an end of 24:00 as None."""
    assert parse_window(window) == expected


@pytest.mark.parametrize("window", [
    pytest.param("25:00-26:00", id="hour_25"),
    pytest.param("10:00-09:00", id="backwards"),
    pytest.param("10:00-10:00", id="empty"),
    pytest.param("24:00-24:00", id="starts_at_24"),
    pytest.param("08:60-09:00", id="minute_60"),
    pytest.param("08:00-24:01", id="past_24"),
    pytest.param("8:00-09:00", id="one_digit_hour"),
    pytest.param("08:00 - 09:00", id="spaces"),
    pytest.param("08:00-09:00\n", id="trailing_newline"),
    pytest.param("08:00-09:00-10:00", id="three_times"),
    pytest.param("\u0660\u0668:00-09:00", id="arabic_indic_digits"),
    pytest.param("", id="empty_string"),
])
def test_parse_window_invalid(window: str) -> None:
    """Anything but an exact, increasing "HH:MM-HH:MM" (end up to 24:00) is rejected."""
    with pytest.raises(ValueError, match="window"):
        parse_window(window)


# -- _line_of ------------------------------------------------------------------------------

LINED = """\
[site]
site_id = "s1"

[[doors]]
id = "front"
name = \"\"\"
[[doors]]
id = "not-a-door"
\"\"\"
unlock_s = 5

[doors.relay]
driver = "gpio"

[[doors]]
id = "back"   # the second door
unlock_s = 3
tags = [
  "a", # [[doors]]
  "b",
]

[doors.relay]
driver = "gpio"
options = { line = 22 }

[[readers]]
id = "r1"
"""


@pytest.mark.parametrize(("loc", "line"), [
    pytest.param(("site", "site_id"), 2, id="site_key"),
    pytest.param(("doors", 0, "id"), 5, id="first_door_id"),
    pytest.param(("doors", 0, "unlock_s"), 10, id="first_door_after_multiline_string"),
    pytest.param(("doors", 1, "id"), 16, id="second_door_id"),
    pytest.param(("doors", 1, "unlock_s"), 17, id="second_door_unlock"),
    pytest.param(("doors", 1, "tags", 1), 18, id="element_of_multiline_array"),
    pytest.param(("doors", 0, "relay", "driver"), 13, id="first_door_subtable"),
    pytest.param(("doors", 1, "relay", "driver"), 24, id="second_door_subtable"),
    pytest.param(("doors", 1, "relay", "options", "line"), 25, id="inside_inline_table"),
    pytest.param(("doors", 1, "name"), 15, id="missing_key_second_door_header"),
    pytest.param(("doors", 1), 15, id="second_door_header"),
    pytest.param(("readers", 0, "door"), 27, id="missing_key_reader_header"),
    pytest.param(("site", "gateway_id"), 1, id="missing_key_site_header"),
    pytest.param(("logging", "level"), None, id="absent_table"),
    pytest.param((), None, id="top_level"),
])
def test_line_of(loc: tuple[int | str, ...], line: int | None) -> None:
    """_line_of finds a key's own line, or its nearest written table, in the right block."""
    assert _line_of(LINED, loc) == line


def test_line_of_windows_line_endings() -> None:
    """_line_of counts lines the same way with CRLF line endings."""
    assert _line_of(LINED.replace("\n", "\r\n"), ("doors", 1, "unlock_s")) == 17


# -- values no setting can mean ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "key", "line", "words"), [
    pytest.param(MINIMAL + '\n[store]\npath = "pg\\u0000.db"\n', "store.path", 19, "NUL byte",
                 id="nul_in_store_path"),
    pytest.param(MINIMAL + '\n[keys]\nsite_key = "site\\u0000.key"\n', "keys.site_key", 19,
                 "NUL byte", id="nul_in_key_name"),
    pytest.param(insert(MINIMAL, 16, 'options = { port = "/dev/tty\\u0000S0" }'),
                 "readers[0].options.port", 17, "NUL byte", id="nul_in_driver_option"),
    pytest.param(MINIMAL + "\n[policy]\nanti_passback_reset_h = inf\n",
                 "policy.anti_passback_reset_h", 19, "inf is not accepted",
                 id="inf_hours"),
    pytest.param(MINIMAL + "\n[sync]\nrecent_window_h = nan\n", "sync.recent_window_h", 19,
                 "nan is not accepted", id="nan_hours"),
    pytest.param(replace_line(MINIMAL, 10, "unlock_s = -inf"), "doors[1].unlock_s", 10,
                 "-inf is not accepted", id="minus_inf_seconds"),
    pytest.param(insert(MINIMAL, 16, "options = { timeout_s = inf }"),
                 "readers[0].options.timeout_s", 17, "inf is not accepted",
                 id="inf_in_driver_option"),
    pytest.param(MINIMAL + "\n[policy]\nanti_passback_reset_h = 1e308\n",
                 "policy.anti_passback_reset_h", 19, "less than or equal to 87600",
                 id="huge_finite_hours"),
    pytest.param(MINIMAL + "\n[store]\nmax_events = 99999999999999999999999\n",
                 "store.max_events", 19, "less than or equal to", id="integer_beyond_64_bits"),
])
def test_unusable_values_name_file_key_and_line(tmp_path: Path, text: str, key: str,
                                                line: int, words: str) -> None:
    """A NUL byte in any string, inf or nan in any number, and a number too large to be
    turned into seconds are ConfigErrors naming the file, the line and the key."""
    source, message = config_error(tmp_path, text)
    assert message.startswith(f"{source}: invalid configuration")
    rows = [row for row in message.splitlines() if f"{source}:{line}: {key}: " in row]
    assert rows, message
    assert words in rows[0], message


def test_nul_byte_is_not_repeated_raw_in_the_message(tmp_path: Path) -> None:
    """The message about a NUL byte carries no NUL byte itself (it is printed to a
    terminal or a journal)."""
    _, message = config_error(tmp_path, MINIMAL + '\n[store]\npath = "a\\u0000b"\n')
    assert "\0" not in message


def test_deeply_nested_arrays_are_a_config_error(tmp_path: Path) -> None:
    """Arrays nested thousands deep (which exhaust tomllib's recursion) are a ConfigError
    saying the TOML is invalid, not a RecursionError."""
    source, message = config_error(tmp_path, MINIMAL + "\nx = " + "[" * 5000 + "]" * 5000)
    assert message.startswith(f"{source}: not valid TOML")
    assert "nested too deeply" in message


def test_hours_at_the_bound_can_be_set_up() -> None:
    """The largest accepted hours still convert to whole seconds as the agent does."""
    config = parse_config(MINIMAL + "\n[policy]\nanti_passback_reset_h = 87600\n"
                          "[sync]\nrecent_window_h = 87600\n", "f.toml")
    assert int(config.policy.anti_passback_reset_h * 3600) == 315_360_000
    assert int(config.sync.recent_window_h * 3600) == 315_360_000


# -- reader line patterns --------------------------------------------------------------------

READER_LINE = 16
"""The line after which a reader option is inserted into MINIMAL (its driver line)."""


@pytest.mark.parametrize("pattern", [
    r"(?P<card>(a+)+)", r"(?P<card>(a*)*)", r"(?P<card>(a|a)*)", r"(?P<card>(a|ab)+)",
    r"^(?P<card>(?:[0-9A-F]{2}\s?)+)$", r"(?P<card>(?:x?)*)", r"(?x) (?P<card> ( a + ) + )",
    r"(?P<card>(a+){2,})",
])
def test_nested_quantifier_pattern_is_refused_with_file_line_and_key(
        tmp_path: Path, pattern: str) -> None:
    """A reader line pattern with a repeat inside a repeat (exponential backtracking on a
    line that almost matches) is a ConfigError naming the file, line and key."""
    text = insert(MINIMAL, READER_LINE, f"options = {{ pattern = {toml_literal(pattern)} }}")
    source, message = config_error(tmp_path, text)
    assert f"{source}:{READER_LINE + 1}: readers[0].options.pattern: a repeated group" \
        in message, message
    assert "possessive" in message


@pytest.mark.parametrize("pattern", [
    r"^\s*(?P<card>[0-9A-Fa-f]{4,32})\s*$",  # the serial driver's default
    r"^(?P<card>[0-9A-F]{10})\r?$",
    r"^.*(?P<card>[0-9]{10}).*$",
    r"(?P<card>(?:[0-9A-F]{2})+)",  # a fixed-length body may repeat
    r"(?P<card>(?:[0-9A-F]{2}\s?)++)",  # possessive: never backtracks
    r"(?P<card>(?>a+|b)+)",  # an atomic group is one piece to its repeat
    r"(?P<card>(?:a|b)+)",  # the parser makes this the class [ab]
    r"(?P<card>(a+)?)",  # optional, not repeated
])
def test_safe_patterns_are_accepted(pattern: str) -> None:
    """Patterns without a variable part inside a repeat load as written."""
    assert line_pattern_problem(pattern) is None
    text = insert(MINIMAL, READER_LINE, f"options = {{ pattern = {toml_literal(pattern)} }}")
    assert parse_config(text, "f.toml").readers[0].options["pattern"] == pattern


@pytest.mark.parametrize(("pattern", "words"), [
    pytest.param("(?P<card>[0-9]", "not a valid regular expression", id="invalid"),
    pytest.param("a" * 1001, "longer than 1000 characters", id="too_long"),
])
def test_unusable_pattern_problems(pattern: str, words: str) -> None:
    """A pattern that does not compile or is too long is named as such."""
    problem = line_pattern_problem(pattern)
    assert problem is not None and words in problem


def toml_literal(text: str) -> str:
    """A TOML literal string holding ``text`` (no escapes, so regexes read as written)."""
    assert "'" not in text and "\n" not in text
    return f"'{text}'"


# -- fuzzing the loader ----------------------------------------------------------------------

SECTION_MODELS: dict[str, type[BaseModel]] = {
    "site": SiteConfig, "store": StoreConfig, "keys": KeysConfig, "policy": PolicyConfig,
    "logging": LoggingConfig, "sync": SyncConfig,
}
LIST_MODELS: dict[str, type[BaseModel]] = {"doors": DoorConfig, "readers": ReaderConfig}
DRIVER_OPTION_KEYS = ("pattern", "port", "format", "id_kind", "max_line", "state_file")

_texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["simulated", "serial", "entry", "exit", "front", "back", "normal",
                     "soft", "hard", "UTC", "Asia/Shanghai", "Asia", "../../etc", "08:00-09:00",
                     "(?P<card>(a+)+)", "(?P<card>x)", "a\0b", "always", "json", "5", ""]),
)
_scalars = st.one_of(_texts, st.integers(), st.integers(min_value=-5, max_value=100_000),
                     st.floats(), st.booleans(), st.dates())
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3),
                    st.dictionaries(st.sampled_from([*DRIVER_OPTION_KEYS, "driver", "x"]),
                                    _scalars, max_size=3))


_IDENTS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,8}", fullmatch=True)
_TYPED: dict[object, st.SearchStrategy[Any]] = {
    float: st.one_of(st.floats(), st.floats(min_value=0, max_value=1e6)),
    int: st.one_of(st.integers(), st.integers(min_value=0, max_value=100_000)),
    bool: st.booleans(),
    str: st.one_of(_IDENTS, _texts),
    str | None: st.one_of(_IDENTS, _texts),
    Path: st.one_of(_IDENTS, _texts),
    date: st.dates(),
}


def _typed(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of a field's own type, edge cases included (inf, nan, huge integers, NUL
    bytes), so that documents get past the type checks to the limits behind them."""
    if get_origin(annotation) is Literal:
        return st.sampled_from(get_args(annotation))
    if get_origin(annotation) is tuple:
        return st.lists(_texts, max_size=3)
    return _TYPED.get(annotation, _values)


def _base_document() -> dict[str, Any]:
    return {"site": {"site_id": "s1", "gateway_id": "gw1"},
            "doors": [{"id": "front"}, {"id": "back"}],
            "readers": [{"id": "front-in", "door": "front", "direction": "entry",
                         "driver": "simulated"}]}


def _table(doc: dict[str, Any], where: str, draw: st.DrawFn) -> dict[str, Any] | None:
    """The table ``where`` names in ``doc`` (made if missing); None where an earlier
    change replaced it with a value."""
    table: object
    if where in SECTION_MODELS:
        table = doc.setdefault(where, {})
    elif where in LIST_MODELS:
        items = doc.get(where)
        table = draw(st.sampled_from(items)) if _is_table_list(items) else None
    elif where == "schedule":
        policy = doc.setdefault("policy", {})
        schedules = policy.setdefault("schedules", {}) if _is_table(policy) else None
        table = schedules.setdefault(draw(st.sampled_from(["night", "always", "Bad"])), {}) \
            if _is_table(schedules) else None
    elif where == "options":
        readers = doc.get("readers")
        table = readers[0].setdefault("options", {}) if _is_table_list(readers) else None
    else:
        table = doc
    return table if _is_table(table) else None


def _keys(where: str, wild: bool) -> list[str]:
    """The keys a change at ``where`` picks from: the real ones (and, when ``wild``, an
    unknown one)."""
    model = SECTION_MODELS.get(where) or LIST_MODELS.get(where)
    if model is not None:
        return [*model.model_fields, *(["bogus"] if wild else [])]
    if where == "schedule":
        return ["mon", "sun", "holiday", *(["monday"] if wild else [])]
    if where == "options":
        return list(DRIVER_OPTION_KEYS)
    return ["site", "doors", "readers", "extra"]


@st.composite
def documents(draw: st.DrawFn, *, wild: bool) -> dict[str, Any]:
    """A valid minimal document with one to four keys changed: set to a value of the
    key's own type (edge cases included) or, with ``wild``, also to any value, removed,
    or an unknown key added."""
    doc = _base_document()
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        where = draw(st.sampled_from([*SECTION_MODELS, *LIST_MODELS, "schedule", "options",
                                      *(["top"] if wild else [])]))
        table = _table(doc, where, draw)
        if table is None:
            continue
        key = draw(st.sampled_from(_keys(where, wild)))
        model = SECTION_MODELS.get(where) or LIST_MODELS.get(where)
        field = model.model_fields.get(key) if model is not None else None
        if wild and draw(st.booleans()):
            if key in table and draw(st.booleans()):
                del table[key]
            else:
                table[key] = draw(_values)
        elif field is not None:
            table[key] = draw(_typed(field.annotation))
        elif where == "schedule":
            table[key] = draw(st.lists(st.one_of(_texts, st.sampled_from(
                ["00:00-24:00", "08:00-09:00", "23:59-24:00"])), max_size=3))
        else:
            table[key] = draw(_scalars)
    return doc


def toml_document(doc: dict[str, Any]) -> str:
    """``doc`` as TOML: tables for dicts, arrays of tables for lists of dicts, inline
    values inside them."""
    lines: list[str] = []
    scalars = {k: v for k, v in doc.items() if not _is_table(v) and not _is_table_list(v)}
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in scalars.items()]
    for key, value in doc.items():
        if _is_table(value):
            lines.append(f"[{toml_key(key)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
        elif _is_table_list(value):
            for item in value:
                lines.append(f"[[{toml_key(key)}]]")
                lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def _is_table(value: object) -> TypeGuard[dict[str, Any]]:
    return isinstance(value, dict)


def _is_table_list(value: object) -> TypeGuard[list[dict[str, Any]]]:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def toml_key(key: str) -> str:
    """A bare key where TOML allows one, else a quoted key."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_string(text: str) -> str:
    """A TOML basic string; control characters, quote and backslash escaped."""
    escaped = "".join(f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F
                      else c for c in text)
    return f'"{escaped}"'


def toml_value(value: object) -> str:
    """An inline TOML value."""
    if isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = toml_string(value)
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, date):
        text = value.isoformat()
    elif isinstance(value, list):
        text = "[" + ", ".join(toml_value(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) \
            + " }"
    else:
        raise TypeError(type(value))
    return text


def _can_be_set_up(config: Config) -> None:
    """What the agent does with the values at start-up, short of opening anything."""
    assert int(config.policy.anti_passback_reset_h * 3600) >= 0
    assert int(config.sync.recent_window_h * 3600) >= 0
    base = Path("/nonexistent-base")
    for name in (str(config.store.path), config.keys.site_key, config.sync.ca_file,
                 config.sync.cert_file, config.sync.key_file, config.sync.trusted_keys,
                 config.sync.password_file or "x"):
        os.fspath((base / name).resolve())  # ValueError on a NUL byte
    config.zone.utcoffset(datetime(2026, 1, 1))


# The loader's broadest property: twice the profile's examples (600 in CI).
@settings(max_examples=2 * settings().max_examples, database=None)
@given(st.one_of(documents(wild=False), documents(wild=True)))
def test_loader_fuzz_returns_config_or_config_error(doc: dict[str, Any]) -> None:
    """Documents built from the real keys with odd values load to a Config that can be
    set up, or raise ConfigError; never any other exception."""
    text = toml_document(doc)
    try:
        config = parse_config(text, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml:")
        return
    assert isinstance(config, Config)
    _can_be_set_up(config)


@settings(database=None)
@given(st.one_of(st.text(max_size=200),
                 st.builds(lambda doc, tail: toml_document(doc) + tail, documents(wild=True),
                           st.text(alphabet="[]{}=\"'#\n.,x1 ", max_size=40))))
def test_loader_fuzz_on_arbitrary_text(text: str) -> None:
    """Any text at all, and real documents with junk appended, load or raise ConfigError."""
    try:
        parse_config(text, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml:")
