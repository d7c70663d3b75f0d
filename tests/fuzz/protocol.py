"""Fuzz targets of the protocol package: signed envelopes, central message bodies and
snapshot chunks (what the gateway takes from the broker), gateway messages (what the
office takes), permit numbers (what a landlord types) and sealed permit numbers (what the
office unseals).

Keys are fixed (derived from constant bytes) so that every input replays the same way.
"""

from __future__ import annotations

import base64
import contextlib
import json
from datetime import date
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from protocol.messages import (
    GATEWAY_MESSAGES,
    MAX_MESSAGE_BYTES,
    Chunk,
    Entry,
    RefusedError,
    Revoked,
    parse_central,
    parse_chunk,
)
from protocol.permits import (
    Permit,
    PermitError,
    PermitKind,
    check_character,
    validate_permit,
)
from protocol.sealing import MAX_SEALED, SealError, seal, unseal
from protocol.signing import Envelope, open_envelope, signing_input, unb64
from protocol.topics import Topics
from tests.fuzz.common import Cursor, Target
from tests.fuzz.strategies import BOUNDARY_INTS, edited, mutate_json

GW = "gw-1"
KID = "office-1"
OFFICE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
TRUSTED = {KID: OFFICE_KEY.public_key()}
TOPICS = Topics(GW)
TOPIC_CHOICES = [TOPICS.inbound(k) for k in ("list", "rev", "cmd", "ack", "hb", "enr")] + [
    TOPICS.broadcast_revocations, Topics("gw-2").inbound("rev"), TOPICS.inbound("keys"),
    TOPICS.inbound("site")]
NOW = 1_798_761_600
"""2027-01-01 00:00:00 UTC: the clock of every fuzzed gateway."""
HASH = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
"""A valid base64 hash (bytes 0..31)."""

ENVELOPE_REASONS = {"oversized", "malformed", "unknown_key", "bad_signature"}


def envelope(data: bytes) -> None:
    """Any payload on any central topic opens to the exact body the office signed for
    that topic, or is refused with a documented reason."""
    cur = Cursor(data)
    topic = TOPIC_CHOICES[cur.byte() % len(TOPIC_CHOICES)]
    payload = cur.rest()
    try:
        body = open_envelope(payload, topic, TRUSTED, MAX_MESSAGE_BYTES)
    except RefusedError as exc:
        assert exc.reason in ENVELOPE_REASONS, exc
        return
    # Independently of open_envelope: the signature in the payload verifies for this
    # topic and the returned body under the trusted key.
    raw = json.loads(payload)
    assert raw["body"] == body and raw["kid"] == KID
    OFFICE_KEY.public_key().verify(base64.b64decode(raw["sig"]), signing_input(topic, body))


def _round_trip(model: BaseModel) -> None:
    """What a side sends or stores of a parsed message (its JSON) parses back, and to the
    same JSON: the serialisation is stable. (Not the same model: JSON has no infinity,
    so a free-form ``1e999`` is stored as null, which is harmless.)"""
    text = model.model_dump_json()
    assert type(model).model_validate_json(text).model_dump_json() == text


def central(data: bytes) -> None:
    """Any verified body text parses to a central message that survives the office's own
    serialisation, or is refused as ``malformed``."""
    text = data.decode("utf-8", "replace")
    try:
        message = parse_central(text)
    except RefusedError as exc:
        assert exc.reason == "malformed", exc
        return
    text = message.model_dump_json()
    assert parse_central(text) == message, text  # central bodies hold no free-form values


def chunk(data: bytes) -> None:
    """Any chunk payload parses to a chunk whose hashes all decode to 32 bytes, or is
    refused as ``malformed`` or ``oversized``."""
    try:
        parsed = parse_chunk(data, 64 * 1024)
    except RefusedError as exc:
        assert exc.reason in {"malformed", "oversized"}, exc
        return
    _round_trip(parsed)
    for entry in parsed.entries:
        assert len(unb64(entry.cred)) == 32
        if entry.permit is not None:
            assert len(unb64(entry.permit)) == 32
    for revoked in parsed.revoked:
        assert len(unb64(revoked.hash)) == 32


