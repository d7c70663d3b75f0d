"""The landlord page's pure parts: languages and dates, back-off, host and origin checks,
settings, the page's database (sessions, codes), names and passwords, catalogs."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from babel.dates import format_date as babel_date
from babel.dates import format_datetime as babel_datetime

from agent.web import auth, catalogs, i18n, messages
from agent.web.db import WebDB
from agent.web.security import csrf_ok, host_allowed, host_name, same_origin
from agent.web.settings import Settings, SettingsError
from protocol import permits


class Clock:
    """A settable clock (Unix seconds)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("header", "lang"), [
    ("zh", "zh"), ("zh-CN", "zh"), ("zh-cn,en;q=0.5", "zh"), ("zh-SG", "zh"),
    ("zh-Hans", "zh"), ("zh-Hans-CN", "zh"), ("en-US,en;q=0.9", "en"), ("zh-TW", "en"),
    ("zh-Hant-TW,zh;q=0.8", "zh"), ("fr-FR,zh-CN;q=0.5", "zh"), ("fr", "en"), ("", "en"),
    (None, "en"), ("en;q=0.4,zh-CN;q=0.8", "zh"), ("zh-CN;q=0", "en"), ("garbage;;;q=x", "en"),
])
def test_accept_language_maps_simplified_chinese_and_else_english(header: str | None,
                                                                   lang: str) -> None:
    """zh, zh-CN, zh-SG and zh-Hans* (in the browser's order of preference) are Chinese;
    everything else, Traditional Chinese tags included, is English."""
    assert i18n.negotiate(header) == lang


def test_cookie_beats_configuration_beats_browser() -> None:
    """The language switch's cookie wins, then ``[web] language``, then the browser."""
    assert i18n.choose("en", "zh", "zh-CN") == "en"
    assert i18n.choose(None, "zh", "en-US") == "zh"
    assert i18n.choose("xx", "auto", "zh-CN") == "zh"


@pytest.mark.parametrize("day", [date(2027, 6, 30), date(2026, 1, 1), date(2030, 12, 9)])
def test_dates_read_as_babel_writes_them(day: date) -> None:
    """The page's own date formats are CLDR's (checked against Babel, which the server
    does not load at run time)."""
    assert i18n.format_date(day, "zh") == babel_date(day, "long", locale="zh_Hans_CN")
    assert i18n.format_date(day, "en") == babel_date(day, "medium", locale="en")
    moment = datetime(day.year, day.month, day.day, 7, 5)
    assert i18n.format_datetime(moment, "zh") == babel_datetime(
        moment, "y年M月d日 HH:mm", locale="zh_Hans_CN")
    assert i18n.format_datetime(moment, "en") == babel_datetime(
        moment, "MMM d, y, HH:mm", locale="en")


def test_times_are_shown_in_the_site_zone() -> None:
    """A Unix time is shown as the site's local time, not the server's."""
    moment = i18n.local(1_800_000_000, ZoneInfo("Asia/Shanghai"))
    assert i18n.format_datetime(moment, "zh") == "2027年1月15日 16:00"


def test_catalogs_are_complete_and_compiled() -> None:
    """Every message of the templates and Python has a Chinese translation, and the
    committed .mo files match the .po files."""
    assert catalogs.problems() == []


def test_every_permit_rule_has_a_sentence_in_both_languages() -> None:
    """Each rule protocol.permits can raise is said in words, in Chinese too."""
    rules = {"empty", "bad_length", "not_a_digit", "bad_check_character", "check_mismatch",
             "unknown_region", "bad_birth_date", "birth_date_out_of_range",
             "first_generation_id", "not_a_letter"}
    source = Path(permits.__file__).read_text()
    assert rules == {r for r in rules if f'"{r}"' in source}
    zh = i18n.translations("zh").gettext
    for rule in rules:
        english = messages.permit_message(lambda s: s, rule, {"length": 3, "code": "000000",
                                                              "value": "x"}, 5)
        chinese = messages.permit_message(zh, rule, {"length": 3, "code": "000000",
                                                     "value": "x"}, 5)
        assert english and chinese and english != chinese, rule
        assert "{" not in english and "{" not in chinese, rule


