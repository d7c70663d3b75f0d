"""Fuzz target of the gateway's sync applier (agent/sync_apply.py) on a real store: the
fuzz bytes are a sequence of MQTT messages, raw, signed by the office, forged, replayed
to another topic, or a whole one-chunk snapshot around an arbitrary chunk.

The applier's contract: ``handle`` never raises; list and stream versions never go
back; a message not signed by a trusted key for its own topic changes nothing; every
report to the office has a documented outcome, and a healthy store never reports
``store_error`` (a message's content must not pass for a local failure); the event chain
stays whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import strategies as st

from agent.config import SyncConfig
from agent.decision import Mode
from agent.site_keys import SiteKeys
from agent.store import Store
from agent.sync_apply import Applier
from protocol.chain import Event
from protocol.messages import Applied, Decided, chunk_digest
from tests.fuzz.common import Cursor, Target, pack_blob
from tests.fuzz.protocol import (
    BODIES,
    GW,
    NOW,
    OFFICE_KEY,
    OTHER_KEY,
    TOPIC_CHOICES,
    TRUSTED,
    bodies,
    chunk_seed,
    entries,
    header,
    sign_text,
)
from tests.fuzz.strategies import mutate_json

STREAMS = ("list", "rev", "all", "cmd", "hb", "enr", "mode")
"""Streams whose recorded version must never go back (``staging`` may)."""
REASONS = {"oversized", "malformed", "unknown_key", "bad_signature", "wrong_stream",
           "wrong_target", "expired", "from_future", "replay", "rollback", "gap",
           "bad_chunk", "bad_snapshot"}
"""Refusal reasons of docs/protocol.md ("Refusals")."""
CLOCK_STEPS = (0, 60, 90_000, -120)
"""Seconds the wall clock moves before a message: none, a minute, past the heartbeat age,
and back a little (NTP)."""
RAW, SIGNED, FORGED, REPLAYED, SNAPSHOT = range(5)
MAX_MESSAGES = 12
TMP_ROOT = os.environ.get("PERMITGATE_FUZZ_TMP") or (
    "/dev/shm" if Path("/dev/shm").is_dir() else None)
"""Stores are created per input; on a RAM disk their fsyncs cost nothing."""


class Clock:
    """The fuzzed gateway's wall clock."""

    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


SEAL = X25519PrivateKey.from_private_bytes(bytes(range(32)))
"""The gateway's seal key: ``site_key`` messages the fuzzer makes do not open with it."""


class Host:
    """The agent as the applier sees it, over the real event chain."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.mode = Mode.NORMAL
        self.cutoff: int | None = None
        self.decided: list[Decided] = []
        self.observed: list[tuple[int, str]] = []
        self.site_keys: SiteKeys | None = SiteKeys(bytes(32), SEAL, GW)

    def current_mode(self) -> Mode:
        """The mode in force."""
        return self.mode

    def set_mode(self, mode: Mode, *, source: str) -> None:
        """Switch mode."""
        del source
        self.mode = mode

    def set_stale_cutoff(self, cutoff: int | None) -> None:
        """Keep the stale cutoff."""
        self.cutoff = cutoff

    def clock_observed(self, trusted_ms: int, source: str) -> None:
        """Keep the office's signed times."""
        self.observed.append((trusted_ms, source))

    def clock_ok(self) -> bool:
        """The clock is judged right (the fuzzed clock only moves by the input's steps)."""
        return True

    def record_event(self, event: Event) -> None:
        """Append to the real chain."""
        self.store.append(event)

    def enrollment_decided(self, decided: Decided) -> None:
        """Keep the office's answer."""
        self.decided.append(decided)


