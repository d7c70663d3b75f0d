"""The MQTT wire protocol, version 1: topics, payload models, signing.

docs/protocol.md is the normative description; this module is its implementation, and
the JSON Schemas in docs/schemas/ are exported from these models
(``python -m agent.wire --schemas docs/schemas``).

Everything the central office sends is an ``Envelope``: the message body as JSON text,
the id of the signing key, and an Ed25519 signature over the protocol tag, the topic and
the body. Binding the topic means a message signed for one gateway cannot be replayed to
another. Snapshot chunks are the one exception: each is verified by its SHA-256 listed in
the signed snapshot manifest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

PROTOCOL = "pg/v1"
SIGNING_TAG = b"permitgate-v1"
MAX_CLOCK_SKEW_S = 300
"""A message issued further in the future than this is refused (a wrong clock or a
forged issue time)."""

Ident = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
KeyId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
B64Hash = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]
"""A 32-byte hash in standard base64 (44 characters with padding)."""


# -- topics ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic tree of one gateway (docs/protocol.md, "Topics")."""

    gateway: str
    prefix: str = PROTOCOL

    def inbound(self, kind: str) -> str:
        """Central → this gateway: ``list``, ``rev``, ``cmd``, ``ack``, ``hb``."""
        return f"{self.prefix}/gw/{self.gateway}/in/{kind}"

    def outbound(self, kind: str) -> str:
        """This gateway → central: ``events``, ``status``, ``applied``, ``request``."""
        return f"{self.prefix}/gw/{self.gateway}/out/{kind}"

    @property
    def broadcast_revocations(self) -> str:
        """Permit revocations sent to every gateway."""
        return f"{self.prefix}/all/rev"

    def subscriptions(self) -> list[str]:
        """What the gateway subscribes to."""
        return [f"{self.prefix}/gw/{self.gateway}/in/+", self.broadcast_revocations,
                self.outbound("status")]


INBOUND_KINDS = ("list", "rev", "cmd", "ack", "hb")


def stream_of(topic: str, gateway: str, prefix: str = PROTOCOL) -> str | None:
    """The stream a central topic carries (``list``, ``rev``, ``cmd``, ``ack``, ``hb``,
    ``all``), or None when the topic is not one the gateway consumes."""
    if topic == f"{prefix}/all/rev":
        return "all"
    head = f"{prefix}/gw/{gateway}/in/"
    if topic.startswith(head) and topic[len(head):] in INBOUND_KINDS:
        return topic[len(head):]
    return None


# -- payload models -------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Header(_Body):
    """Fields every signed central message carries."""

    gateway: Ident | Literal["*"]
    """The target gateway, or ``*`` on the broadcast topic."""
    seq: int = Field(ge=1, le=2**53)
    """Monotonic per stream; for ``snapshot`` and ``delta`` it is the list version."""
    issued_at: int = Field(ge=0)
    expires_at: int = Field(ge=0)
    """Unix seconds; a message is refused once ``expires_at`` has passed."""


Entry = tuple[B64Hash, B64Hash | None, int | None, int | None, list[Ident] | None,
              Ident | None, int | None]
"""One allowlist entry: credential hash, permit hash, valid_from, valid_until (Unix s,
until exclusive), doors (None = every door), schedule (None = ``always``), confirmed_at
(when the office last confirmed the permit with the registry, Unix s)."""


class Revoked(_Body):
    """One revocation: a credential hash, or a permit hash that stops every card of it."""

    kind: Literal["credential", "permit"]
    hash: B64Hash


class Snapshot(Header):
    """The signed manifest of a whole allowlist; ``chunks`` ``Chunk`` messages follow on
    the same topic, in order."""

    type: Literal["snapshot"]
    entries: int = Field(ge=0)
    revoked: int = Field(ge=0)
    chunk_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        min_length=1, max_length=100_000)
    rev_seq: int = Field(ge=0)
    """The gateway revocation stream's seq this snapshot includes."""
    all_seq: int = Field(ge=0)
    """The broadcast revocation stream's seq this snapshot includes."""


class Chunk(_Body):
    """Part of a snapshot (not signed: verified by its hash in the manifest)."""

    type: Literal["chunk"]
    version: int = Field(ge=1)
    index: int = Field(ge=0)
    entries: list[Entry]
    revoked: list[Revoked] = Field(default_factory=list)


