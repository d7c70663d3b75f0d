"""The comparison with the police registry (provisioning/reconcile/): every kind of finding
planted and found, the outputs against their schema, the page self-contained, and what
the comparison keeps to itself.

The office's data is made through the office's own code: ``Central.enroll`` for cards
the office lists, and gateway messages (events with their hash chain, ``tenant_enrolled``
with a sealed permit number, statuses) handed to the office's real ``Receiver``, whose
tenants room unseals, checks and confirms or holds them and whose publisher signs what
it would send (recorded here instead of a broker). The registry is a CSV file; the
comparison runs as ``permitgate-central reconcile`` in this process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from protocol.chain import GENESIS, Event, event_hash
from protocol.hashing import CredentialHasher, log_prefix
from protocol.sealing import load_public_key, seal
from protocol.signing import b64
from protocol.topics import Topics
from provisioning.central import SEAL_PUBLIC_NAME, Central, keygen
from provisioning.central_cli import main
from provisioning.db import FINDING_KINDS
from provisioning.db.sqlite import SqliteOfficeDatabase
from provisioning.keys import OfficeKeys
from provisioning.publish import Publisher, PublishSnapshot
from provisioning.receive import Receiver
from provisioning.reconcile.findings import iso_day
from provisioning.reconcile.schema import SCHEMA_NAME, Report, schema
from provisioning.retention import RETENTION_KEY, local_offset_s
from provisioning.tenants import Tenants
from tests.broker import Broker
from tests.test_reconcile_registry import permit

REPO = Path(__file__).resolve().parent.parent
DAY = 86_400


class Clock:
    """The office's clock, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Office:
    """A central folder made by ``keygen``, fed through the office's own rooms."""

    folder: Path
    clock: Clock
    central: Central = field(init=False)
    db: SqliteOfficeDatabase = field(init=False)
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    chains: dict[str, tuple[int, str]] = field(default_factory=dict)
    site_keys: dict[str, bytes] = field(default_factory=dict)
    event_times: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        keygen(self.folder)
        self.central = Central(self.folder, clock=self.clock)
        self.db = SqliteOfficeDatabase(self.folder / "central.db")
        keys = OfficeKeys(self.folder)
        self.publisher = Publisher(self.db, keys, lambda t, p: self.sent.append((t, p)),
                                   clock=self.clock)
        self.tenants = Tenants(self.db, keys, self.publisher, clock=self.clock)
        self.receiver = Receiver(self.db, self.publisher, clock=self.clock,
                                 tenants=self.tenants)
        self.seal_public = load_public_key(self.folder / SEAL_PUBLIC_NAME)

    def close(self) -> None:
        """Close both handles on the database."""
        self.central.close()
        self.db.close()

    @contextmanager
    def at(self, when: float) -> Iterator[None]:
        """The office's clock at ``when`` for the block."""
        before, self.clock.now = self.clock.now, when
        try:
            yield
        finally:
            self.clock.now = before

    def add_gateway(self, gateway: str, site: str) -> None:
        """Register a gateway with a site key of its own."""
        self.site_keys[gateway] = os.urandom(32)
        self.central.add_gateway(gateway, site, self.site_keys[gateway])

    def cred(self, gateway: str, card: str) -> bytes:
        """The card's credential hash at that gateway."""
        return CredentialHasher(self.site_keys[gateway]).credential(card)

    def enroll(self, gateway: str, card: str, number: str, *, at: float,
               until: float | None = None) -> None:
        """``permitgate-central enroll`` at ``at``."""
        with self.at(at):
            self.central.enroll(gateway, card, number,
                                valid_until=None if until is None else int(until))

    def send(self, gateway: str, events: list[tuple[float, Event, str | None]]
             ) -> list[bytes]:
        """Events (time, event, attachment) continuing the gateway's chain, delivered as
        the gateway delivers them and handled by the office's receiver; the messages."""
        seq, prev = self.chains.get(gateway, (0, GENESIS))
        wire = []
        for when, ev, attachment in events:
            seq += 1
            ts_ms = int(when * 1000)
            event_id = str(uuid.uuid4())
            digest = event_hash(prev, seq, event_id, ts_ms, ev)
            wire.append({"seq": seq, "event_id": event_id, "ts_ms": ts_ms, "kind": ev.kind,
                         "door": ev.door, "reader": ev.reader, "direction": ev.direction,
                         "reason": ev.reason, "cred": ev.cred, "data": dict(ev.data),
                         "prev_hash": prev, "hash": digest,
                         **({"attachment": attachment} if attachment else {})})
            prev = digest
            self.event_times.append(ts_ms)
        self.chains[gateway] = (seq, prev)
        messages = []
        for start in range(0, len(wire), 500):
            body = {"type": "events", "gateway": gateway, "events": wire[start:start + 500]}
            messages.append(json.dumps(body).encode())
            self.receiver.handle(Topics(gateway).outbound("events"), messages[-1])
        return messages

    def taps(self, gateway: str, card: str, days_ago: list[float], *,
             kind: str = "access_granted", direction: str = "entry") -> list[bytes]:
        """The card at the front door ``days_ago`` (received now); the messages."""
        prefix = log_prefix(self.cred(gateway, card))
        reason = "granted" if kind == "access_granted" else "revoked"
        return self.send(gateway, [(self.clock.now - d * DAY, Event(
            kind, door="front", reader=f"front-{direction[:2]}", direction=direction,
            reason=reason, cred=prefix), None) for d in days_ago])

    def enroll_tenant(self, gateway: str, card: str, number: str, unit: str, *,
                      at: float, lease_end: float, policy: str) -> str:
        """A landlord's enrollment at the gateway (``tenant_enrolled`` with the permit
        sealed to the office), received at ``at`` under ``policy``; its id."""
        enrollment = str(uuid.uuid4())
        cred = self.cred(gateway, card)
        attachment = json.dumps({"cred": b64(cred), "permit_sealed": seal(
            self.seal_public, number, gateway=gateway, enrollment_id=enrollment)},
            sort_keys=True, separators=(",", ":"))
        with self.at(at):
            self.tenants.set_policy(policy)
            self.send(gateway, [(at, Event("tenant_enrolled", cred=log_prefix(cred), data={
                "enrollment": enrollment, "unit": unit, "lease_end": int(lease_end),
                "provisional_until": int(min(lease_end, at + 3 * DAY)),
                "account": "landlord",
                "attachment_sha256": hashlib.sha256(attachment.encode()).hexdigest()}),
                attachment)])
        return enrollment

    def status(self, gateway: str, *, at: float, behind: bool = False) -> None:
        """The gateway's retained status at ``at``: its versions as the office sent
        them, or (``behind``) nothing applied yet."""
        record = self.db.gateway(gateway)
        assert record is not None
        versions = {} if behind else {"list": record.list_version, "rev": record.rev_seq,
                                      "all": self.db.all_seq()}
        body = {"type": "status", "gateway": gateway, "state": "online",
                "ts_ms": int(at * 1000), "site": record.site, "versions": versions}
        with self.at(at):
            self.receiver.handle(Topics(gateway).outbound("status"), json.dumps(body).encode())


