"""The applier (agent/sync_apply.py) on a real store, with signed messages and no broker.

Each test plays the office by signing bodies with ``protocol.signing.sign`` for the exact
topic, hands the payload to ``Applier.handle`` as the MQTT worker would, and looks at the
store (agent.store.Store in tmp_path), the events it recorded and what it sent back
through its ``Outbound``.
"""

from __future__ import annotations

import ast
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel
from structlog.testing import capture_logs

from agent.config import SyncConfig
from agent.decision import Mode
from agent.site_keys import SiteKeys
from agent.store import Store, lists_path
from agent.sync_apply import STAGE_ROWS, Applier
from protocol.chain import Event
from protocol.hashing import CredentialHasher
from protocol.messages import (
    Applied,
    Chunk,
    Command,
    Decided,
    Delta,
    EnrollmentDecision,
    Entry,
    EventAck,
    Heartbeat,
    Revocation,
    Revoked,
    Snapshot,
    chunk_digest,
)
from protocol.signing import b64, sign
from protocol.topics import Topics

REPO = Path(__file__).resolve().parent.parent
GW = "gw-1"
KID = "office-1"
NOW = 1_798_761_600
TOPICS = Topics(GW)
HASHER = CredentialHasher(bytes(range(32)))
CARD_A, CARD_B, CARD_C = "em4100:67003B51C6", "em4100:67003BA86C", "em4100:1122334455"


def cred(card: str) -> bytes:
    """The credential hash of ``card`` under the test site key."""
    return HASHER.credential(card)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


class Host:
    """The agent as the applier sees it: a mode, a stale cutoff, and the real event log."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.mode = Mode.NORMAL
        self.cutoff: int | None = None
        self.decided: list[Decided] = []
        self.observed: list[tuple[int, str]] = []
        self.clock_right = True
        self.site_keys: SiteKeys | None = None

    def current_mode(self) -> Mode:
        """The mode in force."""
        return self.mode

    def set_mode(self, mode: Mode, *, source: str) -> None:
        """Switch mode (sources are not checked here)."""
        del source
        self.mode = mode

    def set_stale_cutoff(self, cutoff: int | None) -> None:
        """Remember the stale-list cutoff."""
        self.cutoff = cutoff

    def record_event(self, event: Event) -> None:
        """Append to the real event chain."""
        self.store.append(event)

    def clock_observed(self, trusted_ms: int, source: str) -> None:
        """Remember the office's signed times."""
        self.observed.append((trusted_ms, source))

    def clock_ok(self) -> bool:
        """Whether the test says the clock is right."""
        return self.clock_right

    def enrollment_decided(self, decided: Decided) -> None:
        """Remember the office's answers."""
        self.decided.append(decided)


@dataclass
class Sent:
    """Everything the applier sent to the office (an ``Outbound`` that keeps a list)."""

    applied: list[Applied] = field(default_factory=list)
    resyncs: list[tuple[str, bool]] = field(default_factory=list)
    statuses: int = 0
    acked: list[int] = field(default_factory=list)

    def send_applied(self, message: Applied) -> None:
        """Keep the report."""
        self.applied.append(message)

    def request_resync(self, reason: str, *, at_once: bool = False) -> None:
        """Keep the request."""
        self.resyncs.append((reason, at_once))

    def send_status(self) -> None:
        """Count the status request."""
        self.statuses += 1

    def events_acked(self, upto: int) -> None:
        """Keep the acknowledged seq."""
        self.acked.append(upto)


