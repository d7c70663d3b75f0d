"""The cap on stored events: past ``max_events`` with nothing delivered, the oldest
undelivered events are dropped with an ``events_dropped`` record, and the office
acknowledges across the declared gap so the outbox drains again."""

from __future__ import annotations

import json
from pathlib import Path

from agent.config import load_config
from agent.runtime import Agent
from agent.sync import fit_batch
from drivers.simulated import SimBus
from protocol.chain import Event
from protocol.messages import EventBatch
from provisioning.db.sqlite import SqliteOfficeDatabase
from provisioning.receive import _record, chain_problems
from tests.agentconf import write_agent

CAP = 1000


def capped_agent(folder: Path) -> Agent:
    """A started agent that keeps undelivered events (sync on, no office answering) with
    the smallest cap."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trusted-keys.txt").write_text("k1 " + "A" * 43 + "=\n")
    config = write_agent(folder, store={"max_events": CAP}, sync={
        "enabled": True, "tls": False, "host": "127.0.0.1", "port": 1,
        "trusted_keys": "./trusted-keys.txt"})
    agent = Agent(load_config(config), config_path=config, bus=SimBus())
    agent.start()
    return agent


def test_over_the_cap_the_oldest_undelivered_go_with_a_record(tmp_path: Path) -> None:
    """With every event undelivered and more than max_events stored, pruning drops the
    oldest down to the cap, records events_dropped naming the range, flags the outbox in
    status, and the chain still verifies from its anchor."""
    agent = capped_agent(tmp_path)
    try:
        store = agent.tenant_store()
        for i in range(CAP + 300):
            store.append(Event("test_filler", data={"i": i}))
        agent.prune()
        (dropped,) = store.events(kind="events_dropped")
        assert dropped.reason == "outbox_full"
        assert dropped.data["first_seq"] == 1
        assert dropped.data["count"] == dropped.data["last_seq"] >= 300
        # the cap, plus the record of the drop and the high-water alarm written after it
        assert store.counts()["events"] <= CAP + 2
        assert store.first_unacked() == dropped.data["last_seq"] + 1
        assert store.verify_chain().ok
        states = {(r["kind"], r["id"]): json.loads(r["state"]) for r in store.device_states()}
        assert states[("system", "outbox")]["state"] == "overflow"
    finally:
        agent.stop()


def test_office_acknowledges_across_a_declared_gap(tmp_path: Path) -> None:
    """The office stores the batch after the gap, and its acknowledgement passes the
    dropped range the events_dropped event declares (without it, it stops at the gap)."""
    agent = capped_agent(tmp_path / "gw")
    try:
        store = agent.tenant_store()
        before = store.last_seq()
        for i in range(CAP + 50):
            store.append(Event("test_filler", data={"i": i}))
        office = SqliteOfficeDatabase(tmp_path / "central.db")
        assert office.add_gateway("test-gw", "test-site", str(tmp_path / "k"), 0, 1)
        early = store.events(limit=before)
        payload, _ = fit_batch("test-gw", early, 1 << 22)
        batch = EventBatch.model_validate_json(payload)
        office.store_events("test-gw", [_record(e) for e in batch.events], 1,
                            lambda a: chain_problems(batch.events[a.index], a))
        agent.prune()
        first = store.first_unacked()
        assert first is not None
        rest = store.events(after_seq=first - 1)
        payload, count = fit_batch("test-gw", rest, 1 << 22)
        batch = EventBatch.model_validate_json(payload)
        stored = office.store_events("test-gw", [_record(e) for e in batch.events], 2,
                                     lambda a: chain_problems(batch.events[a.index], a))
        assert stored.acked_upto == batch.events[count - 1].seq
    finally:
        agent.stop()
