"""Fuzz test of the gateway's sync applier on a real store (tests/fuzz/sync.py): sequences
of raw, signed, forged, replayed messages and whole snapshots."""

from __future__ import annotations

import json

import pytest
from hypothesis import given

from protocol.messages import Applied
from tests.fuzz import TARGETS, sync
from tests.fuzz.common import fuzz_settings, pack_blob, tolerant
from tests.fuzz.protocol import BODIES
from tests.fuzz.strategies import inputs


def test_the_seeds_reach_every_kind_of_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed inputs get a snapshot and a delta, a revocation, a command and an
    enrollment decision applied and a forgery refused, so the target's checks are not
    vacuous."""
    applied: list[Applied] = []
    original = sync.Sent.send_applied

    def keep(self: sync.Sent, message: Applied) -> None:
        applied.append(message)
        original(self, message)

    monkeypatch.setattr(sync.Sent, "send_applied", keep)
    for seed in TARGETS["sync_apply"].seeds():
        sync.sync_apply(seed)
    streams = {(a.stream, a.status) for a in applied}
    assert {("list", "applied"), ("rev", "applied"), ("cmd", "applied"),
            ("enr", "applied"), ("rev", "refused")} <= streams, streams


def test_a_forged_revocation_changes_nothing() -> None:
    """A revocation signed by an untrusted key under the trusted key id is refused and
    applies nothing (the target asserts it)."""
    body = next(b for b in BODIES if b["type"] == "revocation")
    sync.sync_apply(pack_blob(bytes([sync.FORGED << 3 | 1]) + json.dumps(body).encode()))


@fuzz_settings(0.25)
@given(inputs(TARGETS["sync_apply"]))
def test_message_sequences_never_roll_back_or_apply_forgeries(data: bytes) -> None:
    """Any sequence of central messages leaves versions never lower, forgeries and
    replays to other topics unapplied, only documented refusals and a whole chain."""
    tolerant(TARGETS["sync_apply"])(data)