class Delta(Header):
    """Changes on top of list version ``base``; ``seq`` is the new version."""

    type: Literal["delta"]
    base: int = Field(ge=0)
    upsert: list[Entry] = Field(default_factory=list, max_length=100_000)
    remove: list[B64Hash] = Field(default_factory=list, max_length=100_000)


class Revocation(Header):
    """Revocations, on the gateway's ``rev`` topic or the broadcast topic."""

    type: Literal["revocation"]
    items: list[Revoked] = Field(min_length=1, max_length=100_000)


class Command(Header):
    """An operational command."""

    type: Literal["command"]
    action: Literal["lockdown", "free_passage", "normal", "resync", "status"]


class Heartbeat(Header):
    """'Your lists are current as of these versions', with an expiry."""

    type: Literal["heartbeat"]
    list_version: int = Field(ge=0)
    rev_seq: int = Field(ge=0)
    all_seq: int = Field(ge=0)


class EventAck(Header):
    """The central office has stored every event of this gateway up to ``upto``."""

    type: Literal["event_ack"]
    upto: int = Field(ge=0)


CentralMessage = Annotated[Snapshot | Delta | Revocation | Command | Heartbeat | EventAck,
                           Field(discriminator="type")]
_CENTRAL = TypeAdapter(CentralMessage)
_CHUNK = TypeAdapter(Chunk)

STREAM_TYPES: dict[str, tuple[str, ...]] = {
    "list": ("snapshot", "delta"),
    "rev": ("revocation",),
    "all": ("revocation",),
    "cmd": ("command",),
    "hb": ("heartbeat",),
    "ack": ("event_ack",),
}
"""Which message types each stream may carry; anything else on it is refused."""


Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Short = Annotated[str, Field(max_length=128)]


class WireEvent(_Body):
    """One event as the gateway sends it (the stored event, hash chain included)."""

    seq: int = Field(ge=1)
    event_id: Annotated[str, Field(pattern=r"^[0-9a-f-]{36}$")]
    ts_ms: int
    kind: Short
    door: Short | None
    reader: Short | None
    direction: Short | None
    reason: Short | None
    cred: Annotated[str, Field(pattern=r"^[0-9a-f]{10}$")] | None
    data: dict[str, Any]
    prev_hash: Hex64
    hash: Hex64


class EventBatch(_Body):
    """Gateway → central: a run of consecutive events from the outbox."""

    type: Literal["events"]
    gateway: Ident
    events: list[WireEvent] = Field(min_length=1)


class Applied(_Body):
    """Gateway → central: a central message was applied, or refused and why."""

    type: Literal["applied"]
    gateway: Ident
    stream: str
    seq: int | None
    status: Literal["applied", "refused"]
    reason: str | None = None
    list_version: int
    ts_ms: int


class ResyncRequest(_Body):
    """Gateway → central: send a fresh snapshot (a gap, a heartbeat ahead of us, start)."""

    type: Literal["resync"]
    gateway: Ident
    reason: str
    list_version: int
    rev_seq: int
    all_seq: int
    ts_ms: int


class Status(_Body):
    """Gateway → central, retained: the gateway's state (``offline`` is the will)."""

    type: Literal["status"]
    gateway: Ident
    state: Literal["online", "offline"]
    ts_ms: int | None = None
    site: str | None = None
    versions: dict[str, int] = Field(default_factory=dict)
    outbox: int | None = None
    mode: str | None = None
    clock: str | None = None
    stale: bool | None = None
    doors: dict[str, Any] = Field(default_factory=dict)
    readers: dict[str, Any] = Field(default_factory=dict)
    refused: dict[str, int] = Field(default_factory=dict)


GATEWAY_MESSAGES: dict[str, type[BaseModel]] = {
    "events": EventBatch, "applied": Applied, "request": ResyncRequest, "status": Status,
}


# -- envelope and signing ---------------------------------------------------------------


class Envelope(_Body):
    """A signed central message as it travels."""

    kid: KeyId
    sig: str
    body: str