@dataclass
class Sent:
    """What the applier sent the office."""

    applied: list[Applied] = field(default_factory=list)
    resyncs: list[str] = field(default_factory=list)

    def send_applied(self, message: Applied) -> None:
        """Keep a report."""
        message.model_dump_json()  # what the worker publishes
        self.applied.append(message)

    def request_resync(self, reason: str, *, at_once: bool = False) -> None:
        """Keep a resync request."""
        del at_once
        self.resyncs.append(reason)

    def send_status(self) -> None:
        """A status request (nothing to keep)."""

    def events_acked(self, upto: int) -> None:
        """Acknowledged events (already marked in the store)."""
        assert upto >= 0


def _versions(store: Store) -> dict[str, int]:
    return {k: v for k, v in store.versions().items() if k in STREAMS}


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message of the input, and how far the clock moves before it."""

    mode: int
    topic: str
    payload: bytes
    step_s: int = 0


def _messages(cur: Cursor, store: Store) -> list[Message]:
    """The messages of the input, at most ``MAX_MESSAGES`` (a snapshot counts as one)."""
    out: list[Message] = []
    for blob in cur.blobs():
        if len(out) >= MAX_MESSAGES:
            break
        inner = Cursor(blob)
        selector = inner.byte()
        index = selector & 0x07
        mode = (selector >> 3) & 0x07
        step = CLOCK_STEPS[selector >> 6]
        topic = TOPIC_CHOICES[index]
        payload = inner.rest()
        text = payload.decode("utf-8", "replace")
        if mode == RAW:
            out.append(Message(RAW, topic, payload, step))
        elif mode == FORGED:
            out.append(Message(FORGED, topic, sign_text(OTHER_KEY, topic, text), step))
        elif mode == REPLAYED:
            other = TOPIC_CHOICES[(index + 1) % len(TOPIC_CHOICES)]
            out.append(Message(REPLAYED, topic, sign_text(OFFICE_KEY, other, text), step))
        elif mode == SNAPSHOT:
            out += _snapshot(Cursor(payload), store, step)
        else:
            out.append(Message(SIGNED, topic, sign_text(OFFICE_KEY, topic, text), step))
    return out


def _snapshot(pick: Cursor, store: Store, step: int) -> list[Message]:
    """A signed one-chunk manifest for the next list version around an arbitrary chunk
    (its entry and revocation counts from the input), then the chunk."""
    entries, revoked = pick.byte(), pick.byte()
    body = pick.rest()
    manifest = {"type": "snapshot", "entries": entries, "revoked": revoked,
                "chunk_sha256": [chunk_digest(body)], "rev_seq": 0, "all_seq": 0,
                **header(store.versions().get("list", 0) + 1, expires_at=NOW + 10**6)}
    topic = TOPIC_CHOICES[0]
    return [Message(SIGNED, topic, sign_text(OFFICE_KEY, topic, json.dumps(manifest)), step),
            Message(RAW, topic, body)]


def sync_apply(data: bytes) -> None:
    """A sequence of central messages of any kind applied to a fresh store (see the
    module docstring for the contract checked after each)."""
    with tempfile.TemporaryDirectory(prefix="pg-fuzz-", dir=TMP_ROOT) as folder:
        clock = Clock()
        store = Store(Path(folder) / "pg.db", clock_ms=lambda: int(clock.now * 1000))
        try:
            sent = Sent()
            applier = Applier(store, Host(store), dict(TRUSTED), gateway=GW,
                              config=SyncConfig(enabled=True), outbound=sent, clock=clock)
            applier.on_connected(session_present=False)
            for message in _messages(Cursor(data), store):
                if message.step_s:
                    clock.now += message.step_s
                    applier.check_stale()
                before = _versions(store)
                reports = len(sent.applied)
                applier.handle(message.topic, message.payload)
                after = _versions(store)
                for stream, version in before.items():
                    assert after.get(stream, 0) >= version, (stream, before, after)
                if message.mode in (FORGED, REPLAYED):
                    assert after == before, (message.mode, before, after)
                for report in sent.applied[reports:]:
                    assert report.status in {"applied", "refused"}
                    assert report.status == "applied" or report.reason in REASONS, report
            applier.check_stale()
            applier.on_connected(session_present=False)
            chain = store.verify_chain()
            assert chain.ok, chain.problems
        finally:
            store.close()


def _seeds() -> list[bytes]:
    def signed(index: int, body: dict[str, object]) -> bytes:
        return pack_blob(bytes([SIGNED << 3 | index]) + json.dumps(body).encode())

    rev, cmd, ack, hb, enr = 1, 2, 3, 4, 5
    by_type = {b["type"]: b for b in BODIES}
    snapshot = pack_blob(bytes([SNAPSHOT << 3]) + bytes([1, 1]) + chunk_seed())
    delta = dict(by_type["delta"])
    return [
        snapshot + signed(0, delta) + signed(rev, by_type["revocation"]),
        signed(cmd, by_type["command"]) + signed(hb, by_type["heartbeat"])
        + signed(ack, by_type["event_ack"]) + signed(enr, by_type["enrollment_decision"]),
        signed(rev, by_type["revocation"]) + pack_blob(bytes([FORGED << 3 | rev]) + json.dumps(
            {**by_type["revocation"], "seq": 2}).encode())
        + pack_blob(bytes([0xC0 | SIGNED << 3 | hb]) + json.dumps(by_type["heartbeat"]).encode()),
    ]


STREAM_OF_TYPE = {"snapshot": 0, "delta": 0, "revocation": 1, "command": 2, "event_ack": 3,
                  "heartbeat": 4, "enrollment_decision": 5}


@st.composite
def _message(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["signed", "signed", "signed", "snapshot", "snapshot",
                                 "delta", "other"]))
    step = draw(st.sampled_from([0] * 9 + [1, 2, 3])) << 6
    if kind == "delta":  # well-typed, on the base a fresh store has, any entry values
        seq = draw(st.integers(1, 3))
        delta = {"type": "delta", "base": seq - 1, **header(seq),
                 "upsert": draw(st.lists(entries(), max_size=3)), "remove": []}
        return pack_blob(bytes([step | SIGNED << 3]) + json.dumps(delta).encode())
    if kind == "snapshot":
        chunk = draw(st.one_of(
            mutate_json(json.loads(chunk_seed())),
            st.lists(entries(), max_size=3).map(lambda e: {
                "type": "chunk", "version": 1, "index": 0, "entries": e, "revoked": []})))
        counts = bytes([draw(st.integers(0, 2)), draw(st.integers(0, 2))])
        if isinstance(chunk, dict) and draw(st.integers(0, 4)):  # counts that match
            lists = [chunk.get(k) for k in ("entries", "revoked")]
            counts = bytes(len(v) % 256 if isinstance(v, list) else 0 for v in lists)
        # Compact, "type" first: a chunk is recognised by its first bytes (is_chunk).
        text = json.dumps(chunk, separators=(",", ":"))
        return pack_blob(bytes([step | SNAPSHOT << 3]) + counts + text.encode())
    body = draw(bodies())
    kind_of = body.get("type") if isinstance(body, dict) else None
    if isinstance(body, dict) and "seq" in body and draw(st.booleans()):
        # A seq (and for a delta, the base under it) that the fresh store would take.
        seq = draw(st.integers(1, 4))
        body = {**body, "seq": seq}
        if kind_of == "delta":
            body["base"] = seq - 1
    index = STREAM_OF_TYPE.get(kind_of, 0) if isinstance(kind_of, str) else 0
    if kind == "other" or draw(st.integers(0, 9)) == 0:
        index = draw(st.integers(0, 7))
    mode = draw(st.sampled_from([SIGNED, SIGNED, SIGNED, FORGED, REPLAYED, RAW]))
    return pack_blob(bytes([step | mode << 3 | index]) + json.dumps(body).encode())


def _structured() -> st.SearchStrategy[bytes]:
    return st.lists(_message(), min_size=1, max_size=6).map(b"".join)


TARGETS: list[Target] = [
    Target("sync_apply", sync_apply, 16384, "sync_apply.Applier.handle on a real Store", _seeds,
           _structured),
]

