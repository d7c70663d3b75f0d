"""Tests for configuration loading in :mod:`agent.config`.

Every error must be a ``ConfigError`` whose message names the file and the key, and the line
where the key (or, for a missing key, its table) is written.
"""

from __future__ import annotations

import re
from datetime import date, time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.config import (
    DEFAULT_CONFIG_NAME,
    Config,
    ConfigError,
    _line_of,
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