def run(folder: Path, *args: str, check: int = 0) -> str:
    """``permitgate-central --dir FOLDER ARGS`` in this process; its output (or, with a
    non-zero ``check``, what it wrote to stderr is not captured: the exit is checked)."""
    out = io.StringIO()
    assert main(["--dir", str(folder), *args], out) == check, out.getvalue()
    return out.getvalue()


def as_of(when: float) -> str:
    """``--as-of`` for an instant."""
    return datetime.fromtimestamp(when, UTC).isoformat()


# -- the planted office -------------------------------------------------------------------

P = {name: permit(n) for n, name in enumerate(
    ("A1", "A2", "A3", "B1", "U", "V", "I", "E", "N", "Q", "T", "L", "C1", "LAPSED", "OUT",
     "DUP"), start=1)}
"""Permit numbers by role: A*/B* background at buildings a and b, U unregistered, V a
provisional enrollment nobody registered, I moved out, E expired, N registered without a
card, Q quiet, T two buildings, L lease ended, C1 at the silent gateway."""
CARDS = {name: f"em4100:{n:010X}" for n, name in enumerate(P, start=0x1000)}
EXPECTED = {
    ("unregistered_resident", "bldg-a", "gw-a", P["U"]),
    ("unregistered_resident", "bldg-b", "gw-b", P["V"]),
    ("registry_inactive_but_open", "bldg-a", "gw-a", P["I"]),
    ("registry_inactive_but_open", "bldg-b", "gw-b", P["E"]),
    ("registered_no_card", "bldg-b", None, P["N"]),
    ("no_entry_since", "bldg-a", "gw-a", P["Q"]),
    ("permit_in_two_buildings", "bldg-a", "gw-a", P["T"]),
    ("permit_in_two_buildings", "bldg-b", "gw-b", P["T"]),
    ("lease_ended_still_active", "bldg-b", "gw-b", P["L"]),
    ("gateway_silent", "bldg-c", "gw-c", None),
    ("list_stale", "bldg-d", "gw-d", None),
}


