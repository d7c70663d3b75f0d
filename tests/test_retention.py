"""Retention at the office (provisioning/retention.py): old events folded into daily
counts per gateway and deleted, exactly once, never what the office still needs; the
permit numbers of long-ended enrollments dropped; applied by ``serve`` by itself when
configured."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.chain import Event
from protocol.hashing import log_prefix
from protocol.topics import Topics
from provisioning.central import Central
from provisioning.receive import Receiver
from provisioning.retention import LAST_RUN_KEY, Retention
from tests.broker import Broker
from tests.conftest import wait_for
from tests.test_central import Serving
from tests.test_reconcile import DAY, Clock, Office, run
from tests.test_reconcile_registry import permit

CARD = "em4100:67003B51C6"


@pytest.fixture
def office(tmp_path: Path) -> Iterator[Office]:
    """An office with gateway gw-a, registered long ago, and one listed card."""
    now = time.time()
    made = Office(tmp_path / "office", Clock(now))
    with made.at(now - 400 * DAY):
        made.add_gateway("gw-a", "bldg-a")
    made.enroll("gw-a", CARD, permit(1), at=now - 300 * DAY)
    yield made
    made.close()


def counts(office: Office) -> dict[int, tuple[int, int, int, int]]:
    """The daily counts table: day → (entries, exits, denied, other)."""
    return {day: (e, x, d, o) for day, e, x, d, o in office.db.conn().execute(
        "SELECT day, entries, exits, denied, other FROM daily_counts ORDER BY day")}


def stored(office: Office, gateway: str = "gw-a") -> list[int]:
    """The seqs the office still stores for a gateway."""
    return [s.event.seq for s in office.db.events(gateway, after_seq=0, limit=None)]


def entries_per_day(office: Office) -> dict[int, int]:
    """Granted entries per day as the charts count them (daily counts and events)."""
    return {r.day: r.entries for r in office.db.daily_entries(0, 0)}


def test_old_events_are_folded_into_daily_counts_and_deleted(office: Office) -> None:
    """``retention --days 30`` deletes every event older than the start of the day 30
    days back, after counting them per day as entries, exits, denials and others; the
    newer events stay, and the entries per day the charts show do not change."""
    office.taps("gw-a", CARD, [40.2, 40.1, 35])
    office.taps("gw-a", CARD, [39], direction="exit")
    office.taps("gw-a", CARD, [38], kind="access_denied")
    office.send("gw-a", [(office.clock.now - 37 * DAY, Event("door_forced", door="front"),
                          None)])
    office.taps("gw-a", CARD, [2, 1])
    before = entries_per_day(office)
    text = run(office.folder, "retention", "--days", "30")
    assert "6 folded into daily counts, 6 deleted" in text
    assert stored(office) == [7, 8]
    assert entries_per_day(office) == before
    assert sum(e for e, _, _, _ in counts(office).values()) == 3
    assert [sum(c[i] for c in counts(office).values()) for i in range(4)] == [3, 1, 1, 1]


def test_folding_stops_at_the_first_recent_event_and_at_the_ack(office: Office) -> None:
    """Like the gateway's pruning, only a prefix of the chain goes: an old event after a
    recent one stays (its clock was wrong), and so does every event past a gap in what
    the office stored (it may be sent again; it is not acknowledged)."""
    now = office.clock.now
    office.taps("gw-a", CARD, [60, 59, 1, 58])         # seqs 1-4: 4 is stamped old
    seq, prev = office.chains["gw-a"]
    office.chains["gw-a"] = (seq + 1, prev)            # seq 5 never arrives
    office.taps("gw-a", CARD, [57, 56])                # seqs 6-7, past the gap
    gateway = office.db.gateway("gw-a")
    assert gateway is not None and gateway.acked_upto == 4
    result = Retention(office.db, clock=lambda: now).run(30)
    assert (result.folded, result.deleted) == (2, 2)
    assert stored(office) == [3, 4, 6, 7]


def test_a_tenant_event_not_acted_on_is_kept(office: Office) -> None:
    """An old ``tenant_enrolled`` the office has not acted on yet (here: received by an
    office without its tenants room) stays, with everything after it, for when it is."""
    office.taps("gw-a", CARD, [80])
    plain = Receiver(office.db, office.publisher, clock=office.clock)
    office.receiver, tenants_receiver = plain, office.receiver
    office.send("gw-a", [(office.clock.now - 79 * DAY, Event(
        "tenant_enrolled", cred=log_prefix(office.cred("gw-a", CARD)),
        data={"enrollment": "5b0c7f0e-3c2a-4d8e-9a61-2f4b8d7e1c90"}), None)])
    office.taps("gw-a", CARD, [78])
    office.receiver = tenants_receiver
    Retention(office.db, clock=office.clock).run(30)
    assert stored(office) == [2, 3]


def test_an_event_sent_again_after_folding_is_not_counted_twice(office: Office) -> None:
    """A gateway that missed the ack sends old events again after the office folded
    them: they are deleted again at the next run without being counted again."""
    messages = office.taps("gw-a", CARD, [50, 49])
    retention = Retention(office.db, clock=office.clock)
    assert retention.run(30).folded == 2
    for message in messages:
        office.receiver.handle(Topics("gw-a").outbound("events"), message)
    assert stored(office) == [1, 2]
    again = retention.run(30)
    assert (again.folded, again.deleted) == (0, 2)
    assert sum(e for e, _, _, _ in counts(office).values()) == 2


def test_ended_enrollments_lose_their_permit_numbers(office: Office) -> None:
    """An enrollment that ended before the retention period keeps its unit and card but
    no longer its permit number or hash; one that ended within it keeps both."""
    now = office.clock.now
    old = office.enroll_tenant("gw-a", "em4100:0102030405", permit(2), "301",
                               at=now - 60 * DAY, lease_end=now + 300 * DAY, policy="auto")
    recent = office.enroll_tenant("gw-a", "em4100:0102030406", permit(3), "302",
                                  at=now - 20 * DAY, lease_end=now + 300 * DAY,
                                  policy="auto")
    for enrollment, card, ended in ((old, "em4100:0102030405", 40),
                                    (recent, "em4100:0102030406", 5)):
        with office.at(now - ended * DAY):
            office.send("gw-a", [(now - ended * DAY, Event(
                "tenant_moved_out", cred=log_prefix(office.cred("gw-a", card)),
                data={"enrollment": enrollment, "unit": "3", "account": "landlord"}),
                None)])
    assert run(office.folder, "retention", "--days", "30").count("from 1 ended") == 1
    by_id = {e.id: e for e in office.db.enrollments("gw-a")}
    assert (by_id[old].permit, by_id[old].permit_hash, by_id[old].unit) == (None, None, "301")
    assert (by_id[recent].permit, by_id[recent].status) == (permit(3), "ended")


def test_the_retention_command_shows_and_changes_the_setting(office: Office) -> None:
    """``retention`` shows whether serve applies a setting; ``--days N --auto`` applies
    it now and keeps it; ``--off`` clears it; out-of-range or incomplete options are
    refused."""
    assert "serve applies no retention" in run(office.folder, "retention")
    text = run(office.folder, "retention", "--days", "90", "--auto")
    assert "serve keeps events 90 days, applied hourly (last never)" in text
    assert Retention(office.db).setting() == 90
    run(office.folder, "retention", "--off")
    assert Retention(office.db).setting() is None
    run(office.folder, "retention", "--auto", check=2)
    run(office.folder, "retention", "--days", "5000", check=2)
    with pytest.raises(SystemExit):
        run(office.folder, "retention", "--days", "0")


def test_serve_applies_the_setting_by_itself(office: Office, broker: Broker) -> None:
    """With a setting kept, a running ``serve`` folds and deletes old events without
    being asked, and notes when it did."""
    office.taps("gw-a", CARD, [70, 69, 1])
    Retention(office.db).set_setting(30)
    serving = Serving(Central(office.folder, broker.host, broker.port))
    try:
        wait_for(lambda: stored(office) == [3], "serve to fold the old events")
        wait_for(lambda: office.db.meta(LAST_RUN_KEY), "serve to note its retention run")
    finally:
        serving.stop()
    assert sum(e for e, _, _, _ in counts(office).values()) == 2
