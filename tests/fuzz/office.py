"""Fuzz target of the office's receiving side (provisioning/receive.py) on a real office
database: the fuzz bytes are a sequence of gateway messages on gateway topics.

The contract: ``Receiver.parse`` returns a body naming the topic's registered gateway or
None, counting the message as malformed (or ignoring a cleared status); ``handle``, which
stores and answers what parse accepted, never raises on a message a gateway sends: the
serve loop acknowledges a message even when handling it failed, then backs off for up to
30 s, so one crashing message would be lost and would stall every gateway's traffic.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from protocol.chain import GENESIS, Event, event_hash
from protocol.topics import Topics
from provisioning.db.sqlite import SqliteOfficeDatabase
from provisioning.keys import OfficeKeys, keygen
from provisioning.publish import Publisher
from provisioning.receive import Receiver
from tests.fuzz.common import Cursor, Target, pack_blob
from tests.fuzz.protocol import GW, NOW
from tests.fuzz.strategies import mutate_json
from tests.fuzz.sync import TMP_ROOT

_KEYS = tempfile.TemporaryDirectory(prefix="permitgate-fuzz-office-")
"""The office folder with its signing keys, made once per process."""
_made: list[OfficeKeys] = []

TOPICS = [Topics(GW).outbound(k) for k in ("events", "status", "applied", "request")] + [
    Topics("gw-2").outbound("events"), Topics("gw-9").outbound("status"),
    "pg/v1/gw/gw-1/out", Topics(GW).outbound("nonsense")]
"""Each registered gateway's topics, an unknown gateway's, and malformed ones."""
MAX_MESSAGES = 8


def _keys() -> OfficeKeys:
    if not _made:
        folder = Path(_KEYS.name)
        keygen(folder)
        _made.append(OfficeKeys(folder))
    return _made[0]


def office_receive(data: bytes) -> None:
    """A sequence of gateway messages: parse names the topic's gateway or counts the
    message malformed, and handle stores and answers without raising."""
    with tempfile.TemporaryDirectory(prefix="pg-office-", dir=TMP_ROOT) as folder:
        db = SqliteOfficeDatabase(Path(folder) / "office.db")
        try:
            sent: list[tuple[str, bytes]] = []
            for gateway in (GW, "gw-2"):
                db.add_gateway(gateway, "site-1", str(Path(folder) / "site.key"), 0,
                               NOW * 1000)
            publisher = Publisher(db, _keys(), lambda t, p: sent.append((t, p)),
                                  clock=lambda: float(NOW))
            receiver = Receiver(db, publisher, clock=lambda: float(NOW))
            for count, blob in enumerate(Cursor(data).blobs()):
                if count >= MAX_MESSAGES:
                    break
                topic = TOPICS[blob[0] % len(TOPICS)] if blob else TOPICS[0]
                payload = blob[1:]
                malformed = receiver.malformed
                parsed = receiver.parse(topic, payload)
                if parsed is None:
                    assert receiver.malformed == malformed + 1 or (
                        topic.endswith("/status") and not payload)
                    continue
                gateway, body = parsed
                assert topic.split("/")[3] == gateway == body.gateway
                receiver.handle(topic, payload)
        finally:
            db.close()


def _events(count: int) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    prev = GENESIS
    for seq in range(1, count + 1):
        event_id = f"0190f5c2-7b1e-7a3c-8f00-{seq:012d}"
        ts_ms = NOW * 1000 + seq
        event = Event("access_granted", door="front", reader="front-in", direction="entry",
                      reason="granted", cred="0a1b2c3d4e", data={"ms": 1.1})
        digest = event_hash(prev, seq, event_id, ts_ms, event)
        out.append({"seq": seq, "event_id": event_id, "ts_ms": ts_ms, "kind": event.kind,
                    "door": event.door, "reader": event.reader, "direction": event.direction,
                    "reason": event.reason, "cred": event.cred, "data": dict(event.data),
                    "prev_hash": prev, "hash": digest})
        prev = digest
    return out


def _seeds() -> list[bytes]:
    batch = {"type": "events", "gateway": GW, "events": _events(3)}
    status = {"type": "status", "gateway": GW, "state": "online", "versions": {"list": 1}}
    applied = {"type": "applied", "gateway": GW, "stream": "list", "seq": 1,
               "status": "refused", "reason": "gap", "list_version": 1, "ts_ms": NOW * 1000}
    resync = {"type": "resync", "gateway": GW, "reason": "gap", "list_version": 0,
              "rev_seq": 0, "all_seq": 0, "ts_ms": NOW * 1000}
    return [pack_blob(b"\x00" + json.dumps(batch).encode())
            + pack_blob(b"\x00" + json.dumps(batch).encode()),
            pack_blob(b"\x01" + json.dumps(status).encode()) + pack_blob(b"\x01")
            + pack_blob(b"\x02" + json.dumps(applied).encode())
            + pack_blob(b"\x03" + json.dumps(resync).encode())]


def _templates() -> list[tuple[int, object]]:
    return [(0, {"type": "events", "gateway": GW, "events": _events(2)}),
            (1, {"type": "status", "gateway": GW, "state": "online", "versions": {"list": 1},
                 "doors": {"front": {"state": "locked"}}}),
            (2, {"type": "applied", "gateway": GW, "stream": "list", "seq": 1,
                 "status": "applied", "list_version": 1, "ts_ms": NOW * 1000}),
            (3, {"type": "resync", "gateway": GW, "reason": "gap", "list_version": 0,
                 "rev_seq": 0, "all_seq": 0, "ts_ms": NOW * 1000})]


@st.composite
def _message(draw: st.DrawFn) -> bytes:
    topic, template = draw(st.sampled_from(_templates()))
    if draw(st.integers(0, 5)) == 0:
        topic = draw(st.integers(0, len(TOPICS) - 1))
    return pack_blob(bytes([topic]) + json.dumps(draw(mutate_json(template))).encode())


def _structured() -> st.SearchStrategy[bytes]:
    return st.lists(_message(), min_size=1, max_size=4).map(b"".join)


TARGETS: list[Target] = [
    Target("office_receive", office_receive, 16384,
           "receive.Receiver.parse + handle on a real office database", _seeds, _structured),
]