class Rig:
    """An applier on a real store, and an office that signs for it."""

    def __init__(self, folder: Path, **settings: Any) -> None:
        self.folder = folder
        self.key = Ed25519PrivateKey.from_private_bytes(bytes(32))
        self.store = Store(folder / "pg.db")
        self.host = Host(self.store)
        self.sent = Sent()
        self.clock = Clock()
        self.applier = Applier(self.store, self.host, {KID: self.key.public_key()},
                               gateway=GW, config=SyncConfig(**settings), outbound=self.sent,
                               clock=self.clock)

    def header(self, seq: int, *, ttl: int = 3600, gateway: str = GW) -> dict[str, Any]:
        """Header fields issued now."""
        now = int(self.clock.now)
        return {"gateway": gateway, "seq": seq, "issued_at": now, "expires_at": now + ttl}

    def send(self, kind: str, body: BaseModel, *, key: Ed25519PrivateKey | None = None
             ) -> None:
        """Sign ``body`` for the gateway's ``kind`` topic and hand it to the applier."""
        topic = TOPICS.broadcast_revocations if kind == "all" else TOPICS.inbound(kind)
        self.applier.handle(topic, sign(key or self.key, KID, topic, body))

    def chunk(self, payload: bytes) -> None:
        """Hand a raw chunk payload to the applier."""
        self.applier.handle(TOPICS.inbound("list"), payload)

    def manifest(self, version: int, chunks: list[bytes], *, entries: int, revoked: int = 0
                 ) -> None:
        """Send the signed manifest of ``chunks``."""
        self.send("list", Snapshot(type="snapshot", entries=entries, revoked=revoked,
                                   chunk_sha256=[chunk_digest(c) for c in chunks],
                                   rev_seq=0, all_seq=0, **self.header(version)))

    def snapshot(self, version: int, cards: list[list[str]]) -> list[bytes]:
        """Send a whole snapshot: one chunk per inner list of cards."""
        chunks = chunk_payloads(version, cards)
        self.manifest(version, chunks, entries=sum(len(c) for c in cards))
        for payload in chunks:
            self.chunk(payload)
        return chunks

    def kinds(self) -> list[str]:
        """The kinds of the events recorded."""
        return [e.kind for e in self.store.events()]

    def last(self) -> Applied:
        """The newest report sent."""
        return self.sent.applied[-1]

    def staging_tables(self) -> list[str]:
        """Snapshot staging tables left in the list database."""
        conn = sqlite3.connect(f"file:{lists_path(self.store.path)}?mode=ro", uri=True)
        try:
            return [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '%_new'")]
        finally:
            conn.close()


def chunk_payloads(version: int, cards: list[list[str]]) -> list[bytes]:
    """Compact chunk payloads, ``type`` first, one per inner list."""
    return [Chunk(type="chunk", version=version, index=i,
                  entries=[Entry(cred=b64(cred(c))) for c in part]).model_dump_json().encode()
            for i, part in enumerate(cards)]


@pytest.fixture(name="rig")
def rig_fixture(tmp_path: Path) -> Iterator[Rig]:
    """A fresh applier on a fresh store (the ``rig`` of the modules that import this)."""
    made = Rig(tmp_path)
    try:
        yield made
    finally:
        made.store.close()


def revocation(rig: Rig, seq: int, card: str) -> Revocation:
    """A revocation of ``card`` with ``seq`` on the gateway's own stream."""
    return Revocation(type="revocation", items=[Revoked(kind="credential",
                                                        hash=b64(cred(card)))],
                      **rig.header(seq))


def test_the_applier_has_no_mqtt_in_it() -> None:
    """The apply logic imports neither paho nor the agent's runtime."""
    tree = ast.parse((REPO / "agent" / "sync_apply.py").read_text("utf-8"))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)}
    assert not {m for m in modules if m.startswith(("paho", "agent.runtime", "agent.sync."))}
    assert "agent.sync" not in modules


def test_a_snapshot_in_chunks_is_applied(rig: Rig) -> None:
    """A signed manifest and its chunks replace the list in one step: the cards are on
    the list, the version is the manifest's, and one applied report names it."""
    rig.snapshot(3, [[CARD_A, CARD_B], [CARD_C]])
    assert rig.applier.versions()["list"] == 3
    assert all(rig.store.lookup(cred(c)).grant is not None for c in (CARD_A, CARD_B, CARD_C))
    assert [(a.stream, a.seq, a.status) for a in rig.sent.applied] == [("list", 3, "applied")]
    assert "snapshot_applied" in rig.kinds()
    assert rig.staging_tables() == []


