"""Benchmark: the comparison with the police registry at city scale.

Builds an office (``keygen``, ``--buildings`` gateways, one listed card per registry
row, ``--events`` granted entries over the last 20 days, spread over the cards) through
the office's own code (``Central.add_gateway`` and ``enroll_many``, the database's
``store_events``, ``record_status``, ``record_enrollment``/``confirm_enrollments``), and a
registry CSV of ``--rows`` rows written as Chinese offices write it (GB 18030, Chinese
headers). Among them it plants a known number of every kind of finding. Then it runs
``permitgate-central reconcile --registry … --json --csv --html`` as a child process and
measures it alone: wall time and peak resident memory (``RUSAGE_CHILDREN``).

The office's database is PostgreSQL by default, as a city runs it: a database made for
the run on the local server (``$PERMITGATE_TEST_PG``, as tests/pg.py; dropped afterwards)
and named in the office folder's ``database.url``, or the one ``--database URL`` names
(made empty beforehand, kept); the build ends with ``VACUUM (ANALYZE)``, as autovacuum
leaves a running office. ``--backend sqlite`` builds ``central.db`` instead.

Prints one JSON object as its last line: ``rows``, ``buildings``, ``events``,
``seconds`` (the comparison, all outputs written), ``rss_mb`` (its peak; the PostgreSQL
server's session is not in it), ``findings`` (as the report counts them), ``planted``
(how many were planted; the run fails when they differ), ``build_s`` (making the
office, not part of the figure), ``backend``, and the machine's 1-minute load average
before the build and before and after the comparison (other work on the machine skews
the figure).

Run: ``python bench/reconcile.py`` (1,000,000 rows, 10,000 buildings, 10,000,000
events; about 3 GB of disk and some minutes to build) or ``--quick`` (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import TextIO

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.hashing import CredentialHasher, log_prefix
from protocol.permits import check_character
from provisioning.central import PERMIT_KEY_NAME, Central, keygen
from provisioning.db import EnrollmentRecord, EntryRecord, EventRecord, OfficeDatabase
from provisioning.db.backend import set_database
from provisioning.db.sqlite import SqliteOfficeDatabase

DAY = 86_400
BATCH = 5_000
"""Events per ``store_events`` call (one transaction)."""


@dataclass
class Plan:
    """What to build and how many findings of each kind to plant."""

    rows: int
    buildings: int
    events: int
    per_kind: int
    now: float = field(default_factory=time.time)

    @property
    def silent(self) -> set[int]:
        """Building indexes whose gateway is silent (the last ones)."""
        return set(range(self.buildings - self.per_kind, self.buildings))


def number(n: int) -> str:
    """The ``n``-th valid citizen number: address 110105, a birth date from 1950 on,
    a sequence of three digits."""
    born = date(1950, 1, 1) + timedelta(days=n // 1000)
    first17 = f"110105{born:%Y%m%d}{n % 1000:03d}"
    return first17 + check_character(first17)


def card(n: int) -> str:
    """The ``n``-th card id."""
    return f"em4100:{n:010X}"


def gateway(b: int) -> str:
    """The gateway of building ``b``."""
    return f"gw-{b:05d}"


def site(b: int) -> str:
    """Building ``b``'s site id."""
    return f"bldg-{b:05d}"


