"""Languages of the page: Simplified Chinese and English.

Catalogs are gettext files under ``locales/`` (``zh_Hans``, ``en``), made with Babel from
the templates and this package's Python (``python -m agent.web.catalogs``); the ``.mo``
files are committed and read here with the standard library. The language is the
``lang`` cookie when the switch on the page set it, else ``[web] language``, else the
browser's ``Accept-Language``: zh, zh-CN, zh-SG and zh-Hans* are Chinese (Babel's own
negotiation answered ``en`` for zh-CN against a ``zh_Hans_CN`` catalog), anything else is
English.

Dates are formatted here with Babel's CLDR patterns written out (``y年M月d日``,
``MMM d, y``) instead of loading Babel's locale data at run time, which would add about
6 MB to a process budgeted at 45 MB; tests/test_web_i18n.py checks them against Babel.
"""

from __future__ import annotations

import gettext
from datetime import date, datetime, tzinfo
from functools import lru_cache
from pathlib import Path

LANGUAGES = ("zh", "en")
CATALOG_NAMES = {"zh": "zh_Hans", "en": "en"}
"""Folders under locales/ by page language."""
HTML_LANG = {"zh": "zh-Hans", "en": "en"}
LOCALES_DIR = Path(__file__).parent / "locales"
DOMAIN = "messages"
_MONTHS_EN = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
              "Dec")


def _chinese(tag: str) -> bool:
    return tag in ("zh", "zh-cn", "zh-sg") or tag.startswith("zh-hans")


def negotiate(accept_language: str | None) -> str:
    """The page language for an ``Accept-Language`` header."""
    prefs: list[tuple[float, int, str]] = []
    for index, part in enumerate((accept_language or "")[:500].split(",")):
        tag, _sep, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _eq, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if tag and quality > 0:
            prefs.append((-quality, index, tag.strip().lower()))
    for _q, _i, tag in sorted(prefs):
        if _chinese(tag):
            return "zh"
        if tag == "en" or tag.startswith("en-"):
            return "en"
    return "en"


def choose(cookie: str | None, configured: str, accept_language: str | None) -> str:
    """The page language: the cookie, the configured one, or the browser's."""
    if cookie in LANGUAGES:
        assert cookie is not None
        return cookie
    if configured in LANGUAGES:
        return configured
    return negotiate(accept_language)


@lru_cache(maxsize=len(LANGUAGES))
def translations(lang: str) -> gettext.NullTranslations:
    """The compiled catalog of ``lang`` (English falls back to the source text)."""
    mo = LOCALES_DIR / CATALOG_NAMES[lang] / "LC_MESSAGES" / f"{DOMAIN}.mo"
    try:
        with mo.open("rb") as fp:
            return gettext.GNUTranslations(fp)
    except FileNotFoundError:
        return gettext.NullTranslations()


def format_date(day: date, lang: str) -> str:
    """A date as CLDR writes it: ``2027年6月30日`` (zh long) or ``Jun 30, 2027`` (en)."""
    if lang == "zh":
        return f"{day.year}年{day.month}月{day.day}日"
    return f"{_MONTHS_EN[day.month - 1]} {day.day}, {day.year}"


def format_datetime(moment: datetime, lang: str) -> str:
    """A date and time of day: ``2027年6月30日 14:05`` or ``Jun 30, 2027, 14:05``."""
    clock = f"{moment.hour:02d}:{moment.minute:02d}"
    if lang == "zh":
        return f"{format_date(moment.date(), lang)} {clock}"
    return f"{format_date(moment.date(), lang)}, {clock}"


def local(unix_s: float, zone: tzinfo) -> datetime:
    """Unix seconds as a time in the site's zone."""
    return datetime.fromtimestamp(unix_s, zone)
