"""Identifier patterns both sides check: gateway and site ids, key ids, card ids, hashes."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

IDENT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
"""Gateway, site, door and schedule ids: lower case, digits, ``-`` and ``_``, 1 to 63 long."""
KEY_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
"""The id of a signing key as an envelope names it."""
CARD_PATTERN = r"^([a-z0-9][a-z0-9_-]{0,31}):(\S{1,128})$"
"""A normalised card id: ``<technology>:<number>``, e.g. ``em4100:67003B51C6``."""

IDENT_RE = re.compile(IDENT_PATTERN)
KEY_ID_RE = re.compile(KEY_ID_PATTERN)
CARD_RE = re.compile(CARD_PATTERN)

Ident = Annotated[str, Field(pattern=IDENT_PATTERN)]
KeyId = Annotated[str, Field(pattern=KEY_ID_PATTERN)]
B64Hash = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]
"""A 32-byte hash in standard base64 (44 characters with padding)."""
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A SHA-256 digest in lower-case hex."""


EM4100_RE = re.compile(r"^[0-9A-F]{10}$")


def check_ident(value: str, what: str) -> str:
    """``value`` if it is a protocol identifier; ``ValueError`` naming ``what`` otherwise."""
    if not IDENT_RE.match(value):
        raise ValueError(f"{what} {value!r}: use 1-63 lower-case letters, digits, "
                         "'_' or '-', starting with a letter or digit")
    return value


def normalise_card_id(text: str) -> str:
    """A card id as the gateway's readers report it: ``kind:id``; EM4100 ids are 10
    upper-case hex digits. ``ValueError`` otherwise."""
    match = CARD_RE.match(text.strip())
    if not match:
        raise ValueError("expected a normalised card id such as em4100:67003B51C6 "
                         "(kind, colon, id)")
    kind, ident = match.groups()
    if kind == "em4100":
        ident = ident.upper()
        if not EM4100_RE.match(ident):
            raise ValueError("an em4100 id is 10 hex digits")
    return f"{kind}:{ident}"
