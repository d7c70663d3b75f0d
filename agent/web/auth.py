"""Passwords, one-time sign-up codes, account names and sign-in back-off.

Passwords are hashed with argon2id at m=19 MiB, t=2, p=1 (the OWASP minimum; about 90 ms
on the build machine, argon2-cffi's own defaults of 64 MiB and p=4 are too heavy for a
Pi with several sign-ins at once). The hash runs in a worker thread, one at a time
(``HASH_SLOTS``): each takes 19 MiB while it runs, and the page's memory budget is 45 MB.
An unknown account name is checked against a dummy hash, so its answer takes as long as
a wrong password's.

Back-off (``Backoff``): failures are counted per account and per client address; after
``FREE_FAILURES`` the next attempt must wait ``2^(n - FREE_FAILURES)`` seconds, capped
(``ACCOUNT_CAP_S``, ``ADDRESS_CAP_S``); a count is forgotten after an hour without failure
and on success. No count locks anyone out for good: a neighbour who guesses at the
landlord's name delays the landlord by at most a minute at a time. Attempts refused for
back-off are not counted and check no password.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ROLES = ("landlord", "installer")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,31}")
"""Account names: 2-32 of lower-case ASCII letters, digits, ``.``, ``_``, ``-``. They
appear in the agent's event log as the author of each change."""
MIN_PASSWORD = 10
MAX_PASSWORD = 256
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""Crockford's base 32: no I, L, O, U, so a code read aloud or copied by hand survives."""
CODE_CHARS = 12
"""60 bits: with the address back-off and 15 minutes of life, beyond guessing."""
CODE_VALID_S = 15 * 60
FREE_FAILURES = 3
ACCOUNT_CAP_S = 60
ADDRESS_CAP_S = 300
FORGET_AFTER_S = 3600
HASH_SLOTS = 1

_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32,
                         salt_len=16, type=Type.ID)


class InputError(ValueError):
    """A name, password or code that cannot be used; ``rule`` names why."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (blocks about 90 ms)."""
    return _HASHER.hash(password)


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _HASHER.hash(secrets.token_urlsafe(16))


def verify_password(pw_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches ``pw_hash``; with no hash (an unknown account) the
    same work is done against a dummy, and the answer is False."""
    try:
        ok = _HASHER.verify(pw_hash or _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return ok and pw_hash is not None


def normalise_name(name: str) -> str:
    """An account name as stored: NFKC (full-width letters typed by a Chinese input method
    become ASCII), trimmed, lower case."""
    return unicodedata.normalize("NFKC", name).strip().lower()


def check_name(name: str) -> str:
    """The normalised name, or ``InputError``."""
    norm = normalise_name(name)
    if not NAME_RE.fullmatch(norm):
        raise InputError("bad_name", "a name is 2 to 32 letters a-z, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return norm


def check_password(password: str, name: str) -> str:
    """The password, or ``InputError`` when it is too short, too long or the name."""
    if len(password) < MIN_PASSWORD:
        raise InputError("short_password", f"a password has at least {MIN_PASSWORD} "
                         "characters")
    if len(password) > MAX_PASSWORD:
        raise InputError("long_password", f"a password has at most {MAX_PASSWORD} characters")
    if normalise_name(password) == name:
        raise InputError("name_as_password", "the password must not be the account name")
    return password


def new_setup_code() -> str:
    """A fresh one-time code, shown grouped as ``XXXX-XXXX-XXXX``."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_CHARS))
    return "-".join(raw[i:i + 4] for i in range(0, CODE_CHARS, 4))


def normalise_code(code: str) -> str:
    """A typed code as stored: upper case, no spaces or dashes, O as 0 and I, L as 1."""
    text = unicodedata.normalize("NFKC", code).upper()
    text = re.sub(r"[\s-]", "", text)[:64]
    return text.translate(str.maketrans("OIL", "011"))


@dataclass(frozen=True, slots=True)
class Backoff:
    """The back-off rule for one kind of key."""

    cap_s: int
    free: int = FREE_FAILURES
    forget_after_s: int = FORGET_AFTER_S

    def live_failures(self, failures: int, last_ms: int, now_ms: int) -> int:
        """Failures still counted at ``now_ms``."""
        return 0 if now_ms - last_ms >= self.forget_after_s * 1000 else failures

    def delay_s(self, failures: int) -> int:
        """The wait after ``failures`` failures in a row."""
        if failures < self.free:
            return 0
        return min(self.cap_s, 1 << min(failures - self.free, 20))

    def wait_s(self, failures: int, last_ms: int, now_ms: int) -> float:
        """Seconds still to wait before the next attempt (0: go ahead)."""
        live = self.live_failures(failures, last_ms, now_ms)
        return max(0.0, self.delay_s(live) - (now_ms - last_ms) / 1000)


ACCOUNT_BACKOFF = Backoff(cap_s=ACCOUNT_CAP_S)
ADDRESS_BACKOFF = Backoff(cap_s=ADDRESS_CAP_S)