GATEWAY_KINDS = sorted(GATEWAY_MESSAGES)


def gateway_message(data: bytes) -> None:
    """Any payload of any gateway topic kind validates to its model (which survives a
    re-serialisation) or raises ValidationError."""
    cur = Cursor(data)
    model = GATEWAY_MESSAGES[GATEWAY_KINDS[cur.byte() % len(GATEWAY_KINDS)]]
    try:
        body = model.model_validate_json(cur.rest())
    except ValidationError:
        return
    _round_trip(body)


# -- permit numbers ---------------------------------------------------------------------------

TODAY = date(2027, 1, 1)
PERMIT_RULES = {"bad_length", "empty", "not_a_digit", "bad_check_character", "check_mismatch",
                "unknown_region", "bad_birth_date", "birth_date_out_of_range",
                "first_generation_id", "not_a_letter"}


def permit(data: bytes) -> None:
    """Any typed text is a permit whose number is its own normal form (validating it again
    gives the same permit), or a PermitError naming a known rule and a position inside
    the number."""
    text = data.decode("utf-8", "replace")
    try:
        got = validate_permit(text, today=TODAY)
    except PermitError as exc:
        assert exc.rule in PERMIT_RULES, exc.rule
        assert exc.position is None or 1 <= exc.position <= 18, exc.position
        assert str(exc)
        return
    assert isinstance(got, Permit) and isinstance(got.kind, PermitKind)
    assert len(got.number) in (15, 18) and got.number.isascii()
    assert validate_permit(got.number, today=TODAY) == got


# -- sealed permit numbers -------------------------------------------------------------------

SEAL_KEY = X25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
ENROLLMENT = "0190f5c2-7b1e-7a3c-8f00-000000000001"


def sealed(data: bytes) -> None:
    """A sealed number, as sent or with bytes changed, opens to exactly what was sealed
    for this gateway and enrollment, or raises SealError; any text at all does one or
    the other, and a seal never opens for another enrollment."""
    cur = Cursor(data)
    mode = cur.byte()
    if mode & 1:  # arbitrary text where the sealed number goes
        text = cur.rest().decode("utf-8", "replace")
        with contextlib.suppress(SealError):
            unseal(SEAL_KEY, text, gateway=GW, enrollment_id=ENROLLMENT)
        return
    number = cur.take(cur.byte() % 65).decode("utf-8", "replace")[:64]
    text = seal(SEAL_KEY.public_key(), number, gateway=GW, enrollment_id=ENROLLMENT)
    assert len(text) <= MAX_SEALED or len(number.encode()) > 64
    chars = list(text)
    while cur.remaining:  # edits: (position, new character)
        position = cur.u16() % max(len(chars), 1)
        new = chr(cur.byte())
        if chars:
            chars[position] = new
    edited = "".join(chars)
    try:
        opened = unseal(SEAL_KEY, edited, gateway=GW, enrollment_id=ENROLLMENT)
    except SealError:
        opened = None
    assert opened is None or opened == number, (opened, number)
    try:
        unseal(SEAL_KEY, text, gateway=GW, enrollment_id=ENROLLMENT[:-1] + "2")
    except SealError:
        pass
    else:
        raise AssertionError("a seal opened for another enrollment")


# -- seeds -------------------------------------------------------------------------------


def header(seq: int = 1, **extra: Any) -> dict[str, Any]:
    """Header fields issued now for this gateway."""
    return {"gateway": GW, "seq": seq, "issued_at": NOW, "expires_at": NOW + 3600, **extra}