class Builder:
    """Makes the office and the registry of a plan, counting what it plants."""

    def __init__(self, folder: Path, plan: Plan, url: str | None = None) -> None:
        self.folder = folder
        self.plan = plan
        self.url = url
        """The PostgreSQL database's URL; None for ``central.db``."""
        self.rng = random.Random(7)
        self.planted = 0
        self.keys: dict[int, bytes] = {}
        self.twice: list[int] = []

    def build(self) -> Path:
        """The office folder and the registry file."""
        plan = self.plan
        keygen(self.folder)
        if self.url is not None:
            set_database(self.folder, self.url)
        with Central(self.folder, clock=lambda: plan.now - 200 * DAY) as central:
            for b in range(plan.buildings):
                self.keys[b] = os.urandom(32)
                central.add_gateway(gateway(b), site(b), self.keys[b])
        eligible = [i for i in range(plan.rows) if i % plan.buildings not in plan.silent]
        picks = self.rng.sample(eligible, 4 * plan.per_kind)
        k = plan.per_kind
        unregistered, inactive, quiet = (set(picks[:k]), set(picks[k:2 * k]),
                                         set(picks[2 * k:3 * k]))
        self.twice = picks[3 * k:]
        """Background permits that get a second card at another building."""
        self.planted += 3 * plan.per_kind
        with Central(self.folder, clock=lambda: plan.now - 100 * DAY) as central:
            for b in range(plan.buildings):
                central.enroll_many(gateway(b), [
                    (card(i), number(i)) for i in range(b, plan.rows, plan.buildings)])
        registry = self.folder.parent / "registry.csv"
        with registry.open("w", encoding="gb18030", newline="") as out:
            out.write("证件号码,房屋编号,房号,登记日期,有效期至,状态\r\n")
            for i in range(plan.rows):
                if i in unregistered:
                    continue
                status = "迁出" if i in inactive else "有效"
                out.write(f"{number(i)},{site(i % plan.buildings)},{i // plan.buildings},"
                          f"2024-01-01,,{status}\r\n")
            self._extras(out)
        self._events(quiet)
        self._gateways()
        self._settle()
        return registry

    def _open(self, *, fast: bool = False) -> OfficeDatabase:
        """The office's database, opened directly; ``fast``: commits that do not wait for
        the disk (building the office is not what is measured; ``serve`` waits)."""
        if self.url is None:
            sqlite = SqliteOfficeDatabase(self.folder / "central.db")
            if fast:
                sqlite.conn().execute("PRAGMA synchronous=OFF")
            return sqlite
        from provisioning.db.postgres import PostgresOfficeDatabase  # noqa: PLC0415
        postgres = PostgresOfficeDatabase(self.url)
        if fast:
            postgres._conn().execute("SET synchronous_commit = off")  # noqa: SLF001
        return postgres

    def _extras(self, out: TextIO) -> None:
        """Registered without a card; a second building's card; a lease that ended."""
        plan = self.plan
        db = self._open()
        permits = CredentialHasher(bytes.fromhex(
            (self.folder / PERMIT_KEY_NAME).read_text().strip()))
        now_s = int(plan.now)
        live = [b for b in range(plan.buildings) if b not in plan.silent]
        for k in range(plan.per_kind):
            n = plan.rows + k
            out.write(f"{number(n)},{site(live[k % len(live)])},X{k},2024-01-01,,有效\r\n")
        self.planted += plan.per_kind
        for k, i in enumerate(self.twice):  # permit_in_two_buildings: two findings each
            other = live[(live.index(i % plan.buildings) + 1) % len(live)]
            db.put_entries(gateway(other), [EntryRecord(
                CredentialHasher(self.keys[other]).credential(card(plan.rows * 2 + k)),
                permits.permit(number(i)), None, None, None, None, now_s, now_s * 1000)])
            out.write(f"{number(i)},{site(other)},Y{k},2024-01-01,,有效\r\n")
        self.planted += 2 * plan.per_kind
        for k in range(plan.per_kind):  # lease_ended_still_active
            n, b = plan.rows * 3 + k, live[k % len(live)]
            cred = CredentialHasher(self.keys[b]).credential(card(n))
            digest = permits.permit(number(n))
            enrollment = str(uuid.uuid4())
            db.record_enrollment(EnrollmentRecord(
                gateway=gateway(b), id=enrollment, seq=0, unit=f"L{k}", cred=cred,
                permit=number(n), permit_hash=digest, lease_end=now_s - 10 * DAY,
                provisional_until=now_s - 40 * DAY, account="bench",
                received_ms=(now_s - 50 * DAY) * 1000, status="received", reason=None))
            db.confirm_enrollments(gateway(b), {enrollment: EntryRecord(
                cred, digest, None, None, None, None, now_s, now_s * 1000)}, now_s * 1000)
            out.write(f"{number(n)},{site(b)},L{k},2024-01-01,,有效\r\n")
        self.planted += plan.per_kind
        db.close()

    def _events(self, quiet: set[int]) -> None:
        """``--events`` granted entries over the last 20 days, round the cards of each
        building (the quiet cards get none); a silent building's arrived days ago."""
        plan = self.plan
        # Building the office is not what is measured: this connection skips the fsync
        # of each of its 10,000 transactions (``serve`` keeps it).
        db = self._open(fast=True)
        per_building = plan.events // plan.buildings
        now_ms = int(plan.now * 1000)
        for b in range(plan.buildings):
            hasher = CredentialHasher(self.keys[b])
            prefixes = [log_prefix(hasher.credential(card(i)))
                        for i in range(b, plan.rows, plan.buildings) if i not in quiet]
            if not prefixes:
                continue
            received = now_ms - (3 * DAY * 1000 if b in plan.silent else 0)
            for start in range(0, per_building, BATCH):
                batch = [EventRecord(
                    seq, str(uuid.UUID(int=seq)), now_ms - self.rng.randrange(
                        20 * DAY * 1000) - (4 * DAY * 1000 if b in plan.silent else 0),
                    "access_granted", "front", "front-in", "entry", "granted",
                    prefixes[seq % len(prefixes)], "{}", "0" * 64, f"{seq:064x}")
                    for seq in range(start + 1, min(per_building, start + BATCH) + 1)]
                db.store_events(gateway(b), batch, received, lambda _arrival: [])
        db.close()

    def _gateways(self) -> None:
        """Statuses: current and recent, but silent gateways' days old and the stale
        gateways' lists published two hours ago and not applied."""
        plan = self.plan
        db = self._open()
        now_ms = int(plan.now * 1000)
        stale = set(range(plan.per_kind))
        self.planted += 2 * plan.per_kind
        for b in range(plan.buildings):
            if b in stale:
                db.allocate_snapshot(gateway(b), now_ms - 2 * 3_600_000, resync=False)
            record = db.gateway(gateway(b))
            assert record is not None
            at = now_ms - (3 * DAY * 1000 if b in plan.silent else 60_000)
            versions = {"list": 0 if b in stale else record.list_version,
                        "rev": record.rev_seq, "all": 0}
            db.record_status(gateway(b), json.dumps({
                "type": "status", "gateway": gateway(b), "state": "online", "ts_ms": at,
                "versions": versions}), versions["list"], at)
        db.close()

    def _settle(self) -> None:
        """PostgreSQL: ``VACUUM (ANALYZE)``, what autovacuum does for an office that has
        run a while (statistics of the tables, their visibility maps), done now, so that
        the comparison meets the office as it runs and not the moment a bulk load ends."""
        if self.url is None:
            return
        from provisioning.db.postgres import PostgresOfficeDatabase  # noqa: PLC0415
        db = PostgresOfficeDatabase(self.url)
        try:
            db.connect().execute("VACUUM (ANALYZE)")
        finally:
            db.close()


