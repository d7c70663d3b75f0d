"""Everything the page says in words that is chosen in Python: messages for the rule codes
of refusals (protocol.permits, the agent's enrollment checks, accounts), tenant states,
door event kinds, installer checks.

Each function takes the request's ``_`` (gettext) so Babel's extractor finds every
message here; parameters are filled in after translation with ``str.format``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Gettext = Callable[[str], str]


def permit_message(_: Gettext, rule: str, params: Mapping[str, Any],
                   position: int | None = None) -> str | None:
    """A sentence for a permit-number rule; None for a rule this page does not know."""
    pos = position if position is not None else params.get("position")
    texts = {
        "empty": _("Enter the permit number."),
        "bad_length": _("{length} characters: a permit number has 18 (or 15 for the "
                        "2017 foreigner's permanent residence card)."),
        "not_a_digit": _("Character {position} must be a digit."),
        "bad_check_character": _("The last character must be a digit or X."),
        "check_mismatch": _("The check character does not match: a character is "
                            "mistyped. Compare the number with the card."),
        "unknown_region": _("The first 6 digits ({code}) are not a region code."),
        "bad_birth_date": _("Characters 7 to 14 ({value}) are not a date of birth."),
        "birth_date_out_of_range": _("The date of birth in the number ({value}) is not "
                                     "possible."),
        "first_generation_id": _("15 digits is an old first-generation ID number: enter "
                                 "the 18-character number."),
        "not_a_letter": _("Character {position} must be a letter (the nationality code)."),
    }
    text = texts.get(rule)
    if text is None:
        return None
    values = {k: v for k, v in params.items() if isinstance(v, str | int)}
    values.setdefault("position", pos if pos is not None else "?")
    try:
        return text.format(**values)
    except (KeyError, IndexError, ValueError):
        return text


def enroll_message(_: Gettext, field: str, rule: str, params: Mapping[str, Any],
                   fallback: str = "") -> str:
    """A sentence for a refused enrollment field (the agent's rule codes)."""
    if field == "permit":
        text = permit_message(_, rule, params)
        if text is not None:
            return text
    texts = {
        "unknown_unit": _("Choose a unit from the list."),
        "missing_unit": _("Choose a unit from the list."),
        "missing_lease_end": _("Enter the date the lease ends."),
        "bad_date": _("Enter the date the lease ends."),
        "lease_end_past": _("The lease must end after today."),
        "lease_end_too_far": _("The lease end is more than {max_days} days away."),
        "card_enrolled": _("This card already belongs to an enrolled tenant: move that "
                           "tenant out first, or use another card."),
        "card_revoked": _("This card is revoked: the office must lift the revocation "
                          "first. Use another card."),
        "no_seal_key": _("The gateway cannot send permit numbers to the office yet (its "
                         "key is not installed). Call the installer."),
        "capture_gone": _("The tapped card is no longer held: tap the card again."),
        "no_capture": _("The tapped card is no longer held: tap the card again."),
        "disabled": _("Enrollment is not switched on for this gateway. Call the "
                      "installer."),
        "agent_unavailable": _("The door controller does not answer. Try again in a "
                               "minute; if it goes on, call the installer."),
    }
    text = texts.get(rule)
    if text is None:
        return fallback or _("The gateway refused this: {rule}").format(rule=rule)
    try:
        return text.format(**{k: v for k, v in params.items() if isinstance(v, str | int)})
    except (KeyError, IndexError, ValueError):
        return text


def account_message(_: Gettext, rule: str, **params: Any) -> str:
    """A sentence for a refused sign-in, sign-up or account change."""
    texts = {
        "bad_credentials": _("Wrong name or password."),
        "backoff": _("Too many wrong attempts. Wait {seconds} seconds, then try again."),
        "bad_code": _("This code is wrong or has expired. Ask for a new one: "
                      "permitgate-web users init"),
        "bad_name": _("A name is 2 to 32 letters a-z, digits, '.', '_' or '-'."),
        "name_taken": _("This name is taken: choose another."),
        "short_password": _("The password needs at least {min} characters."),
        "long_password": _("The password is too long."),
        "name_as_password": _("The password must not be the name."),
        "password_mismatch": _("The two passwords are not the same."),
        "session_ended": _("Your session ended: sign in again."),
        "form_expired": _("The form expired: please try again."),
    }
    text = texts.get(rule, rule)
    try:
        return text.format(**params)
    except (KeyError, IndexError, ValueError):
        return text


def state_label(_: Gettext, state: str) -> str:
    """A tenant's state in words."""
    return {
        "pending": _("Waiting for the office"),
        "confirmed": _("Confirmed"),
        "rejected": _("Rejected by the office"),
        "ended": _("Ended"),
    }.get(state, state)


def card_label(_: Gettext, card: str | None) -> str:
    """What the gateway knows of a tapped card."""
    return {
        "new": _("New card"),
        "listed": _("The office already knows this card."),
        "enrolled": _("This card already belongs to an enrolled tenant."),
        "revoked": _("This card is revoked."),
    }.get(card or "", "")


def event_label(_: Gettext, kind: str) -> str:
    """A door alarm or fault in words."""
    return {
        "door_forced": _("Door forced open"),
        "door_held_open": _("Door held open too long"),
        "relay_fault": _("Lock relay fault"),
        "contact_fault": _("Door contact fault"),
        "rex_fault": _("Exit button fault"),
        "reader_offline": _("Card reader offline"),
        "reader_tamper": _("Card reader tampered with"),
        "reader_power": _("Card reader power failure"),
        "sync_stale": _("No contact with the office"),
    }.get(kind, kind.replace("_", " "))


def check_label(_: Gettext, status: str) -> str:
    """A doctor check's status in words."""
    return {"ok": _("OK"), "warn": _("Look at this"), "fail": _("Failing"),
            "skip": _("Not checked")}.get(status, status)


def permit_kind_label(_: Gettext, kind: str) -> str:
    """The document a valid permit number belongs to."""
    return {
        "citizen_id": _("Resident identity card"),
        "hk_resident_permit": _("Residence permit for Hong Kong residents"),
        "macao_resident_permit": _("Residence permit for Macao residents"),
        "taiwan_resident_permit": _("Residence permit for Taiwan residents"),
        "foreign_permanent_2017": _("Foreigner's permanent residence ID card (2017)"),
        "foreign_permanent_2023": _("Foreigner's permanent residence ID card (2023)"),
    }.get(kind, kind)
