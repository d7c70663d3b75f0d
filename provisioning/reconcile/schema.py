"""The JSON report of ``permitgate-central reconcile --json``, as models.

docs/schemas/reconcile.schema.json is exported from ``Report`` with
``python -m provisioning.reconcile.schema docs/schemas`` (tests/test_reconcile.py checks
that the published file matches, and validates real reports against the models). The
report itself is written as a stream (provisioning/reconcile/outputs.py), not through
these models, so that a million findings never sit in memory at once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT = "permitgate-reconcile/1"
SCHEMA_NAME = "reconcile.schema.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MalformedRow(_Strict):
    """A registry row skipped, and why."""

    line: int = Field(ge=1)
    reason: str


class Registry(_Strict):
    """What reading the registry export found."""

    file: str = Field(description="The file's name (not its folder).")
    format: Literal["csv", "xlsx"]
    encoding: str | None = Field(description="As detected or given; null for .xlsx.")
    delimiter: str | None
    header_line: int | None
    rows: int = Field(ge=0, description="Data rows after the header, blank ones not "
                                        "included.")
    used: int = Field(ge=0)
    blank: int = Field(ge=0)
    malformed: int = Field(ge=0, description="Rows skipped; the first 10,000 are listed.")
    duplicates: int = Field(ge=0, description="Rows replaced by a later row of the same "
                                              "permit and building.")
    outside: int = Field(ge=0, description="Rows of buildings no gateway of the office "
                                           "serves.")
    malformed_rows: list[MalformedRow]


class Thresholds(_Strict):
    """The thresholds the comparison used."""

    no_entry_days: int = Field(ge=1)
    silent_hours: float = Field(gt=0)
    stale_minutes: float = Field(ge=0)


Kind = Literal["unregistered_resident", "registry_inactive_but_open", "registered_no_card",
               "no_entry_since", "permit_in_two_buildings", "lease_ended_still_active",
               "gateway_silent", "list_stale"]


class Totals(_Strict):
    """Findings in all."""

    findings: int = Field(ge=0)
    by_kind: dict[Kind, int]


class Building(_Strict):
    """One building: its gateways, its findings by kind, its granted entries."""

    building: str
    gateways: list[str]
    findings: dict[Kind, int]
    entries: int = Field(ge=0, description="Granted entries over the window (`window_days`"
                                           "), all its gateways: a count, no person.")


class _Finding(_Strict):
    id: str = Field(pattern=r"^[0-9a-f]{12}$", description="Stable across runs over the "
                    "same data (`reconcile --revoke ID`).")
    building: str
    gateway: str | None
    permit: str | None = Field(description="The permit number, when the office holds it "
                               "(from the registry, else the enrollment).")
    unit: str | None
    card: str | None = Field(pattern=r"^[0-9a-f]{10}$", description="The card's "
                             "credential hash prefix, as in events.")
    registry_line: int | None
    enrollment: str | None
    action: str | None = Field(description="The one command that acts on it, after review.")


class UnregisteredDetail(_Strict):
    source: Literal["list", "provisional"]
    registered_at: list[str] = Field(description="Buildings where the registry has the "
                                                 "permit active.")


class UnregisteredResident(_Finding):
    """Able to enter, not registered at that building."""

    kind: Literal["unregistered_resident"]
    detail: UnregisteredDetail


class InactiveDetail(_Strict):
    status: Literal["lapsed", "cancelled", "moved_out", "expired"]
    valid_until: str | None = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")


class RegistryInactiveButOpen(_Finding):
    """The registration lapsed, was cancelled, moved out or expired; the card opens."""

    kind: Literal["registry_inactive_but_open"]
    detail: InactiveDetail


class NoDetail(_Strict):
    pass


class RegisteredNoCard(_Finding):
    """Registered at the building; no card of that permit opens there."""

    kind: Literal["registered_no_card"]
    detail: NoDetail


class QuietDetail(_Strict):
    listed_since_ms: int


class NoEntrySince(_Finding):
    """A listed card with no granted entry for `no_entry_days`."""

    kind: Literal["no_entry_since"]
    detail: QuietDetail


class TwoBuildingsDetail(_Strict):
    other_buildings: list[str] = Field(min_length=1)


class PermitInTwoBuildings(_Finding):
    """The same permit opens doors in two or more buildings."""

    kind: Literal["permit_in_two_buildings"]
    detail: TwoBuildingsDetail


class LeaseDetail(_Strict):
    lease_end: int = Field(description="Unix s, exclusive.")
    enrollment_status: str


class LeaseEndedStillActive(_Finding):
    """The office's record says the lease ended; the card still opens."""

    kind: Literal["lease_ended_still_active"]
    detail: LeaseDetail


class SilentDetail(_Strict):
    last_seen_ms: int | None
    state: str | None


class GatewaySilent(_Finding):
    """Nothing heard from the gateway for `silent_hours`."""

    kind: Literal["gateway_silent"]
    detail: SilentDetail


Behind = tuple[int | None, int]


class StaleDetail(_Strict):
    list: Behind = Field(description="[applied, published] list versions.")
    rev: Behind = Field(description="[reported, sent] of its revocation stream.")
    all: Behind = Field(description="[reported, sent] of the broadcast stream.")


class ListStale(_Finding):
    """The gateway is behind the office's list (or revocations) past the grace."""

    kind: Literal["list_stale"]
    detail: StaleDetail


Finding = Annotated[
    UnregisteredResident | RegistryInactiveButOpen | RegisteredNoCard | NoEntrySince
    | PermitInTwoBuildings | LeaseEndedStillActive | GatewaySilent | ListStale,
    Field(discriminator="kind")]


class Report(_Strict):
    """The comparison of the office's records with the police registry."""

    format: Literal["permitgate-reconcile/1"]
    as_of: str = Field(description="ISO 8601 with the office's offset.")
    as_of_ms: int
    window_days: int = Field(ge=1, description="Days the entry counts cover.")
    thresholds: Thresholds
    registry: Registry
    totals: Totals
    buildings: list[Building]
    findings: list[Finding]


def schema() -> dict[str, Any]:
    """The JSON Schema of the report, with its ``$id``."""
    exported: dict[str, Any] = Report.model_json_schema()
    exported["$id"] = f"https://permitgate.invalid/schemas/office/{SCHEMA_NAME}"
    return exported


def main(argv: Sequence[str]) -> int:
    """``python -m provisioning.reconcile.schema FOLDER``: write the schema there."""
    if len(argv) != 1:
        sys.stderr.write("usage: python -m provisioning.reconcile.schema FOLDER\n")
        return 2
    path = Path(argv[0]) / SCHEMA_NAME
    path.write_text(json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    "utf-8")
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
