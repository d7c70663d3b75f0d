"""The message models of protocol v1 (pydantic) and their parsing.

Central → gateway: ``Snapshot`` (+ ``Chunk``), ``Delta``, ``Revocation``, ``Command``,
``Heartbeat``, ``EventAck``, ``EnrollmentDecision``, ``KeyAnnouncement``, ``SiteKey``, each
inside a signed envelope (``protocol.signing``) except chunks, which their manifest's
SHA-256 list covers. Gateway → central: ``EventBatch``, ``Applied``, ``ResyncRequest``,
``Status``, ``Rekey``.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from protocol.ids import B64Hash, Hex64, Ident, KeyId

MAX_CLOCK_SKEW_S = 300
"""A message issued further in the future than this is refused (a wrong clock or a
forged issue time)."""
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""The default of the gateway's ``sync.max_message_bytes`` and the shipped broker's
``message_size_limit`` (config/mosquitto/permitgate.conf): the largest payload either side
sends or accepts. A payload above the broker's limit is never forwarded, so a gateway limit
above it would only be a promise nobody can use."""
MAX_ITEMS = 40_000
"""The most entries a delta ``upsert``, hashes a delta ``remove``, or items a revocation may
carry. Sized so that a revocation of this many items (about 84 bytes each, enveloped) fits
``MAX_MESSAGE_BYTES`` with room to spare: 3.4 MB, against 8.4 MB at the former 100,000
(tests/test_sync_limits.py). Entries vary in size (door lists), so a delta's count alone
does not guarantee that; the office keeps every message under the limit in bytes."""
MAX_CHUNKS = 10_000
"""The most chunks one snapshot manifest may list: its manifest is then at most 0.7 MB
(69 bytes a chunk, enveloped; 6.9 MB at the former 100,000). 10,000 chunks of the reference
office's 10,000 entries hold 100 million entries."""


MAX_INT = 2**53
"""The largest integer any field may carry: exact in JSON everywhere (IEEE doubles) and
far inside SQLite's 64-bit integers (a value of 2**63 made SQLite raise OverflowError;
found by fuzzing, tests/fuzz_corpus)."""
Num = Annotated[int, Field(ge=0, le=MAX_INT)]
"""A count, sequence number, version or Unix time."""


class RefusedError(Exception):
    """A message was refused; ``reason`` is a short code (docs/protocol.md, "Refusals")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def first_error(exc: ValidationError) -> str:
    """The first problem of a validation error as ``field.path: message (N problem(s))``."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "<message>"
    return f"{where}: {err['msg']} ({exc.error_count()} problem(s))"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Header(_Body):
    """Fields every signed central message carries."""

    gateway: Ident | Literal["*"]
    """The target gateway, or ``*`` on the broadcast topic."""
    seq: int = Field(ge=1, le=MAX_INT)
    """Monotonic per stream; for ``snapshot`` and ``delta`` it is the list version."""
    issued_at: int = Field(ge=0, le=MAX_INT)
    expires_at: int = Field(ge=0, le=MAX_INT)
    """Unix seconds; a message is refused once ``expires_at`` has passed."""


EntryArray = tuple[B64Hash, B64Hash | None, Num | None, Num | None, list[Ident] | None,
                   Ident | None, Num | None]
"""How an ``Entry`` travels: a 7-element JSON array, in the order of ``ENTRY_FIELDS``
(an array, not an object, keeps a million-entry snapshot about half the size)."""
ENTRY_FIELDS = ("cred", "permit", "valid_from", "valid_until", "doors", "schedule",
                "confirmed_at")
_ENTRY_ARRAY = TypeAdapter(EntryArray)