@dataclass
class Planted:
    """The planted office, its registry file, and one comparison's outputs."""

    office: Office
    registry: Path
    now: float
    output: str
    report: dict[str, Any]
    out: Path


def plant(folder: Path, now: float) -> tuple[Office, Path]:
    """An office with one of every finding (``EXPECTED``) among findings-free cards."""
    office = Office(folder / "office", Clock(now))
    long_ago = now - 100 * DAY
    with office.at(now - 200 * DAY):
        for gw, site in (("gw-a", "bldg-a"), ("gw-b", "bldg-b"), ("gw-c", "bldg-c"),
                         ("gw-d", "bldg-d")):
            office.add_gateway(gw, site)
    listed = {"gw-a": ("A1", "A2", "A3", "U", "I", "Q", "T"),
              "gw-b": ("B1", "E", "T"), "gw-c": ("C1",)}
    for gw, names in listed.items():
        for name in names:
            office.enroll(gw, CARDS[name], P[name], at=long_ago)
    # L: enrolled at the gateway, confirmed, then listed again by the office without an
    # end; the lease ended a month ago.
    office.enroll_tenant("gw-b", CARDS["L"], P["L"], "205", at=now - 60 * DAY,
                         lease_end=now - 30 * DAY, policy="auto")
    office.enroll("gw-b", CARDS["L"], P["L"], at=now - 59 * DAY)
    # V: enrolled at the gateway yesterday, held for an officer: provisional access.
    office.enroll_tenant("gw-b", CARDS["V"], P["V"], "206", at=now - DAY,
                         lease_end=now + 300 * DAY, policy="hold")
    for gw, names in (("gw-a", ("A1", "A2", "A3", "U", "I", "T")),
                      ("gw-b", ("B1", "E", "T", "L"))):
        for name in names:
            office.taps(gw, CARDS[name], [1.2, 2.5, 4.1])
            office.taps(gw, CARDS[name], [1.1, 2.4], direction="exit")
    office.taps("gw-a", CARDS["Q"], [45, 50])
    office.taps("gw-a", CARDS["A1"], [3.3], kind="access_denied")
    with office.at(now - 2 * 3600):
        office.publisher.perform(PublishSnapshot("gw-d"))
    for gw in ("gw-a", "gw-b"):
        office.status(gw, at=now - 60)
    office.status("gw-d", at=now - 60, behind=True)
    office.status("gw-c", at=now - 3 * DAY)
    registry = folder / "registry.csv"
    rows = ["证件号码,房屋编号,房号,登记日期,有效期至,状态"]
    for name, site, unit in (("A1", "bldg-a", "101"), ("A2", "bldg-a", "102"),
                             ("A3", "bldg-a", "103"), ("Q", "bldg-a", "104"),
                             ("T", "bldg-a", "105"), ("B1", "bldg-b", "201"),
                             ("T", "bldg-b", "202"), ("L", "bldg-b", "205"),
                             ("N", "bldg-b", "207"), ("C1", "bldg-c", "301"),
                             ("U", "bldg-zzz", "9"), ("OUT", "bldg-zzz", "9")):
        rows.append(f"{P[name]},{site},{unit},2024-01-01,,有效")
    rows += [f"{P['I']},bldg-a,106,2024-01-01,,迁出",
             f"{P['E']},bldg-b,203,2023-01-01,2025-12-31,有效",
             f"{P['LAPSED']},bldg-a,107,2023-01-01,,过期",
             f"{P['A1']},bldg-a,101,2023-01-01,,迁出",   # replaced by the later row
             f"{P['DUP'][:-1]}5,bldg-a,108,,,有效"]       # a mistyped check character
    registry.write_bytes("\r\n".join(rows).encode("gb18030") + b"\r\n")
    return office, registry


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Planted]:
    """The planted office compared once, with every output written."""
    folder = tmp_path_factory.mktemp("planted")
    now = time.time()
    office, registry = plant(folder, now)
    out = folder / "out"
    out.mkdir()
    output = run(office.folder, "reconcile", "--registry", str(registry), "--as-of",
                 as_of(now), "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
                 "--html", str(out / "r.html"), "--show", "50")
    report = json.loads((out / "r.json").read_text("utf-8"))
    yield Planted(office, registry, now, output, report, out)
    office.close()


