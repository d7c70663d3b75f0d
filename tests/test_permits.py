"""Permit numbers: published samples, each rule's message, and properties of the check."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.permits import (
    PROVINCES,
    PermitError,
    PermitKind,
    check_character,
    validate_permit,
)

TODAY = date(2026, 11, 30)


def _with_check(first17: str) -> str:
    return first17 + check_character(first17)


@pytest.mark.parametrize(("number", "kind"), [
    ("11010519491231002X", PermitKind.CITIZEN_ID),          # GB 11643-1999's sample
    ("440524188001010014", PermitKind.CITIZEN_ID),          # GB 11643-1999's sample
    ("810000199408230021", PermitKind.HK_RESIDENT_PERMIT),  # published sample
    ("830000199201300022", PermitKind.TAIWAN_RESIDENT_PERMIT),  # published sample
    ("USA110077080101", PermitKind.FOREIGN_PERMANENT_2017),
])
def test_published_samples_are_valid(number: str, kind: PermitKind) -> None:
    """Published sample numbers validate as the document they are."""
    assert validate_permit(number, today=TODAY).kind is kind


def test_lower_case_and_full_width_input_is_normalised() -> None:
    """A lower-case x and full-width digits (as a Chinese input method types them) are
    accepted and normalised to ASCII upper case."""
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "11010519491231002")
    permit = validate_permit(f" {full_width}x ", today=TODAY)
    assert permit.number == "11010519491231002X"
    assert permit.birth_date == date(1949, 12, 31)


@pytest.mark.parametrize(("number", "rule", "position", "words"), [
    ("11010519491231002Y", "bad_check_character", 18, "character 18 ('Y')"),
    ("110105194912310021", "check_mismatch", 18, "give 'X'"),
    ("1101051949123A002X", "not_a_digit", 14, "character 14 ('A')"),
    (_with_check("11010519491331002"), "bad_birth_date", 7, "19491331"),
    (_with_check("99010519491231002"), None, None, None),  # 9: the 2023 foreigner's card
    ("11010519491231002", "bad_length", None, "17 characters"),
    ("", "empty", None, "no permit"),
    ("110105194912310", "first_generation_id", None, "first-generation"),
    ("US1110077080101", "not_a_letter", 3, "character 3 ('1')"),
    ("USA11007708010A", "not_a_digit", 15, "character 15 ('A')"),
    ("X" * 65, "bad_length", None, "far too long"),
])
def test_each_rule_names_what_is_wrong(number: str, rule: str | None, position: int | None,
                                       words: str | None) -> None:
    """A wrong number fails with the rule it breaks, the position of the wrong character
    and a message that names it; a valid one of another kind passes."""
    if rule is None:
        assert validate_permit(number, today=TODAY).kind is PermitKind.FOREIGN_PERMANENT_2023
        return
    with pytest.raises(PermitError) as caught:
        validate_permit(number, today=TODAY)
    assert caught.value.rule == rule
    assert caught.value.position == position
    assert words is not None and words in str(caught.value)


@st.composite
def citizen_numbers(draw: st.DrawFn) -> str:
    """Valid 18-character citizen numbers."""
    province = draw(st.sampled_from(sorted(PROVINCES)))
    rest = draw(st.text("0123456789", min_size=4, max_size=4))
    born = draw(st.dates(date(1900, 1, 1), TODAY))
    seq = draw(st.text("0123456789", min_size=3, max_size=3))
    return _with_check(province + rest + born.strftime("%Y%m%d") + seq)


@given(citizen_numbers())
def test_generated_numbers_validate(number: str) -> None:
    """Every number built by the standard's rules validates as a citizen number."""
    assert validate_permit(number, today=TODAY).kind is PermitKind.CITIZEN_ID


@given(citizen_numbers(), st.integers(0, 16), st.integers(1, 9))
def test_any_single_digit_error_is_caught(number: str, index: int, shift: int) -> None:
    """MOD 11-2 catches every single mistyped digit among the first 17."""
    wrong = str((int(number[index]) + shift) % 10)
    typo = number[:index] + wrong + number[index + 1:]
    with pytest.raises(PermitError):
        validate_permit(typo, today=TODAY)


@given(citizen_numbers(), st.integers(0, 15))
def test_any_adjacent_transposition_is_caught(number: str, index: int) -> None:
    """MOD 11-2 catches every swap of two different adjacent digits among the first 17."""
    a, b = number[index], number[index + 1]
    if a == b:
        return
    swapped = number[:index] + b + a + number[index + 2:]
    with pytest.raises(PermitError):
        validate_permit(swapped, today=TODAY)


def test_future_birth_date_is_refused() -> None:
    """A birth date after today is refused as out of range."""
    tomorrow = (TODAY + timedelta(days=1)).strftime("%Y%m%d")
    with pytest.raises(PermitError) as caught:
        validate_permit(_with_check("110105" + tomorrow + "002"), today=TODAY)
    assert caught.value.rule == "birth_date_out_of_range"


def test_unknown_province_is_refused() -> None:
    """An address code that starts with no province code is refused naming it."""
    with pytest.raises(PermitError, match="address code 080105 does not start"):
        validate_permit(_with_check("08010519491231002"), today=TODAY)


@given(st.text(max_size=40))
def test_validator_never_raises_anything_else(text: str) -> None:
    """Any text either validates or raises PermitError with a rule: nothing else."""
    try:
        validate_permit(text, today=TODAY)
    except PermitError as exc:
        assert exc.rule