class Entry(_Body):
    """One allowlist entry (travels as a 7-element array: ``EntryArray``)."""

    cred: B64Hash
    """The card's keyed hash under the site key."""
    permit: B64Hash | None = None
    """The permit's keyed hash under the office's permit key."""
    valid_from: Num | None = None
    """Unix s, inclusive; None = unbounded."""
    valid_until: Num | None = None
    """Unix s, exclusive; None = unbounded."""
    doors: tuple[Ident, ...] | None = None
    """None = every door."""
    schedule: Ident | None = None
    """None = ``always``."""
    confirmed_at: Num | None = None
    """When the office last confirmed the permit with the registry, Unix s."""

    @model_validator(mode="before")
    @classmethod
    def _from_array(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list | tuple):
            items = list(value)
            if len(items) == len(ENTRY_FIELDS) and isinstance(items[4], tuple):
                items[4] = list(items[4])
            checked = _ENTRY_ARRAY.validate_python(tuple(items), strict=True)
            fields: dict[str, Any] = dict(zip(ENTRY_FIELDS, checked, strict=True))
            if fields["doors"] is not None:
                fields["doors"] = tuple(fields["doors"])
            return fields
        if info.mode == "json":
            raise ValueError("an allowlist entry is a 7-element array")
        return value

    @model_serializer(mode="plain")
    def _to_array(self) -> list[Any]:
        return [self.cred, self.permit, self.valid_from, self.valid_until,
                None if self.doors is None else list(self.doors), self.schedule,
                self.confirmed_at]

    @classmethod
    def __get_pydantic_json_schema__(cls, _core: CoreSchema, handler: GetJsonSchemaHandler
                                     ) -> JsonSchemaValue:
        schema = dict(_ENTRY_ARRAY.json_schema())
        schema["description"] = ("One allowlist entry: " + ", ".join(ENTRY_FIELDS)
                                 + " (docs/protocol.md, \"Allowlist entries\").")
        return schema


class Revoked(_Body):
    """One revocation: a credential hash, or a permit hash that stops every card of it."""

    kind: Literal["credential", "permit"]
    hash: B64Hash


class Snapshot(Header):
    """The signed manifest of a whole allowlist; ``chunks`` ``Chunk`` messages follow on
    the same topic, in order."""

    type: Literal["snapshot"]
    entries: int = Field(ge=0, le=MAX_INT)
    revoked: int = Field(ge=0, le=MAX_INT)
    chunk_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        min_length=1, max_length=MAX_CHUNKS)
    rev_seq: Num = Field(ge=0, le=MAX_INT)
    """The gateway revocation stream's seq this snapshot includes."""
    all_seq: Num = Field(ge=0, le=MAX_INT)
    """The broadcast revocation stream's seq this snapshot includes."""


class Chunk(_Body):
    """Part of a snapshot (not signed: verified by its hash in the manifest)."""

    type: Literal["chunk"]
    version: int = Field(ge=1, le=MAX_INT)
    index: int = Field(ge=0, le=MAX_INT)
    entries: list[Entry]
    revoked: list[Revoked] = Field(default_factory=list)


class Delta(Header):
    """Changes on top of list version ``base``; ``seq`` is the new version."""

    type: Literal["delta"]
    base: int = Field(ge=0, le=MAX_INT)
    upsert: list[Entry] = Field(default_factory=list, max_length=MAX_ITEMS)
    remove: list[B64Hash] = Field(default_factory=list, max_length=MAX_ITEMS)