def test_a_replayed_or_rolled_back_seq_is_refused(rig: Rig) -> None:
    """A revocation sent again is refused as replay, an older seq as rollback; neither is
    applied again nor lowers the stream's seq, and both are counted."""
    rig.send("rev", revocation(rig, 3, CARD_A))
    rig.send("rev", revocation(rig, 3, CARD_B))
    assert (rig.last().status, rig.last().reason, rig.last().seq) == ("refused", "replay", 3)
    rig.send("rev", revocation(rig, 2, CARD_B))
    assert (rig.last().reason, rig.last().seq) == ("rollback", 2)
    assert rig.applier.versions()["rev"] == 3
    assert not rig.store.lookup(cred(CARD_B)).revoked
    assert rig.applier.counters.refused == {"replay": 1, "rollback": 1}


def test_a_revocation_applies_at_once(rig: Rig) -> None:
    """By the time ``handle`` returns, a revoked card is revoked in the store and the
    office has its applied report."""
    rig.snapshot(1, [[CARD_A, CARD_B]])
    rig.send("rev", revocation(rig, 1, CARD_A))
    assert rig.store.lookup(cred(CARD_A)).revoked
    assert not rig.store.lookup(cred(CARD_B)).revoked
    assert (rig.last().stream, rig.last().seq, rig.last().status) == ("rev", 1, "applied")


def test_a_forged_signature_is_refused_and_counted(rig: Rig) -> None:
    """A revocation signed by another key under the trusted key id is refused as
    bad_signature, counted, recorded as a sync_refused event, and not applied."""
    rig.send("rev", revocation(rig, 1, CARD_A), key=Ed25519PrivateKey.generate())
    assert (rig.last().status, rig.last().reason, rig.last().seq) == \
        ("refused", "bad_signature", None)
    assert rig.applier.counters.refused["bad_signature"] == 1
    assert not rig.store.lookup(cred(CARD_A)).revoked
    assert "rev" not in rig.applier.versions()
    refused = rig.store.events(kind="sync_refused")
    assert [(e.reason, e.data["count"]) for e in refused] == [("bad_signature", 1)]


def test_an_expired_message_is_refused(rig: Rig) -> None:
    """A command whose expiry has passed on the gateway's clock is refused as expired
    and changes nothing."""
    message = Command(type="command", action="lockdown", **rig.header(1))
    rig.clock.now = message.expires_at
    rig.send("cmd", message)
    assert (rig.last().reason, rig.last().seq) == ("expired", 1)
    assert rig.host.mode is Mode.NORMAL
    assert rig.applier.counters.refused["expired"] == 1


@pytest.mark.parametrize("shift", [10**7, -(10**7)], ids=["clock-ahead", "clock-behind"])
def test_revocations_apply_whatever_the_clock_says(rig: Rig, shift: int) -> None:
    """A revocation is applied even when the gateway's clock makes it look expired or
    from the future (it only takes access away); a replay is still refused."""
    message = revocation(rig, 1, CARD_A)
    rig.clock.now += shift
    rig.send("rev", message)
    assert rig.last().status == "applied"
    assert rig.store.lookup(cred(CARD_A)).revoked
    rig.send("rev", message)
    assert rig.last().reason == "replay"


def test_a_signed_message_from_the_future_reports_the_office_time(rig: Rig) -> None:
    """A validly signed message issued ahead of the gateway's clock tells the clock judge
    the office's time (the gateway's clock is behind), and is refused as from_future."""
    rig.clock.now -= 3600
    message = Command(type="command", action="lockdown", **rig.header(1))
    rig.clock.now -= 3600
    rig.send("cmd", message)
    assert rig.last().reason == "from_future"
    assert rig.host.observed == [(message.issued_at * 1000, "office")]


