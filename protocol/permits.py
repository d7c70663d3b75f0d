"""Permit numbers: which document a number is, or which rule it breaks.

Both sides validate: the gateway before it stores or seals anything a landlord typed, the
office again after it unseals. Accepted documents (docs/permits.md):

- the 18-character citizen number (GB 11643-1999): 6-digit address code, 8-digit birth
  date, 3-digit sequence, and a check character by ISO 7064 MOD 11-2;
- residence permits for Hong Kong, Macao and Taiwan residents: the same form with the
  address codes 810000, 820000, 830000;
- the foreigner's permanent residence ID card: the 2017 form (3-letter nationality code
  and 12 digits) and the 2023 form (18 characters starting with 9, with the MOD 11-2 check
  character; its inner layout is not published, so only that much is checked).

A number is normalised first: surrounding space dropped, full-width characters (as a
Chinese input method types them) made ASCII, letters upper-cased (a lower-case ``x`` check
character is accepted). Errors carry a rule code and its values, so a page can say them in
the reader's language, and an English message naming the wrong character or rule.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any

WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
"""ISO 7064 MOD 11-2 weights of the first 17 digits (2^(18-i) mod 11)."""
CHECK_CHARS = "10X98765432"
"""The check character for each remainder 0..10 of the weighted sum mod 11."""
PROVINCES = frozenset({
    "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36",
    "37", "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62",
    "63", "64", "65",
})
"""The first two digits of a mainland address code (GB/T 2260 provinces)."""
HMT_CODES = {"810000": "hk_resident_permit", "820000": "macao_resident_permit",
             "830000": "taiwan_resident_permit"}
MAX_INPUT = 64
"""Longer input is refused before any other work (it cannot be a permit number)."""
EARLIEST_BIRTH = date(1850, 1, 1)
"""The standard's own sample number is of a person born in 1880."""


class PermitKind(StrEnum):
    """The kind of document a valid number belongs to."""

    CITIZEN_ID = "citizen_id"
    HK_RESIDENT_PERMIT = "hk_resident_permit"
    MACAO_RESIDENT_PERMIT = "macao_resident_permit"
    TAIWAN_RESIDENT_PERMIT = "taiwan_resident_permit"
    FOREIGN_PERMANENT_2017 = "foreign_permanent_2017"
    FOREIGN_PERMANENT_2023 = "foreign_permanent_2023"


DESCRIPTIONS = {
    PermitKind.CITIZEN_ID: "resident identity card (GB 11643-1999)",
    PermitKind.HK_RESIDENT_PERMIT: "residence permit for Hong Kong residents",
    PermitKind.MACAO_RESIDENT_PERMIT: "residence permit for Macao residents",
    PermitKind.TAIWAN_RESIDENT_PERMIT: "residence permit for Taiwan residents",
    PermitKind.FOREIGN_PERMANENT_2017: "foreigner's permanent residence ID card (2017 form)",
    PermitKind.FOREIGN_PERMANENT_2023: "foreigner's permanent residence ID card (2023 form)",
}


class PermitError(ValueError):
    """A number that is no valid permit; ``rule`` names the rule, ``params`` its values,
    ``position`` the 1-based position of the wrong character when there is one."""

    def __init__(self, rule: str, message: str, *, position: int | None = None,
                 **params: Any) -> None:
        super().__init__(message)
        self.rule = rule
        self.position = position
        self.params: dict[str, Any] = params


@dataclass(frozen=True, slots=True)
class Permit:
    """A valid permit number, normalised, and what it is."""

    number: str
    kind: PermitKind
    birth_date: date | None = field(default=None)

    @property
    def description(self) -> str:
        """The kind of document in words."""
        return DESCRIPTIONS[self.kind]


def normalise(text: str) -> str:
    """Surrounding space dropped, full-width forms made ASCII (NFKC), upper case."""
    return unicodedata.normalize("NFKC", text).strip().upper()


def check_character(first17: str) -> str:
    """The MOD 11-2 check character of 17 digits."""
    total = sum(int(d) * w for d, w in zip(first17, WEIGHTS, strict=True))
    return CHECK_CHARS[total % 11]


def _digits(number: str, start: int, end: int, what: str) -> None:
    """Every character of ``number[start:end]`` is an ASCII digit, else a PermitError
    naming the first one that is not."""
    for i in range(start, end):
        if number[i] not in "0123456789":
            raise PermitError("not_a_digit", f"character {i + 1} ({number[i]!r}) must be a "
                              f"digit ({what})", position=i + 1, char=number[i], what=what)


def _eighteen(number: str, today: date) -> Permit:
    _digits(number, 0, 17, "the first 17 characters are digits")
    last = number[17]
    if last not in "0123456789X":
        raise PermitError("bad_check_character", f"character 18 ({last!r}) must be a digit "
                          "or X", position=18, char=last)
    expected = check_character(number[:17])
    if last != expected:
        raise PermitError("check_mismatch", f"the check character is {last!r} but the first "
                          f"17 digits give {expected!r}: a digit is mistyped", position=18,
                          found=last, expected=expected)
    if number[0] == "9":
        return Permit(number, PermitKind.FOREIGN_PERMANENT_2023)
    address = number[:6]
    birth = _birth_date(number[6:14], today)
    if address in HMT_CODES:
        return Permit(number, PermitKind(HMT_CODES[address]), birth)
    if address[:2] not in PROVINCES:
        raise PermitError("unknown_region", f"the address code {address} does not start "
                          "with a province code", position=1, code=address)
    return Permit(number, PermitKind.CITIZEN_ID, birth)


def _birth_date(text: str, today: date) -> date:
    try:
        birth = date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        raise PermitError("bad_birth_date", f"characters 7-14 ({text}) are not a date "
                          "(YYYYMMDD)", position=7, value=text) from None
    if not EARLIEST_BIRTH <= birth <= today:
        raise PermitError("birth_date_out_of_range", f"the birth date {birth.isoformat()} "
                          f"is not between {EARLIEST_BIRTH.isoformat()} and today",
                          position=7, value=text)
    return birth


def _fifteen(number: str) -> Permit:
    if number.isascii() and number.isdigit():
        raise PermitError("first_generation_id", "15 digits is a first-generation ID card "
                          "number, no longer valid: give the 18-character number")
    for i in range(3):
        if not ("A" <= number[i] <= "Z"):
            raise PermitError("not_a_letter", f"character {i + 1} ({number[i]!r}) must be a "
                              "letter (the nationality code)", position=i + 1,
                              char=number[i])
    _digits(number, 3, 15, "after the 3-letter nationality code come 12 digits")
    return Permit(number, PermitKind.FOREIGN_PERMANENT_2017)


def validate_permit(text: str, *, today: date | None = None) -> Permit:
    """The permit ``text`` is, or ``PermitError`` naming the rule it breaks."""
    if len(text) > MAX_INPUT:
        raise PermitError("bad_length", f"{len(text)} characters is far too long for a "
                          "permit number (18, or 15 for the 2017 foreigner's card)",
                          length=len(text))
    number = normalise(text)
    if not number:
        raise PermitError("empty", "no permit number given")
    if len(number) == 18:
        return _eighteen(number, today or date.today())
    if len(number) == 15:
        return _fifteen(number)
    raise PermitError("bad_length", f"{len(number)} characters: a permit number has 18 "
                      "(or 15 for the 2017 foreigner's card)", length=len(number))