class Revocation(Header):
    """Revocations, on the gateway's ``rev`` topic or the broadcast topic."""

    type: Literal["revocation"]
    items: list[Revoked] = Field(min_length=1, max_length=MAX_ITEMS)
    prev_seq: int | None = Field(default=None, ge=0, le=MAX_INT)
    """The seq of the message before it on the same stream (0: none); absent (not null on
    the wire) from an office that does not say. With it, a gateway sees a gap only when
    ``prev_seq`` is above its own seq (a revocation in between was missed), so the office
    may number its messages with jumps (docs/protocol.md, "Streams, versions, replay and
    gaps"); without it, any jump is a gap."""

    @model_validator(mode="after")
    def _prev_before_seq(self) -> Revocation:
        if self.prev_seq is not None and self.prev_seq >= self.seq:
            raise ValueError(f"prev_seq {self.prev_seq} is not below seq {self.seq}")
        return self

    @model_serializer(mode="wrap")
    def _omit_unsaid(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null: a gateway older than this field refuses any unknown
        # field, null or not (docs/protocol.md, "Compatibility").
        data: dict[str, Any] = handler(self)
        if self.prev_seq is None:
            data.pop("prev_seq", None)
        return data


class Command(Header):
    """An operational command."""

    type: Literal["command"]
    action: Literal["lockdown", "free_passage", "normal", "resync", "status"]


class Heartbeat(Header):
    """'Your lists are current as of these versions', with an expiry."""

    type: Literal["heartbeat"]
    list_version: Num = Field(ge=0, le=MAX_INT)
    rev_seq: Num = Field(ge=0, le=MAX_INT)
    all_seq: Num = Field(ge=0, le=MAX_INT)
    cmd_seq: int | None = Field(default=None, ge=0, le=MAX_INT)
    """The seq of the latest command the office sent this gateway; absent (not null on
    the wire) when it sent none, or does not say. A gateway whose ``cmd`` stream is below
    it asks for the command again (``BEHIND_COMMAND``)."""

    @model_serializer(mode="wrap")
    def _omit_unsaid(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null: a gateway older than this field refuses any unknown
        # field, null or not (docs/protocol.md, "Compatibility").
        data: dict[str, Any] = handler(self)
        if self.cmd_seq is None:
            data.pop("cmd_seq", None)
        return data


BEHIND_COMMAND = "behind_command"
"""The ``resync`` reason of a gateway whose ``cmd`` stream is below a heartbeat's
``cmd_seq``: the office answers it by sending its latest commands again (same seqs, signed
anew), not with a snapshot."""


class EventAck(Header):
    """The central office has stored every event of this gateway up to ``upto``."""

    type: Literal["event_ack"]
    upto: int = Field(ge=0, le=MAX_INT)


class Decided(_Body):
    """The office's answer to one enrollment made at a gateway."""

    enrollment: Annotated[str, Field(pattern=r"^[0-9a-f-]{36}$")]
    status: Literal["confirmed", "rejected"]
    list_version: Num | None = Field(default=None, ge=1, le=MAX_INT)
    """Confirmed: the list version that holds the card; until the gateway's list reaches
    it, the gateway's own record keeps granting (up to the lease end)."""
    reason: Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9_]+$")] | None = None
    """Rejected: why (e.g. ``permit_revoked``, ``permit_invalid``, ``officer``)."""


class EnrollmentDecision(Header):
    """Answers to enrollments, on the gateway's ``enr`` topic."""

    type: Literal["enrollment_decision"]
    items: list[Decided] = Field(min_length=1, max_length=1000)


class EnrollmentAttachment(_Body):
    """The attachment of a ``tenant_enrolled`` event (its SHA-256 is the event's
    ``attachment_sha256``): what only the office may read."""

    cred: B64Hash
    """The card's full keyed hash (events carry only a 10-hex prefix)."""
    permit_sealed: Annotated[str, Field(max_length=256)]
    """The permit number sealed to the office (protocol.sealing)."""

    # The gateway's signature of the attachment is not a member: it travels in the event's
    # data (``signature``: protocol.signing.sign_enrollment). It covers the attachment's
    # exact bytes, which could not hold it; an office older than it refuses any unknown
    # member here (extra="forbid") but ignores an unknown data field; and in the data the
    # event's hash covers it as well.


class AnnouncedKey(_Body):
    """One office signing key in a ``keys`` announcement."""

    kid: KeyId
    public_key: B64Hash
    """Standard base64 of the 32-byte raw Ed25519 public key."""
    state: Literal["active", "retiring", "retired"]
    """``active``: trusted; ``retiring``: trusted until ``not_after``; ``retired``: refused
    from now on (for good: a later announcement cannot bring the key id back)."""
    not_after: Num | None = None
    """``retiring`` only (and required there): the Unix s from which the key is refused."""

    @model_validator(mode="after")
    def _not_after_for_retiring(self) -> AnnouncedKey:
        if (self.state == "retiring") != (self.not_after is not None):
            raise ValueError("not_after is given for a retiring key, and only for one")
        return self


MAX_ANNOUNCED_KEYS = 64
"""The most keys one ``keys`` announcement may list."""


class KeyAnnouncement(Header):
    """The office's signing keys and their states, on the gateway's ``keys`` topic: the
    whole set, which replaces the one announced before (docs/protocol.md, "keys")."""

    type: Literal["keys"]
    keys: list[AnnouncedKey] = Field(min_length=1, max_length=MAX_ANNOUNCED_KEYS)

    @model_validator(mode="after")
    def _one_active_and_unique(self) -> KeyAnnouncement:
        kids = [k.kid for k in self.keys]
        if len(set(kids)) != len(kids):
            raise ValueError("a key id is listed twice")
        if not any(k.state == "active" for k in self.keys):
            raise ValueError("no key is active")
        return self


class SiteKey(Header):
    """The building's site key of ``generation`` on the gateway's ``site`` topic, sealed
    to the gateway's own X25519 key (``protocol.bundles.seal_rotated_site_key``), and
    whether the key before it is still honoured (docs/protocol.md, "site_key")."""

    type: Literal["site_key"]
    generation: int = Field(ge=2, le=MAX_INT)
    """1 is the key installed with the gateway; each rotation adds one."""
    sealed: Annotated[str, Field(min_length=1, max_length=256)]
    """Standard base64 of the HPKE-sealed 32-byte key."""
    previous: Literal["honoured", "dropped"]
    """``honoured``: the change-over, cards match under this key or the one before it;
    ``dropped``: this key alone."""


CentralBody = (Snapshot | Delta | Revocation | Command | Heartbeat | EventAck
               | EnrollmentDecision | KeyAnnouncement | SiteKey)
CentralMessage = Annotated[CentralBody, Field(discriminator="type")]
_CENTRAL: TypeAdapter[CentralBody] = TypeAdapter(CentralMessage)
_CHUNK = TypeAdapter(Chunk)

STREAM_TYPES: dict[str, tuple[str, ...]] = {
    "list": ("snapshot", "delta"),
    "rev": ("revocation",),
    "all": ("revocation",),
    "cmd": ("command",),
    "hb": ("heartbeat",),
    "ack": ("event_ack",),
    "enr": ("enrollment_decision",),
    "keys": ("keys",),
    "site": ("site_key",),
}
"""Which message types each stream may carry; anything else on it is refused."""

Short = Annotated[str, Field(max_length=128)]


class WireEvent(_Body):
    """One event as the gateway sends it (the stored event, hash chain included)."""

    seq: int = Field(ge=1, le=MAX_INT - 1)
    event_id: Annotated[str, Field(pattern=r"^[0-9a-f-]{36}$")]
    ts_ms: Num
    kind: Short
    door: Short | None
    reader: Short | None
    direction: Short | None
    reason: Short | None
    cred: Annotated[str, Field(pattern=r"^[0-9a-f]{10}$")] | None
    data: dict[str, Any]
    prev_hash: Hex64
    hash: Hex64
    attachment: Annotated[str, Field(max_length=2048)] | None = None
    """Travels with the event but outside its hash (the event's data carries the
    attachment's SHA-256); the gateway deletes it once the office acknowledged the event."""


class EventBatch(_Body):
    """Gateway → central: a run of consecutive events from the outbox."""

    type: Literal["events"]
    gateway: Ident
    events: list[WireEvent] = Field(min_length=1)
    anchor_seq: int | None = Field(default=None, ge=1, le=MAX_INT)
    anchor_hash: Hex64 | None = None
    """The gateway's chain anchor (the seq and hash of its newest pruned event) when that
    is the first event's predecessor: an office that holds nothing before the first event
    checks its ``prev_hash`` against it. Both or neither; absent (not null) without."""

    @model_validator(mode="after")
    def _anchor_precedes_first(self) -> EventBatch:
        if (self.anchor_seq is None) != (self.anchor_hash is None):
            raise ValueError("anchor_seq and anchor_hash go together")
        if self.anchor_seq is not None and self.anchor_seq != self.events[0].seq - 1:
            raise ValueError(f"anchor_seq {self.anchor_seq} is not the predecessor of the "
                             f"first event (seq {self.events[0].seq})")
        return self

    @model_serializer(mode="wrap")
    def _omit_no_anchor(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null: an office older than these fields refuses a batch that
        # carries them (docs/protocol.md, "Compatibility").
        data: dict[str, Any] = handler(self)
        if self.anchor_seq is None:
            data.pop("anchor_seq", None)
            data.pop("anchor_hash", None)
        return data


class Applied(_Body):
    """Gateway → central: a central message was applied, or refused and why."""

    type: Literal["applied"]
    gateway: Ident
    stream: str
    seq: Num | None
    status: Literal["applied", "refused"]
    reason: str | None = None
    list_version: Num
    ts_ms: Num


class ResyncRequest(_Body):
    """Gateway → central: send a fresh snapshot (a gap, a heartbeat ahead of us, start)."""

    type: Literal["resync"]
    gateway: Ident
    reason: str
    list_version: Num
    rev_seq: Num
    all_seq: Num
    ts_ms: Num


class StatusSettings(_Body):
    """The gateway's settings that the office must respect (docs/protocol.md, "Status")."""

    heartbeat_max_age_s: Num
    """Past this age of the newest heartbeat the gateway's lists are stale: send
    heartbeats well within it."""
    max_message_bytes: Num
    """The largest payload the gateway accepts (and sends)."""
    batch_size: Num
    """The most events in one ``events`` message."""


class Status(_Body):
    """Gateway → central, retained: the gateway's state (``offline`` is the will)."""

    type: Literal["status"]
    gateway: Ident
    state: Literal["online", "offline"]
    ts_ms: Num | None = None
    site: str | None = None
    versions: dict[str, Num] = Field(default_factory=dict)
    outbox: Num | None = None
    mode: str | None = None
    clock: str | None = None
    stale: bool | None = None
    doors: dict[str, Any] = Field(default_factory=dict)
    readers: dict[str, Any] = Field(default_factory=dict)
    refused: dict[str, Num] = Field(default_factory=dict)
    """Refusals by reason, counted since the agent started (they restart from zero)."""
    settings: StatusSettings | None = None
    """None in the will."""
    version: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """The gateway's software version (``permitgate --version``); absent (not null on the
    wire) from a gateway that does not say."""

    @model_serializer(mode="wrap")
    def _omit_unsaid(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null: an office older than this field refuses any unknown
        # field, null or not (docs/protocol.md, "Compatibility").
        data: dict[str, Any] = handler(self)
        if self.version is None:
            data.pop("version", None)
        return data


MAX_REKEY_PAIRS = 64
"""The most pairs one ``rekey`` message carries."""


class Rekey(_Body):
    """Gateway → central during a site-key change-over: cards that matched only under the
    previous key, each as ``[hash under the previous key, hash under the new one]``
    (docs/protocol.md, "rekey"). Not stored by the gateway: a card whose pair is lost is
    reported again at its next tap."""

    type: Literal["rekey"]
    gateway: Ident
    generation: int = Field(ge=2, le=MAX_INT)
    """The new key's generation."""
    pairs: list[tuple[B64Hash, B64Hash]] = Field(min_length=1, max_length=MAX_REKEY_PAIRS)
    ts_ms: Num


GatewayBody = EventBatch | Applied | ResyncRequest | Status | Rekey
GATEWAY_MESSAGES: dict[str, type[GatewayBody]] = {
    "events": EventBatch, "applied": Applied, "request": ResyncRequest, "status": Status,
    "rekey": Rekey,
}
"""The model of each gateway → central topic kind."""


def parse_central(body: str) -> CentralBody:
    """Validate a verified body against the central message models."""
    try:
        return _CENTRAL.validate_json(body)
    except ValidationError as exc:
        raise RefusedError("malformed", first_error(exc)) from None


def parse_chunk(payload: bytes, max_bytes: int) -> Chunk:
    """Validate a snapshot chunk (its hash is checked by the caller)."""
    if len(payload) > max_bytes:
        raise RefusedError("oversized", f"{len(payload)} bytes > {max_bytes}")
    try:
        return _CHUNK.validate_json(payload)
    except ValidationError as exc:
        raise RefusedError("malformed", first_error(exc)) from None


def is_chunk(payload: bytes) -> bool:
    """Whether a ``list`` payload is a chunk (chunks start with their type)."""
    return payload.startswith(b'{"type":"chunk"')


def chunk_digest(payload: bytes) -> str:
    """The SHA-256 (hex) a manifest lists for a chunk payload."""
    return hashlib.sha256(payload).hexdigest()