class RefusedError(Exception):
    """A message was refused; ``reason`` is a short code (docs/protocol.md, "Refusals")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def signing_input(topic: str, body: str) -> bytes:
    """The exact bytes an Ed25519 signature covers."""
    return SIGNING_TAG + b"\n" + topic.encode("utf-8") + b"\n" + body.encode("utf-8")


def sign(key: Ed25519PrivateKey, kid: str, topic: str, body: BaseModel) -> bytes:
    """The wire payload of ``body`` signed for ``topic``."""
    text = body.model_dump_json()
    sig = key.sign(signing_input(topic, text))
    return Envelope(kid=kid, sig=base64.b64encode(sig).decode(), body=text
                    ).model_dump_json().encode()


def open_envelope(payload: bytes, topic: str, keys: dict[str, Ed25519PublicKey],
                  max_bytes: int) -> str:
    """Check size, shape and signature; return the signed body text.

    Raises ``RefusedError`` with reason ``oversized``, ``malformed``, ``unknown_key`` or
    ``bad_signature``.
    """
    if len(payload) > max_bytes:
        raise RefusedError("oversized", f"{len(payload)} bytes > {max_bytes}")
    try:
        envelope = Envelope.model_validate_json(payload)
    except ValidationError as exc:
        raise RefusedError("malformed", _first_error(exc)) from None
    key = keys.get(envelope.kid)
    if key is None:
        raise RefusedError("unknown_key", f"key id {envelope.kid!r} is not trusted")
    try:
        signature = base64.b64decode(envelope.sig, validate=True)
        key.verify(signature, signing_input(topic, envelope.body))
    except (InvalidSignature, binascii.Error, ValueError):
        raise RefusedError("bad_signature", f"signature by {envelope.kid!r} does not verify "
                      "for this topic and body") from None
    return envelope.body


def parse_central(body: str) -> Snapshot | Delta | Revocation | Command | Heartbeat | \
        EventAck:
    """Validate a verified body against the central message models."""
    try:
        return _CENTRAL.validate_json(body)
    except ValidationError as exc:
        raise RefusedError("malformed", _first_error(exc)) from None


def parse_chunk(payload: bytes, max_bytes: int) -> Chunk:
    """Validate a snapshot chunk (its hash is checked by the caller)."""
    if len(payload) > max_bytes:
        raise RefusedError("oversized", f"{len(payload)} bytes > {max_bytes}")
    try:
        return _CHUNK.validate_json(payload)
    except ValidationError as exc:
        raise RefusedError("malformed", _first_error(exc)) from None


def is_chunk(payload: bytes) -> bool:
    """Whether a ``list`` payload is a chunk (chunks start with their type)."""
    return payload.startswith(b'{"type":"chunk"')


def chunk_digest(payload: bytes) -> str:
    """The SHA-256 (hex) a manifest lists for a chunk payload."""
    return hashlib.sha256(payload).hexdigest()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "<message>"
    return f"{where}: {err['msg']} ({exc.error_count()} problem(s))"


# -- hashes and keys -------------------------------------------------------------------


def b64(data: bytes) -> str:
    """Standard base64 of a hash."""
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    """A 32-byte hash from standard base64; ``RefusedError('malformed')`` otherwise."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RefusedError("malformed", "hash is not base64") from None
    if len(data) != 32:
        raise RefusedError("malformed", f"hash has {len(data)} bytes, not 32")
    return data


def load_trusted_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """Read trusted central keys: one ``<key id> <base64 raw Ed25519 public key>`` a line,
    ``#`` comments allowed. Raises ValueError naming the file and line."""
    keys: dict[str, Ed25519PublicKey] = {}
    for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<key id> <base64 public key>'")
        kid, raw = parts
        try:
            keys[kid] = Ed25519PublicKey.from_public_bytes(base64.b64decode(raw,
                                                                            validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{path}:{number}: key {kid!r} is not a base64 Ed25519 public "
                             f"key: {exc}") from None
    if not keys:
        raise ValueError(f"{path}: no trusted keys")
    return keys


def export_schemas(folder: Path) -> list[Path]:
    """Write the JSON Schema of every wire message into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    models: Sequence[tuple[str, Any]] = [
        ("envelope", Envelope), ("snapshot", Snapshot), ("chunk", Chunk), ("delta", Delta),
        ("revocation", Revocation), ("command", Command), ("heartbeat", Heartbeat),
        ("event_ack", EventAck), ("events", EventBatch), ("applied", Applied),
        ("resync", ResyncRequest), ("status", Status),
    ]
    written = []
    for name, model in models:
        path = folder / f"{name}.schema.json"
        schema = TypeAdapter(model).json_schema()
        schema["$id"] = f"https://permitgate.invalid/schemas/{PROTOCOL}/{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--schemas":
        for written_path in export_schemas(Path(sys.argv[2])):
            sys.stdout.write(f"{written_path}\n")
    else:
        sys.stderr.write("usage: python -m agent.wire --schemas FOLDER\n")
        sys.exit(2)
