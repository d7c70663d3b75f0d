"""Size limits that agree: protocol counts, the gateway's max_message_bytes, the broker.

The largest messages whose size the protocol bounds by a count (a revocation of
``MAX_ITEMS`` items, the manifest of a snapshot of ``MAX_CHUNKS`` chunks) are built with
every field at its longest, signed, and measured against the default
``sync.max_message_bytes`` and the shipped broker's ``message_size_limit``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from agent.config import SyncConfig
from agent.store import Store
from agent.sync import fit_batch
from protocol.chain import Event
from protocol.messages import (
    MAX_CHUNKS,
    MAX_ITEMS,
    MAX_MESSAGE_BYTES,
    EventBatch,
    Revocation,
    Revoked,
    Snapshot,
)
from protocol.signing import sign
from protocol.topics import Topics

REPO = Path(__file__).resolve().parent.parent
LONGEST_GATEWAY = "g" * 63
LONGEST_KID = "k" * 64
HIGHEST = 2**53
"""seq's upper bound; used for every integer of the header and the counts."""
A_HASH = "A" * 43 + "="


def broker_limit() -> int:
    """``message_size_limit`` as config/mosquitto/permitgate.conf ships it."""
    text = (REPO / "config" / "mosquitto" / "permitgate.conf").read_text("utf-8")
    [value] = re.findall(r"^message_size_limit\s+(\d+)\s*$", text, re.MULTILINE)
    return int(value)


def header() -> dict[str, object]:
    """A header with every field at its longest."""
    return {"gateway": LONGEST_GATEWAY, "seq": HIGHEST, "issued_at": HIGHEST,
            "expires_at": HIGHEST}


def signed_size(topic: str, body: Revocation | Snapshot) -> int:
    """The payload size of ``body`` signed for ``topic`` under the longest key id."""
    return len(sign(Ed25519PrivateKey.generate(), LONGEST_KID, topic, body))


def test_the_gateway_accepts_what_the_broker_forwards() -> None:
    """The default max_message_bytes is the shipped broker's message_size_limit (and the
    protocol's MAX_MESSAGE_BYTES): neither side promises a size the other drops."""
    assert SyncConfig().max_message_bytes == MAX_MESSAGE_BYTES == broker_limit()


def test_a_maximal_revocation_fits_both_limits() -> None:
    """A revocation of MAX_ITEMS credential hashes, every header field at its longest,
    signed, fits the default max_message_bytes and the broker's limit."""
    body = Revocation(type="revocation", items=[Revoked(kind="credential", hash=A_HASH)]
                      * MAX_ITEMS, **header())  # type: ignore[arg-type]
    size = signed_size(Topics(LONGEST_GATEWAY).inbound("rev"), body)
    assert size <= SyncConfig().max_message_bytes
    assert size <= broker_limit()


def test_a_maximal_manifest_fits_both_limits() -> None:
    """The manifest of a snapshot of MAX_CHUNKS chunks, every field at its longest,
    signed, fits the default max_message_bytes and the broker's limit."""
    body = Snapshot(type="snapshot", entries=HIGHEST, revoked=HIGHEST,
                    chunk_sha256=["f" * 64] * MAX_CHUNKS, rev_seq=HIGHEST, all_seq=HIGHEST,
                    **header())  # type: ignore[arg-type]
    size = signed_size(Topics(LONGEST_GATEWAY).inbound("list"), body)
    assert size <= SyncConfig().max_message_bytes
    assert size <= broker_limit()


def test_one_more_item_or_chunk_is_refused() -> None:
    """A revocation of MAX_ITEMS + 1 items and a manifest of MAX_CHUNKS + 1 chunks are
    not valid messages."""
    with pytest.raises(ValidationError, match="items"):
        Revocation(type="revocation", items=[Revoked(kind="permit", hash=A_HASH)]
                   * (MAX_ITEMS + 1), **header())  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="chunk_sha256"):
        Snapshot(type="snapshot", entries=0, revoked=0, chunk_sha256=["f" * 64]
                 * (MAX_CHUNKS + 1), rev_seq=0, all_seq=0, **header())  # type: ignore[arg-type]


def test_an_event_batch_is_cut_to_fit_max_message_bytes(tmp_path: Path) -> None:
    """A batch of events larger than max_message_bytes is cut to a prefix that fits (the
    broker would forward nothing larger); a batch that fits goes whole."""
    store = Store(tmp_path / "pg.db")
    try:
        for i in range(40):
            store.append(Event("sync_refused", reason="malformed",
                               data={"detail": "x" * 200, "count": i}))
        events = store.events()
        whole, count = fit_batch("gw-1", events, 1 << 20)
        assert count == 40
        limit = len(whole) // 3
        payload, count = fit_batch("gw-1", events, limit)
        assert 0 < count < 40 and len(payload) <= limit
        batch = EventBatch.model_validate_json(payload)
        assert [e.seq for e in batch.events] == [e.seq for e in events[:count]]
    finally:
        store.close()