def test_backoff_waits_grow_and_stop_at_the_cap() -> None:
    """Three failures are free; then 1, 2, 4 ... seconds, never more than the cap, and a
    count an hour old is forgotten."""
    rule = auth.Backoff(cap_s=60)
    assert [rule.delay_s(n) for n in range(3)] == [0, 0, 0]
    assert [rule.delay_s(n) for n in range(3, 10)] == [1, 2, 4, 8, 16, 32, 60]
    assert rule.delay_s(10_000) == 60
    assert rule.wait_s(5, last_ms=0, now_ms=1000) == 3.0
    assert rule.wait_s(5, last_ms=0, now_ms=10_000) == 0
    assert rule.live_failures(9, last_ms=0, now_ms=3_600_000) == 0


def test_host_allowlist_reads_the_name_with_or_without_a_port() -> None:
    """The Host header matches the allowlist by name (any port) or exactly; anything else,
    or nothing, does not."""
    allowed = ("gw.local", "192.168.1.5", "::1")
    assert host_name("[::1]:8443") == "::1"
    assert host_allowed("GW.local:8443", allowed)
    assert host_allowed("192.168.1.5", allowed)
    assert host_allowed("[::1]:8443", allowed)
    assert not host_allowed("evil.example", allowed)
    assert not host_allowed("gw.local.evil.example", allowed)
    assert not host_allowed(None, allowed)
    assert not host_allowed("", allowed)