BODIES: list[dict[str, Any]] = [
    {"type": "snapshot", "entries": 1, "revoked": 0, "chunk_sha256": ["0" * 64],
     "rev_seq": 0, "all_seq": 0, **header()},
    {"type": "delta", "base": 1, "upsert": [[HASH, HASH, 0, NOW + 86400, ["front"], None,
                                             NOW]], "remove": [HASH], **header(2)},
    {"type": "revocation", "items": [{"kind": "credential", "hash": HASH}], **header()},
    {"type": "command", "action": "lockdown", **header()},
    {"type": "heartbeat", "list_version": 1, "rev_seq": 0, "all_seq": 0, **header()},
    {"type": "event_ack", "upto": 5, **header()},
    {"type": "enrollment_decision", "items": [
        {"enrollment": ENROLLMENT, "status": "confirmed", "list_version": 2}], **header()},
    {"type": "keys", "keys": [{"kid": KID, "public_key": HASH, "state": "active"}],
     **header()},
    {"type": "site_key", "generation": 2, "sealed": HASH, "previous": "honoured", **header()},
]
"""One valid body of every central message type."""


def sign_text(key: Ed25519PrivateKey, topic: str, text: str, kid: str = KID) -> bytes:
    """The wire payload of body ``text`` signed for ``topic`` (``protocol.signing.sign``
    for a body that is already text, possibly not a valid message)."""
    sig = key.sign(signing_input(topic, text))
    return Envelope(kid=kid, sig=base64.b64encode(sig).decode(), body=text
                    ).model_dump_json().encode()


def _signed(topic_index: int, body: dict[str, Any]) -> bytes:
    return sign_text(OFFICE_KEY, TOPIC_CHOICES[topic_index], json.dumps(body))