def found(report: dict[str, Any], kind: str | None = None) -> set[tuple[Any, ...]]:
    """The report's findings as ``(kind, building, gateway, permit)``."""
    return {(f["kind"], f["building"], f["gateway"], f["permit"]) for f in report["findings"]
            if kind is None or f["kind"] == kind}


# -- the findings -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FINDING_KINDS)
def test_each_kind_of_finding_is_found_where_it_was_planted(planted: Planted,
                                                            kind: str) -> None:
    """Every finding of a kind names the building, gateway and permit it was planted
    at, and nothing else of that kind is reported."""
    assert found(planted.report, kind) == {e for e in EXPECTED if e[0] == kind}


def test_nothing_is_found_but_what_was_planted(planted: Planted) -> None:
    """The cards, registrations and gateways without a planted problem give no finding,
    and the totals count exactly the planted ones, by kind and by building."""
    assert found(planted.report) == EXPECTED
    totals = planted.report["totals"]
    assert totals["findings"] == len(EXPECTED)
    assert totals["by_kind"] == {k: sum(1 for e in EXPECTED if e[0] == k)
                                 for k in FINDING_KINDS}
    by_building = {b["building"]: sum(b["findings"].values())
                   for b in planted.report["buildings"]}
    assert by_building == {"bldg-a": 4, "bldg-b": 5, "bldg-c": 1, "bldg-d": 1}


def test_each_finding_says_what_the_office_needs_to_act(planted: Planted) -> None:
    """A finding carries the unit, the card's prefix, the registry line it rests on and
    the detail of its kind; an inactive registration comes with the one command that
    revokes it at its gateway."""
    by = {(f["kind"], f["gateway"]): f for f in planted.report["findings"]}
    inactive = by["registry_inactive_but_open", "gw-a"]
    assert inactive["detail"] == {"status": "moved_out", "valid_until": None}
    assert (inactive["unit"], inactive["registry_line"]) == ("106", 14)
    assert inactive["card"] == log_prefix(planted.office.cred("gw-a", CARDS["I"]))
    assert inactive["action"] == f"permitgate-central revoke --permit {P['I']} --gateway gw-a"
    expired = by["registry_inactive_but_open", "gw-b"]
    assert expired["detail"] == {"status": "expired", "valid_until": "2025-12-31"}
    unregistered = {f["permit"]: f for f in planted.report["findings"]
                    if f["kind"] == "unregistered_resident"}
    assert unregistered[P["U"]]["detail"] == {"source": "list", "registered_at": ["bldg-zzz"]}
    assert unregistered[P["V"]]["detail"] == {"source": "provisional", "registered_at": []}
    assert unregistered[P["V"]]["unit"] == "206"
    assert by["permit_in_two_buildings", "gw-a"]["detail"] == {"other_buildings": ["bldg-b"]}
    lease = by["lease_ended_still_active", "gw-b"]
    assert (lease["detail"]["enrollment_status"], lease["unit"]) == ("confirmed", "205")
    published = int((planted.now - 2 * 3600) * 1000)  # the list version its time gave
    assert by["list_stale", "gw-d"]["detail"] == {"list": [None, published],
                                                  "rev": [None, 0], "all": [None, 0]}
    assert by["list_stale", "gw-d"]["action"] == "permitgate-central publish gw-d"
    silent = by["gateway_silent", "gw-c"]["detail"]
    assert silent["state"] == "online"
    assert silent["last_seen_ms"] == pytest.approx((planted.now - 3 * DAY) * 1000, abs=1)