def _scope(**headers: str) -> dict[str, object]:
    return {"headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


@pytest.mark.parametrize(("headers", "ok"), [
    ({"sec_fetch_site": "same-origin", "origin": "https://gw:8443"}, True),
    ({"sec_fetch_site": "same-origin"}, True),
    ({"origin": "https://gw:8443"}, True),
    ({"sec_fetch_site": "same-origin", "origin": "null"}, True),
    ({"sec_fetch_site": "cross-site", "origin": "https://gw:8443"}, False),
    ({"sec_fetch_site": "same-site"}, False),
    ({"sec_fetch_site": "none"}, False),
    ({"origin": "https://evil.example"}, False),
    ({"origin": "null"}, False),
    ({"sec_fetch_site": "same-origin", "origin": "https://evil.example"}, False),
    ({}, False),
])
def test_posts_must_come_from_the_page_itself(headers: dict[str, str], ok: bool) -> None:
    """Sec-Fetch-Site must say same-origin where the browser sends it, Origin must be the
    page's where it is sent, and a request with neither is refused."""
    assert same_origin(_scope(**headers), "https://gw:8443") is ok


def test_csrf_tokens_compare_in_full() -> None:
    """A token matches only in full: no prefix, no empty token, no missing session."""
    assert csrf_ok("abcdef", "abcdef")
    assert not csrf_ok("abcdef", "abc")
    assert not csrf_ok("abcdef", "")
    assert not csrf_ok(None, "abcdef")
    assert not csrf_ok("abcdef", "abcdeF")


def _settings(**changes: object) -> Settings:
    base: dict[str, object] = {
        "listen": "0.0.0.0", "port": 8443, "tls_cert": "/c", "tls_key": "/k",  # noqa: S104
        "allowed_hosts": ("gw",), "state_dir": "/tmp/x", "agent_socket": "/tmp/x/web.sock",
        "timezone": "Asia/Shanghai"}
    base.update(changes)
    return Settings(**base)  # type: ignore[arg-type]


def test_plain_http_is_served_on_localhost_only() -> None:
    """Without a certificate the page refuses any address but the loopback; half a
    certificate is refused too; settings survive their JSON form."""
    _settings().check()
    _settings(tls_cert=None, tls_key=None, listen="127.0.0.1").check()
    _settings(tls_cert=None, tls_key=None, listen="::1").check()
    with pytest.raises(SettingsError, match="localhost only"):
        _settings(tls_cert=None, tls_key=None).check()
    with pytest.raises(SettingsError, match="set both"):
        _settings(tls_key=None).check()
    settings = _settings()
    assert Settings.from_json(settings.to_json()) == settings


@pytest.fixture
def db(tmp_path: Path) -> WebDB:
    """A fresh web.db on a test clock."""
    return WebDB(tmp_path / "web.db", clock=Clock())


def _clock(db: WebDB) -> Clock:
    clock = db._clock  # noqa: SLF001 - the test's own clock
    assert isinstance(clock, Clock)
    return clock


IDLE, MAX = 30 * 60_000, 12 * 3_600_000


def test_sessions_end_when_idle_or_old(db: WebDB) -> None:
    """A session lives while used, ends after the idle limit without use, and ends at the
    absolute limit however much it is used."""
    user = db.add_user("alice", "landlord", "hash")
    db.create_session(user, "tok", "csrf")
    clock = _clock(db)
    for _ in range(20):
        clock.now += 25 * 60
        assert db.session("tok", idle_ms=IDLE, max_ms=MAX) is not None
    clock.now += 31 * 60
    assert db.session("tok", idle_ms=IDLE, max_ms=MAX) is None
    db.create_session(user, "tok2", "csrf")
    for _ in range(28):
        clock.now += 25 * 60
        assert db.session("tok2", idle_ms=IDLE, max_ms=MAX) is not None
    clock.now += 25 * 60
    assert db.session("tok2", idle_ms=IDLE, max_ms=MAX) is None


def test_changing_or_deleting_an_account_ends_its_sessions(db: WebDB) -> None:
    """A password or role change ends the account's sessions at once, and so does
    deleting it; other accounts' sessions go on."""
    alice = db.add_user("alice", "landlord", "hash")
    bob = db.add_user("bob", "landlord", "hash")
    db.create_session(alice, "a1", "c")
    db.create_session(bob, "b1", "c")
    assert db.change_user("alice", pw_hash="new")
    assert db.session("a1", idle_ms=IDLE, max_ms=MAX) is None
    db.create_session(db.user("alice") or alice, "a2", "c")
    assert db.change_user("alice", role="installer")
    assert db.session("a2", idle_ms=IDLE, max_ms=MAX) is None
    assert db.delete_user("bob")
    assert db.session("b1", idle_ms=IDLE, max_ms=MAX) is None
    assert not db.change_user("nobody", role="landlord")


def test_session_tokens_are_not_stored(db: WebDB, tmp_path: Path) -> None:
    """web.db holds a hash of each session token, never the token."""
    user = db.add_user("alice", "landlord", "hash")
    db.create_session(user, "the-secret-token-value", "c")
    db.close()
    assert b"the-secret-token-value" not in (tmp_path / "web.db").read_bytes()
    wal = tmp_path / "web.db-wal"
    assert not wal.exists() or b"the-secret-token-value" not in wal.read_bytes()


def test_one_time_codes_work_once_and_for_fifteen_minutes(db: WebDB) -> None:
    """A code makes one account of its role; used or expired, it makes nothing; a taken
    name leaves the code usable."""
    db.add_user("taken", "landlord", "h")
    code = auth.normalise_code(auth.new_setup_code())
    db.add_setup_code(code, "installer", auth.CODE_VALID_S * 1000)
    with pytest.raises(ValueError, match="exists"):
        db.redeem_setup_code(code, "taken", "h")
    user = db.redeem_setup_code(code, "ian", "h")
    assert user is not None and user.role == "installer"
    assert db.redeem_setup_code(code, "ian2", "h") is None
    late = auth.normalise_code(auth.new_setup_code())
    db.add_setup_code(late, "landlord", auth.CODE_VALID_S * 1000)
    _clock(db).now += auth.CODE_VALID_S
    assert db.redeem_setup_code(late, "late", "h") is None


def test_codes_survive_how_people_copy_them() -> None:
    """Lower case, spaces instead of dashes, and O for 0 or I/L for 1 read as the code."""
    code = "0A1B-2C3D-4E5F"
    assert auth.normalise_code("oa1b 2c3d 4e5f") == auth.normalise_code(code)
    assert auth.normalise_code("0AlB-2C3D-4E5F") == auth.normalise_code(code)
    assert len(auth.normalise_code(auth.new_setup_code())) == auth.CODE_CHARS


def test_names_and_passwords_are_checked() -> None:
    """Names are short lower-case ASCII (full-width typing folded); passwords have at
    least ten characters and are not the name."""
    assert auth.check_name(" Ａｌｉｃｅ ") == "alice"  # noqa: RUF001 - full-width, as typed
    for bad in ("a", "-x", "名字", "x" * 40, "al ice"):
        with pytest.raises(auth.InputError):
            auth.check_name(bad)
    assert auth.check_password("correct horse", "alice") == "correct horse"
    for bad, rule in (("short", "short_password"), ("x" * 300, "long_password"),
                      ("Alice-Admin", "name_as_password")):
        with pytest.raises(auth.InputError) as refused:
            auth.check_password(bad, "alice-admin")
        assert refused.value.rule == rule


def test_password_hashes_are_argon2id_at_the_pi_parameters() -> None:
    """Hashes are argon2id m=19 MiB, t=2, p=1; the right password verifies, a wrong one
    and an unknown account do not."""
    stored = auth.hash_password("correct horse")
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert auth.verify_password(stored, "correct horse")
    assert not auth.verify_password(stored, "correct horsE")
    assert not auth.verify_password(None, "correct horse")