def test_a_clock_judged_wrong_makes_the_lists_stale(rig: Rig) -> None:
    """While the clock is judged wrong the lists count as stale (sync_stale recorded),
    and they are fresh again once it is right."""
    rig.send("hb", Heartbeat(type="heartbeat", list_version=0, rev_seq=0, all_seq=0,
                             **rig.header(1)))
    rig.applier.check_stale()
    assert rig.applier.stale is False
    rig.host.clock_right = False
    rig.applier.check_stale()
    assert rig.applier.stale is True and "sync_stale" in rig.kinds()
    rig.host.clock_right = True
    rig.applier.check_stale()
    assert rig.applier.stale is False and "sync_fresh" in rig.kinds()


def test_a_chunk_refusal_carries_the_snapshots_seq(rig: Rig) -> None:
    """A chunk whose bytes do not match its manifest hash is refused as bad_chunk with
    the snapshot's version as seq; the old list stays and a resync is requested."""
    rig.snapshot(1, [[CARD_A]])
    good = chunk_payloads(2, [[CARD_B]])
    rig.manifest(2, good, entries=1)
    rig.chunk(good[0].replace(b'"index":0', b'"index":0 '))
    assert (rig.last().stream, rig.last().seq, rig.last().reason) == ("list", 2, "bad_chunk")
    assert rig.applier.versions()["list"] == 1
    assert ("bad_snapshot", False) in rig.sent.resyncs
    assert rig.staging_tables() == []


def test_a_credential_twice_in_a_snapshot_is_a_bad_chunk(rig: Rig) -> None:
    """A snapshot that holds one credential hash in two chunks is refused at the second
    as bad_chunk (counted: the office's fault, not the store's), the staging is discarded
    at once, a resync is asked for, and the old list stays in force."""
    rig.snapshot(1, [[CARD_C]])
    chunks = chunk_payloads(2, [[CARD_A], [CARD_B, CARD_A], [CARD_C]])
    rig.manifest(2, chunks, entries=4)
    rig.chunk(chunks[0])
    rig.chunk(chunks[1])
    assert (rig.last().seq, rig.last().status, rig.last().reason) == (2, "refused",
                                                                      "bad_chunk")
    assert rig.applier.counters.refused == {"bad_chunk": 1}
    assert rig.staging_tables() == []
    assert ("bad_snapshot", False) in rig.sent.resyncs
    reports = len(rig.sent.applied)
    rig.chunk(chunks[2])  # the rest of the given-up snapshot is ignored
    assert len(rig.sent.applied) == reports
    assert rig.applier.versions()["list"] == 1
    assert rig.store.lookup(cred(CARD_C)).grant is not None
    assert rig.store.lookup(cred(CARD_A)).grant is None


def test_a_malformed_chunk_with_a_matching_hash_gives_up_the_snapshot(rig: Rig) -> None:
    """A chunk that matches its manifest hash but is not a valid chunk is refused as
    malformed with the snapshot's seq; the staging is discarded and a resync asked for at
    once, and the snapshot's next chunk is ignored without a second refusal."""
    bad = b'{"type":"chunk","version":2,"index":0,"entries":[["not a hash"]]}'
    good = chunk_payloads(2, [[], [CARD_B]])[1]
    rig.manifest(2, [bad, good], entries=1)
    rig.chunk(bad)
    assert (rig.last().seq, rig.last().reason) == (2, "malformed")
    assert rig.staging_tables() == []
    assert rig.sent.resyncs == [("bad_snapshot", False)]
    reports = len(rig.sent.applied)
    rig.chunk(good)
    assert len(rig.sent.applied) == reports
    assert rig.applier.counters.refused == {"malformed": 1}
    assert "list" not in rig.applier.versions()


def test_chunks_after_the_manifests_expiry_still_count(rig: Rig) -> None:
    """Only the manifest's times are checked, when it arrives: chunks that come after its
    expires_at complete the snapshot."""
    chunks = chunk_payloads(1, [[CARD_A], [CARD_B]])
    rig.manifest(1, chunks, entries=2)
    rig.chunk(chunks[0])
    rig.clock.now += 7200  # past the manifest's one-hour lifetime
    rig.chunk(chunks[1])
    assert (rig.last().seq, rig.last().status) == (1, "applied")
    assert rig.store.lookup(cred(CARD_B)).grant is not None