def peak_child_rss_mb() -> float:
    """The peak resident memory of the largest child waited for, in MB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def measure(folder: Path, registry: Path, out: Path) -> tuple[float, float]:
    """Run the comparison as ``permitgate-central``; its seconds and peak RSS."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "provisioning.central_cli", "--dir", str(folder), "reconcile",
         "--registry", str(registry), "--json", str(out / "report.json"), "--csv",
         str(out / "report.csv"), "--html", str(out / "report.html")],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        check=False)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(1)
    return seconds, peak_child_rss_mb()


QUICK = (2_000, 20, 20_000, 3)
FULL = (1_000_000, 10_000, 10_000_000, 100)
"""Rows, buildings, events, findings planted of each kind."""


@contextmanager
def database(backend: str, url: str | None) -> Iterator[str | None]:
    """The PostgreSQL database's URL for the run (None: ``central.db``): the one named,
    or one made on the local server and dropped afterwards."""
    if backend == "sqlite":
        yield None
    elif url is not None:
        yield url
    else:
        from tests.pg import postgres_url, scratch_database  # noqa: PLC0415 - needs psycopg
        with scratch_database() as conninfo:
            yield postgres_url(conninfo)


def load() -> float:
    """The machine's 1-minute load average."""
    return round(os.getloadavg()[0], 2)


def main() -> int:
    """Build, compare, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2,000 rows, 20 buildings, 20,000 events")
    parser.add_argument("--keep", metavar="DIR",
                        help="build in DIR and keep it (a database made for the run is "
                        "dropped all the same: see --database)")
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql",
                        help="the office's database (default postgresql)")
    parser.add_argument("--database", metavar="URL",
                        help="with postgresql: use this empty database and keep it "
                        "(default: one made on $PERMITGATE_TEST_PG's server, dropped after)")
    args = parser.parse_args()
    if args.database and args.backend != "postgresql":
        parser.error("--database: with --backend postgresql only")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    plan = Plan(*(QUICK if args.quick else FULL))
    loads: dict[str, float] = {"load_build": load()}
    with tempfile.TemporaryDirectory() as tmp, database(args.backend, args.database) as url:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        builder = Builder(root / "office", plan, url)
        registry = builder.build()
        build_s = time.monotonic() - started
        loads["load_before"] = load()
        seconds, rss_mb = measure(root / "office", registry, root)
        loads["load_after"] = load()
        report = json.loads((root / "report.json").read_text("utf-8"))
    figures = {"backend": args.backend, "rows": plan.rows, "buildings": plan.buildings,
               "events": plan.events, "seconds": round(seconds, 2),
               "rss_mb": round(rss_mb, 1), "findings": report["totals"]["findings"],
               "planted": builder.planted, "by_kind": report["totals"]["by_kind"],
               "build_s": round(build_s, 1), **loads}
    print(json.dumps(figures))
    return 0 if figures["findings"] == builder.planted else 1


if __name__ == "__main__":
    sys.exit(main())
