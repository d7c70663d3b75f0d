"""One person's movements only for a case (provisioning/reconcile/cases.py): ``case``
refuses without a reason and records who, when and why with one; ``events`` shows no card
and no tenant unless asked for a case, which is recorded the same way."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.hashing import CredentialHasher, log_prefix
from tests.test_reconcile import DAY, Clock, Office, run
from tests.test_reconcile_registry import permit

CARD, OTHER = "em4100:67003B51C6", "em4100:67003BA86C"
NUMBER, OTHER_NUMBER = permit(1), permit(2)


@pytest.fixture
def office(tmp_path: Path) -> Iterator[Office]:
    """Two buildings; one tenant with a card in each, another in one; entries, exits
    and a denial; a tenant enrolled at the gateway (its unit and account in the
    event)."""
    now = time.time()
    made = Office(tmp_path / "office", Clock(now))
    with made.at(now - 50 * DAY):
        made.add_gateway("gw-a", "bldg-a")
        made.add_gateway("gw-b", "bldg-b")
    made.enroll("gw-a", CARD, NUMBER, at=now - 40 * DAY)
    made.enroll("gw-b", CARD, NUMBER, at=now - 40 * DAY)
    made.enroll("gw-a", OTHER, OTHER_NUMBER, at=now - 40 * DAY)
    made.taps("gw-a", CARD, [3, 2, 1])
    made.taps("gw-a", CARD, [2.9], direction="exit")
    made.taps("gw-b", CARD, [5], kind="access_denied")
    made.taps("gw-a", OTHER, [2.5, 1.5])
    made.enroll_tenant("gw-a", "em4100:0102030405", permit(3), "301", at=now - DAY,
                       lease_end=now + 100 * DAY, policy="hold")
    yield made
    made.close()


@pytest.mark.parametrize("reason", [None, "", "   ", "x"])
def test_a_case_query_without_a_reason_is_refused_and_shows_nothing(
        office: Office, capsys: pytest.CaptureFixture[str], reason: str | None) -> None:
    """``case --permit N`` without a reason (or with a blank or one-letter one) exits 2
    saying a reason is needed, prints no event and records nothing."""
    args = ["case", "--permit", NUMBER] + ([] if reason is None else ["--reason", reason])
    printed = run(office.folder, *args, check=2)
    assert printed == ""
    assert "needs the reason" in capsys.readouterr().err
    assert office.db.case_records(10) == []


def test_a_case_query_prints_that_persons_entries_and_records_who_when_why(
        office: Office) -> None:
    """With a reason, ``case`` shows every access event of every card of that permit
    (both buildings, nobody else's) and records the officer, the time, the reason,
    whose permit (as its hash) and how many events it showed; ``case --log`` lists it."""
    before = int(time.time() * 1000)
    text = run(office.folder, "case", "--permit", NUMBER, "--reason",
               "case 2026-117: burglary at bldg-a", "--officer", "officer.li", "--json")
    result = json.loads(text)
    prefix_a = log_prefix(office.cred("gw-a", CARD))
    prefix_b = log_prefix(office.cred("gw-b", CARD))
    assert sorted((c["gateway"], c["card"]) for c in result["cards"]) == [
        ("gw-a", prefix_a), ("gw-b", prefix_b)]
    assert [(e["gateway"], e["kind"], e["direction"]) for e in result["events"]] == [
        ("gw-a", "access_granted", "entry"), ("gw-a", "access_granted", "entry"),
        ("gw-a", "access_granted", "entry"), ("gw-a", "access_granted", "exit"),
        ("gw-b", "access_denied", "entry")]
    (record,) = office.db.case_records(10)
    digest = CredentialHasher(office.central.permit_key()).permit(NUMBER)
    assert (record.officer, record.reason, record.scope, record.permit_hash, record.shown) \
        == ("officer.li", "case 2026-117: burglary at bldg-a", "permit", digest, 5)
    assert record.at_ms >= before
    log = run(office.folder, "case", "--log")
    assert f"#{record.id}" in log and "officer.li" in log and "burglary" in log
    assert NUMBER not in log  # the log names the permit by its hash prefix


def test_a_case_query_in_text_shows_times_cards_and_the_record_number(
        office: Office) -> None:
    """The text form says which audit record it made, names the permit's cards and
    lists each event with its time, gateway, card, door and direction."""
    text = run(office.folder, "case", "--permit", NUMBER, "--reason", "case 2026-118 check")
    assert text.startswith("recorded as case query #1\n")
    assert f"permit {NUMBER}: gw-a (bldg-a) card" in text
    assert text.count("access_granted  front/front-en  entry") == 3


def test_events_show_no_card_and_no_tenant_without_a_case(office: Office) -> None:
    """``events GW`` (text and JSON) leaves out the card prefixes and the tenant's unit and
    account, says how to see them, and records nothing."""
    prefixes = [log_prefix(office.cred("gw-a", c)) for c in (CARD, OTHER)]
    text = run(office.folder, "events", "gw-a", "-n", "100")
    assert "access_granted" in text and "CRED" not in text
    assert not any(p in text for p in prefixes)
    assert "add --case REASON" in text
    lines = [json.loads(line) for line in
             run(office.folder, "events", "gw-a", "-n", "100", "--json").splitlines()]
    assert all(ev["cred"] is None for ev in lines)
    (enrolled,) = [ev for ev in lines if ev["kind"] == "tenant_enrolled"]
    assert {"unit", "account"}.isdisjoint(enrolled["data"])
    assert office.db.case_records(10) == []


def test_events_for_a_case_show_the_cards_and_are_recorded(office: Office) -> None:
    """``events GW --case REASON`` shows the card prefixes and records the query (scope
    ``events GW``, no permit, the number of events shown); without a usable reason it is
    refused."""
    run(office.folder, "events", "gw-a", "--case", "?", check=2)
    text = run(office.folder, "events", "gw-a", "-n", "5", "--case",
               "tamper alarm investigation 7", "--officer", "wang")
    assert "CRED" in text
    assert log_prefix(office.cred("gw-a", OTHER)) in text
    (record,) = office.db.case_records(10)
    assert (record.scope, record.officer, record.permit_hash, record.shown) == (
        "events gw-a", "wang", None, 5)


def test_no_office_command_prints_a_timeline_unasked(office: Office, tmp_path: Path) -> None:
    """Neither ``show`` nor ``enrollments`` nor the comparison prints an event time of a
    card: only ``case`` and ``events --case`` do."""
    registry = tmp_path / "r.csv"
    registry.write_text(f"permit_number,building,status\n{NUMBER},bldg-a,active\n", "utf-8")
    texts = [run(office.folder, "show", "--json"), run(office.folder, "enrollments"),
             run(office.folder, "reconcile", "--registry", str(registry), "--show", "50")]
    for ts_ms in office.event_times:
        for text in texts:
            assert str(ts_ms) not in text


def test_the_privacy_document_cites_only_tests_that_exist() -> None:
    """Every ``tests/file.py::test_name`` docs/privacy.md cites is a test of that file,
    and every datum of its table names at least one."""
    from tests.test_security_doc import citations, collected_tests  # noqa: PLC0415

    repo = Path(__file__).resolve().parent.parent
    text = (repo / "docs" / "privacy.md").read_text("utf-8")
    cited = citations(text)
    assert cited
    missing = [f"{f}::{t}" for f, t in cited
               if t not in collected_tests(repo / "tests" / f)]
    assert not missing, missing
    table = text.split("## Every personal datum", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| **")]
    assert len(rows) >= 10
    assert all(citations(row) for row in rows)