def test_the_registry_is_summarised_with_every_row_accounted_for(planted: Planted) -> None:
    """The summary counts the rows, the one malformed (with its line and reason), the one
    replaced by a later registration and the rows of a building without a gateway."""
    registry = planted.report["registry"]
    assert {k: registry[k] for k in ("format", "encoding", "header_line", "rows", "used",
                                     "malformed", "duplicates", "outside", "blank")} == {
        "format": "csv", "encoding": "gb18030", "header_line": 1, "rows": 17, "used": 16,
        "malformed": 1, "duplicates": 1, "outside": 2, "blank": 0}
    assert registry["malformed_rows"] == [{"line": 18,
                                           "reason": "permit_number: check_mismatch"}]
    assert "line 18: permit_number: check_mismatch" in planted.output


# -- the outputs --------------------------------------------------------------------------


def test_the_json_report_validates_against_the_published_schema(planted: Planted) -> None:
    """The JSON report is valid by the models the schema is exported from, and
    docs/schemas/reconcile.schema.json is exactly that export (re-export with ``python -m
    provisioning.reconcile.schema docs/schemas``)."""
    text = (planted.out / "r.json").read_text("utf-8")
    report = Report.model_validate_json(text)
    assert len(report.findings) == len(EXPECTED)
    published = json.loads((REPO / "docs" / "schemas" / SCHEMA_NAME).read_text("utf-8"))
    assert published == json.loads(json.dumps(schema()))