def test_refusal_details_name_no_local_file(rig: Rig) -> None:
    """A snapshot whose staged counts differ from its manifest is refused as bad_snapshot,
    and the detail recorded for the office names no path of the gateway's store."""
    chunks = chunk_payloads(1, [[CARD_A]])
    rig.manifest(1, chunks, entries=2)
    rig.chunk(chunks[0])
    assert (rig.last().seq, rig.last().reason) == (1, "bad_snapshot")
    [event] = rig.store.events(kind="sync_refused")
    assert "staged 1 entries" in event.data["detail"]
    assert str(rig.folder) not in event.data["detail"]
    assert rig.applier.public(f"{rig.store.lists_path}: cannot x") == "<store>: cannot x"


def test_the_last_mode_command_is_what_a_restart_restores(rig: Rig) -> None:
    """A lockdown command followed by status and resync commands leaves lockdown as the
    stored mode a restart restores (agent/runtime.py reads the ``mode`` stream); each
    command is reported applied."""
    for seq, action in enumerate(("lockdown", "status", "resync"), start=1):
        rig.send("cmd", Command(type="command", action=action,  # type: ignore[arg-type]
                                **rig.header(seq)))
    assert rig.host.mode is Mode.LOCKDOWN
    assert rig.sent.statuses == 1 and rig.sent.resyncs == [("command", True)]
    assert [(a.seq, a.status) for a in rig.sent.applied] == [(1, "applied"), (2, "applied"),
                                                             (3, "applied")]
    rig.store.close()
    reopened = Store(rig.folder / "pg.db")
    try:
        assert reopened.stream_detail("mode") == {"mode": "lockdown"}
        assert reopened.versions()["mode"] == 1 and reopened.versions()["cmd"] == 3
    finally:
        reopened.close()
    rig.store = Store(rig.folder / "pg.db")  # for the fixture's close


def test_staleness_is_logged_and_recorded_with_the_same_field_names(rig: Rig) -> None:
    """Past heartbeat_max_age_s without a heartbeat the lists are stale: the sync_stale
    event and log line both carry heartbeat_age_s and policy; a heartbeat makes them fresh."""
    rig.applier.check_stale()
    assert rig.applier.stale is False
    rig.clock.now += 86_401
    with capture_logs() as logs:
        rig.applier.check_stale()
    assert rig.applier.stale is True
    [event] = rig.store.events(kind="sync_stale")
    [line] = [entry for entry in logs if entry["event"] == "sync_stale"]
    assert event.data == {"heartbeat_age_s": 86_401, "policy": "keep_deciding"}
    assert {k: line[k] for k in event.data} == event.data
    rig.send("hb", Heartbeat(type="heartbeat", list_version=0, rev_seq=0, all_seq=0,
                             **rig.header(1)))
    assert rig.applier.stale is False
    assert "sync_fresh" in rig.kinds()


def test_a_restart_in_the_middle_of_a_snapshot_asks_for_it_again(rig: Rig) -> None:
    """The version whose staging began is stored as the ``staging`` stream; a new applier
    that finds it above the list version asks for the list on connect."""
    rig.snapshot(1, [[CARD_A]])
    chunks = chunk_payloads(2, [[CARD_B], [CARD_C]])
    rig.manifest(2, chunks, entries=2)
    rig.chunk(chunks[0])
    assert rig.applier.versions()["staging"] == 2
    after = Applier(rig.store, rig.host, rig.applier.keys, gateway=GW,
                    config=SyncConfig(), outbound=rig.sent, clock=rig.clock)
    rig.sent.resyncs.clear()
    after.on_connected(session_present=True)
    assert rig.sent.resyncs == [("interrupted_snapshot", False)]