def fullwidth(text: str) -> str:
    """``text`` as a Chinese input method types it: ASCII letters and digits full-width."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in text)


def _envelope_seeds() -> list[bytes]:
    return [bytes([1]) + _signed(1, BODIES[2]), bytes([2]) + _signed(2, BODIES[3]),
            bytes([0]) + _signed(1, BODIES[2])]


def chunk_seed() -> bytes:
    """A valid chunk (one entry, one permit revocation) as the office sends it."""
    return Chunk(type="chunk", version=1, index=0,
                 entries=[Entry(cred=HASH, doors=("front",))],
                 revoked=[Revoked(kind="permit", hash=HASH)]).model_dump_json().encode()


def _gateway_seeds() -> list[bytes]:
    applied = {"type": "applied", "gateway": GW, "stream": "list", "seq": 1,
               "status": "applied", "list_version": 1, "ts_ms": NOW * 1000}
    status = {"type": "status", "gateway": GW, "state": "online", "versions": {"list": 1}}
    resync = {"type": "resync", "gateway": GW, "reason": "gap", "list_version": 1,
              "rev_seq": 0, "all_seq": 0, "ts_ms": NOW * 1000}
    return [bytes([GATEWAY_KINDS.index(k)]) + json.dumps(b).encode()
            for k, b in (("applied", applied), ("status", status), ("request", resync))]


# -- structure-aware inputs ------------------------------------------------------------------


TIMES = st.one_of(st.none(), st.integers(NOW - 10**6, NOW + 10**6), BOUNDARY_INTS)
HASHES = st.one_of(st.just(HASH), st.binary(min_size=32, max_size=32).map(
    lambda b: base64.b64encode(b).decode()))


def entries() -> st.SearchStrategy[list[Any]]:
    """Allowlist entries as they travel (7-element arrays) with well-typed values of any
    size: times out to the integer edges, door lists, schedules."""
    doors = st.one_of(st.none(), st.lists(st.sampled_from(["front", "back", "a,b", ""]),
                                          max_size=3))
    schedule = st.one_of(st.none(), st.sampled_from(["always", "day", "Night"]))
    return st.tuples(HASHES, st.one_of(st.none(), HASHES), TIMES, TIMES, doors, schedule,
                     TIMES).map(list)


def bodies() -> st.SearchStrategy[Any]:
    """A central body of each type, with values replaced, keys dropped or added."""
    return st.sampled_from(BODIES).flatmap(mutate_json)


@st.composite
def _envelopes(draw: st.DrawFn) -> bytes:
    index = draw(st.integers(0, len(TOPIC_CHOICES) - 1))
    signed_for = draw(st.one_of(st.just(index), st.integers(0, len(TOPIC_CHOICES) - 1)))
    payload = sign_text(draw(st.sampled_from([OFFICE_KEY, OFFICE_KEY, OTHER_KEY])),
                        TOPIC_CHOICES[signed_for], json.dumps(draw(bodies())))
    how = draw(st.sampled_from(["as_is", "bytes", "fields"]))
    if how == "bytes":
        payload = draw(edited(payload))
    elif how == "fields":
        payload = json.dumps(draw(mutate_json(json.loads(payload)))).encode()
    return bytes([index]) + payload


def _chunk_structured() -> st.SearchStrategy[bytes]:
    template = json.loads(chunk_seed())
    return mutate_json(template).map(lambda d: json.dumps(d).encode())


def _gateway_structured() -> st.SearchStrategy[bytes]:
    return st.sampled_from(_gateway_seeds()).flatmap(
        lambda seed: mutate_json(json.loads(seed[1:])).map(
            lambda d: seed[:1] + json.dumps(d).encode()))


@st.composite
def permit_texts(draw: st.DrawFn) -> bytes:
    """Valid citizen and permit numbers, then typed badly: a character changed, blanks,
    full-width forms, a lower-case x."""
    address = draw(st.sampled_from(["110105", "810000", "830000", "440300", "990000",
                                    "910000"]))
    birth = draw(st.dates(min_value=date(1840, 1, 1), max_value=date(2030, 1, 1)))
    first17 = address + birth.strftime("%Y%m%d") + f"{draw(st.integers(0, 999)):03d}"
    number = first17 + check_character(first17)
    if draw(st.booleans()):
        nationality = draw(st.sampled_from(["ABC", "XYZ", "CHN"]))
        number = nationality + f"{draw(st.integers(0, 10**12 - 1)):012d}"
    chars = list(number)
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.integers(0, len(chars) - 1))
        chars[where] = draw(st.sampled_from(["0", "9", "X", "x", "O", "\uff11", "\uff38", " ",
                                             "\u00a0", "\u00df", "\ufb03", "\x00"]))
    text = "".join(chars)
    text = draw(st.sampled_from(["", " ", "\t", "\u3000"])) + text + draw(
        st.sampled_from(["", " ", "\n"]))
    return text.encode("utf-8")


@st.composite
def _sealed_structured(draw: st.DrawFn) -> bytes:
    number = draw(st.text(max_size=30)).encode("utf-8")[:64]
    edits = draw(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3))
    return (bytes([0, len(number)]) + number
            + b"".join(p.to_bytes(2, "big") + bytes([c]) for p, c in edits))


TARGETS: list[Target] = [
    Target("envelope", envelope, 8192, "signing.open_envelope", _envelope_seeds, _envelopes),
    Target("central", central, 8192, "messages.parse_central",
           lambda: [json.dumps(b).encode() for b in BODIES],
           lambda: bodies().map(lambda b: json.dumps(b).encode())),
    Target("chunk", chunk, 8192, "messages.parse_chunk", lambda: [chunk_seed()],
           _chunk_structured),
    Target("gateway_message", gateway_message, 8192, "messages.GATEWAY_MESSAGES models",
           _gateway_seeds, _gateway_structured),
    Target("permit", permit, 256, "permits.validate_permit",
           lambda: [b"11010519491231002X", fullwidth("ABC123456789012").encode(),
                    b"810000199001011234", b"110105491231002"], permit_texts),
    Target("sealed", sealed, 512, "sealing.unseal",
           lambda: [bytes([0, 18]) + b"11010519491231002X", bytes([0, 18]) + b"11010519491231002X"
                    + bytes([0, 5, ord("A")]), bytes([1]) + b"AAAA"], _sealed_structured),
]