def test_the_csv_has_one_row_per_finding_with_the_same_ids(planted: Planted) -> None:
    """The CSV (UTF-8 with a BOM for Excel) holds every finding once, under the same ids
    and permit numbers as the JSON report."""
    raw = (planted.out / "r.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    lines = raw.decode("utf-8-sig").splitlines()
    assert lines[0] == ("id,building,gateway,kind,permit,unit,card,registry_line,"
                        "enrollment,detail,action")
    import csv  # noqa: PLC0415 - only here
    rows = list(csv.DictReader(lines))
    assert {(r["id"], r["permit"]) for r in rows} == {
        (f["id"], f["permit"] or "") for f in planted.report["findings"]}


def test_the_page_is_self_contained_and_draws_its_charts(planted: Planted) -> None:
    """The HTML page names no address and loads nothing (no script, no source, no
    stylesheet link); its charts are inline SVG that parse, with the entry lines and the
    findings bars drawn and the buildings named."""
    page = (planted.out / "r.html").read_text("utf-8")
    assert "http" not in page.lower()
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|url\((?!#)|@import", page, re.I)
    charts = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(charts) == 3
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "two elements of the page share an id"
    trees = [ET.fromstring(chart) for chart in charts]  # noqa: S314 - our own output
    lines = [e for e in trees[0].iter("g") if "line2d" in e.get("id", "")]
    assert lines, "the entries chart has no line"
    texts = {t.text for tree in trees for t in tree.iter("text")}
    assert {"bldg-a", "bldg-b"} <= texts
    bars = [e for e in trees[2].iter("g") if "patch" in e.get("id", "")]
    assert len(bars) > len(EXPECTED)
    assert P["I"] in page and "permit_in_two_buildings" in page


def test_every_output_is_a_private_file(planted: Planted) -> None:
    """The outputs name people, so each is written with mode 0600."""
    for name in ("r.json", "r.csv", "r.html"):
        assert stat.S_IMODE((planted.out / name).stat().st_mode) == 0o600


def test_the_terminal_summary_counts_and_names_the_commands(planted: Planted) -> None:
    """The terminal shows the registry as read, each kind's count, the buildings with
    findings, each finding with its revoke command, and where the outputs went."""
    text = planted.output
    assert "registry   registry.csv (csv, gb18030, header on line 1): 17 rows, 16 used" in text
    assert re.search(r"^  registry_inactive_but_open +2$", text, re.M)
    assert re.search(r"^  bldg-b  gw-b  ", text, re.M)
    assert f"permitgate-central revoke --permit {P['E']} --gateway gw-b" in text
    assert text.count("(mode 0600: it names people)") == 3


# -- privacy ------------------------------------------------------------------------------


def test_movements_appear_only_as_daily_counts(planted: Planted) -> None:
    """No output holds the time of any event (in ms or as a time of day), and the
    entries it counts per building are the granted entries that were sent."""
    outputs = "".join((planted.out / n).read_text("utf-8") for n in
                      ("r.json", "r.csv", "r.html")) + planted.output
    for ts_ms in planted.office.event_times:
        assert str(ts_ms) not in outputs and str(ts_ms // 1000) not in outputs
        moment = datetime.fromtimestamp(ts_ms / 1000, UTC).astimezone()
        assert moment.isoformat(timespec="seconds")[:16] not in outputs
    entries = {b["building"]: b["entries"] for b in planted.report["buildings"]}
    assert entries == {"bldg-a": 6 * 3 + 2, "bldg-b": 4 * 3, "bldg-c": 0, "bldg-d": 0}


def test_no_permit_number_goes_to_a_gateway(planted: Planted) -> None:
    """Everything the office published while the data was planted (acks, the
    confirming delta, the decisions, a snapshot) carries hashes only: no permit number."""
    assert planted.office.sent
    payloads = b"".join(p for _, p in planted.office.sent)
    for number in P.values():
        assert number.encode() not in payloads


def test_registry_numbers_never_reach_the_office_database(planted: Planted) -> None:
    """The registry's permit numbers are staged in the comparison's temporary tables
    only: after it, central.db (and its WAL) holds none that the office did not hold
    already."""
    held = b"".join(p.read_bytes() for p in planted.office.folder.glob("central.db*"))
    for name in ("A1", "N", "OUT", "LAPSED", "I", "Q"):
        assert P[name].encode() not in held, name
    assert P["V"].encode() in held  # unsealed from its enrollment: the office keeps it


def test_a_quiet_period_longer_than_retention_is_refused(tmp_path: Path) -> None:
    """With retention keeping 14 days of events, asking for cards quiet for 30 days is
    refused: every card would look quiet."""
    office, registry = Office(tmp_path / "office", Clock(time.time())), tmp_path / "r.csv"
    registry.write_text("permit_number,building,status\n", "utf-8")
    office.db.set_meta(RETENTION_KEY, "14")
    try:
        run(office.folder, "reconcile", "--registry", str(registry), check=2)
        assert "0 rows" in run(office.folder, "reconcile", "--registry", str(registry),
                               "--no-entry-days", "14")
    finally:
        office.close()


# -- acting on it -------------------------------------------------------------------------


def test_revoke_after_review_revokes_at_the_gateway_and_the_finding_goes(
        tmp_path: Path, broker: Broker) -> None:
    """``--revoke ID`` revokes the permit of that finding at its gateway only (a signed
    revocation through the broker) and the next comparison no longer finds it; an id
    that is no inactive registration refuses everything."""
    now = time.time()
    office, registry = plant(tmp_path, now)
    net = ["--host", broker.host, "--port", str(broker.port)]
    try:
        report = tmp_path / "before.json"
        run(office.folder, "reconcile", "--registry", str(registry), "--json", str(report))
        ids = {f["permit"]: f["id"] for f in json.loads(report.read_text())["findings"]
               if f["kind"] == "registry_inactive_but_open"}
        run(office.folder, "reconcile", "--registry", str(registry), "--revoke", "0" * 12,
            *net, check=2)
        assert office.db.revocations("gw-a") == []
        text = run(office.folder, "reconcile", "--registry", str(registry), "--revoke",
                   ids[P["I"]], *net)
        assert re.search(r"revoked 1 permit\(s\) at gw-a \(rev seq \d+\)", text)
        digest = office.central.permit_key()
        revoked = CredentialHasher(digest).permit(P["I"])
        assert office.db.revocations("gw-a") == [("permit", revoked)]
        assert office.db.revocations("gw-b") == []
        run(office.folder, "reconcile", "--registry", str(registry), "--json", str(report))
        left = found(json.loads(report.read_text()), "registry_inactive_but_open")
        assert left == {("registry_inactive_but_open", "bldg-b", "gw-b", P["E"])}
    finally:
        office.close()


def test_the_same_finding_keeps_its_id_from_run_to_run(planted: Planted) -> None:
    """A second comparison over the same data gives each finding the id it had, so an
    id read in one report names the same finding in the next."""
    again = planted.out / "again.json"
    run(planted.office.folder, "reconcile", "--registry", str(planted.registry),
        "--as-of", as_of(planted.now), "--json", str(again))
    ids = {f["id"] for f in json.loads(again.read_text())["findings"]}
    assert ids == {f["id"] for f in planted.report["findings"]}


def test_an_xlsx_registry_gives_the_same_findings(planted: Planted, tmp_path: Path) -> None:
    """The same registry saved as an .xlsx workbook gives the same findings as the CSV."""
    import openpyxl  # noqa: PLC0415 - only here

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for line in planted.registry.read_bytes().decode("gb18030").splitlines():
        sheet.append(line.split(","))
    book.save(tmp_path / "r.xlsx")
    run(planted.office.folder, "reconcile", "--registry", str(tmp_path / "r.xlsx"),
        "--as-of", as_of(planted.now), "--json", str(tmp_path / "x.json"))
    assert found(json.loads((tmp_path / "x.json").read_text())) == EXPECTED


def test_days_are_counted_in_the_office_time_zone(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With the office in Asia/Shanghai (UTC+8), an entry at 20:00 UTC counts on the next
    day, the date the office's own clock showed."""
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    office = Office(tmp_path / "office", Clock(time.time()))
    try:
        at = datetime(2026, 3, 1, 20, 0, tzinfo=UTC).timestamp()
        assert local_offset_s(at) == 8 * 3600
        office.add_gateway("gw-a", "bldg-a")
        office.send("gw-a", [(at, Event("access_granted", door="front", direction="entry",
                                        reason="granted", cred="0123456789"), None)])
        rows = office.db.daily_entries(0, local_offset_s(at))
        assert [(iso_day(r.day), r.entries) for r in rows] == [("2026-03-02", 1)]
    finally:
        office.close()
        monkeypatch.undo()
        time.tzset()


def test_the_page_renders_its_charts_in_a_browser_without_a_network(
        planted: Planted) -> None:
    """Opened from disk in Chromium with every other request refused, the page asks for
    nothing but itself and lays out its three charts at full size."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only here

    page_url = (planted.out / "r.html").as_uri()
    asked: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", lambda route: (
                route.continue_() if route.request.url == page_url else route.abort()))
            page.on("request", lambda request: asked.append(request.url))
            page.goto(page_url)
            boxes = [svg.bounding_box() for svg in page.query_selector_all("svg")]
            drawn = page.evaluate(
                "[...document.querySelectorAll('svg')].map(s => s.querySelectorAll("
                "'path').length)")
        finally:
            browser.close()
    assert asked == [page_url]
    assert len(boxes) == 3
    assert all(b is not None and b["width"] > 500 and b["height"] > 100 for b in boxes)
    assert all(n > 10 for n in drawn)