def test_deltas_and_acks_apply_and_a_delta_on_the_wrong_base_is_a_gap(rig: Rig) -> None:
    """A delta on the current version applies; one on another base is refused as gap and
    asks for a resync; an ack marks events delivered and is passed on without a report."""
    rig.snapshot(1, [[CARD_A]])
    rig.send("list", Delta(type="delta", base=1, upsert=[Entry(cred=b64(cred(CARD_B)))],
                           remove=[b64(cred(CARD_A))], **rig.header(2)))
    assert (rig.last().seq, rig.last().status) == (2, "applied")
    assert rig.store.lookup(cred(CARD_B)).grant is not None
    assert rig.store.lookup(cred(CARD_A)).grant is None
    rig.send("list", Delta(type="delta", base=5, **rig.header(6)))
    assert (rig.last().seq, rig.last().reason) == (6, "gap")
    assert ("gap", False) in rig.sent.resyncs
    reports = len(rig.sent.applied)
    upto = rig.store.last_seq()
    rig.send("ack", EventAck(type="event_ack", upto=upto + 100, **rig.header(1)))
    assert rig.sent.acked == [upto] and rig.store.first_unacked() is None
    assert len(rig.sent.applied) == reports


def test_enrollment_decisions_apply_once_in_order(rig: Rig) -> None:
    """A signed enrollment decision reaches the host item by item and is reported
    applied; a replay of its seq is refused and applies nothing again."""
    item = Decided(enrollment="0" * 8 + "-0000-4000-8000-" + "0" * 12, status="confirmed",
                   list_version=3)
    decision = EnrollmentDecision(type="enrollment_decision", items=[item],
                                  **rig.header(1))
    rig.send("enr", decision)
    assert rig.host.decided == [item]
    assert (rig.last().stream, rig.last().seq, rig.last().status) == ("enr", 1, "applied")
    rig.send("enr", decision)
    assert rig.host.decided == [item]
    assert (rig.last().status, rig.last().reason) == ("refused", "replay")


def test_enrollment_decision_only_on_its_own_topic(rig: Rig) -> None:
    """An enrollment decision sent on the command topic is refused as wrong_stream."""
    item = Decided(enrollment="1" * 8 + "-0000-4000-8000-" + "1" * 12, status="rejected",
                   reason="officer")
    rig.send("cmd", EnrollmentDecision(type="enrollment_decision", items=[item],
                                       **rig.header(1)))
    assert rig.host.decided == []
    assert rig.last().reason == "wrong_stream"


def test_urgent_messages_apply_between_the_steps_of_a_long_chunk(rig: Rig) -> None:
    """A chunk longer than ``STAGE_ROWS`` is staged in steps, and a revocation handed in
    between two steps is in force before the snapshot is swapped in and stays after it."""
    many = [f"em4100:{0x1000000000 + i:010X}" for i in range(2 * STAGE_ROWS + 10)]
    chunks = chunk_payloads(2, [[CARD_A, *many]])
    rig.manifest(2, chunks, entries=len(many) + 1)
    steps: list[bool] = []

    def between() -> None:
        if not steps:
            rig.send("rev", revocation(rig, 5, CARD_A))
        steps.append(rig.store.lookup(cred(CARD_A)).revoked)

    rig.applier.between_steps = between
    rig.chunk(chunks[0])
    assert steps == [True, True, True]  # three steps; revoked from the first on
    assert [(a.stream, a.seq) for a in rig.sent.applied] == [("rev", 5), ("list", 2)]
    assert rig.applier.versions()["list"] == 2
    assert rig.store.lookup(cred(CARD_A)).revoked
    assert rig.store.lookup(cred(many[-1])).grant is not None


def test_a_heartbeat_finding_no_list_asks_for_one_at_once(rig: Rig) -> None:
    """A heartbeat reaching a gateway that has no list (its request on connecting was
    lost before the office listened) makes it ask for one at once; with a list, not."""
    rig.send("hb", Heartbeat(type="heartbeat", list_version=0, rev_seq=0, all_seq=0,
                             **rig.header(1)))
    assert ("no_list", True) in rig.sent.resyncs
    rig.sent.resyncs.clear()
    rig.snapshot(5, [[CARD_A]])
    rig.send("hb", Heartbeat(type="heartbeat", list_version=5, rev_seq=0, all_seq=0,
                             **rig.header(2)))
    assert rig.sent.resyncs == []
