"""The office's database: every operation the office needs of it, one method each.

``OfficeDatabase`` names them; ``SqliteOfficeDatabase`` (``provisioning/db/sqlite.py``,
the ``central.db`` file) is the implementation today, and a PostgreSQL one can sit beside
it in this package without changing a caller. Only the modules of this package that
implement it speak SQL (tests/test_office_rooms.py checks).

What every implementation keeps:

- Plain Python values in and out: hashes as ``bytes``, times as Unix ms (or s where a
  field says so), JSON as text, the records of ``provisioning/db/records.py`` (importable
  from here as well); no connection or cursor leaves it.
- Each method is one transaction, committed before it returns. A sequence number or list
  version handed out is therefore durable before the message that carries it is built, so
  a number is never used twice, even across a crash; an event batch is durable before the
  ack that lets the gateway forget it.
- Every sequence number and list version is allocated by ``provisioning.db.seqs.next_seq``
  (``max(stored + 1, now_ms)``, with the time the caller passes), so an office restored
  from an older backup continues above what its gateways stored; ``raise_counters`` takes
  in what a gateway reports.
- A failure of the database raises ``CentralError`` naming it; nothing is half done.
- Callable from several threads at once (each thread its own connection or a pool).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from provisioning.db.records import (
    ENROLLMENT_STATUSES,
    FINDING_KINDS,
    REGISTRY_STATUSES,
    TENANT_KINDS,
    Allocated,
    AppliedRecord,
    Arrival,
    BuildingFindings,
    CaseRecord,
    ChainCheck,
    ChainProblem,
    ChainProblemFound,
    DailyEntries,
    EnrollmentRecord,
    EntryRecord,
    EventRecord,
    FindingRecord,
    FoldResult,
    GatewayCounts,
    GatewayRecord,
    HeartbeatState,
    ListChange,
    PendingRequest,
    ReconcileParams,
    RegistryCounts,
    RegistryRow,
    RequestOutcome,
    RevokedHash,
    SnapshotContents,
    StoredBatch,
    StoredEvent,
    TenantEvent,
)

__all__ = [
    "ENROLLMENT_STATUSES",
    "FINDING_KINDS",
    "REGISTRY_STATUSES",
    "TENANT_KINDS",
    "Allocated",
    "AppliedRecord",
    "Arrival",
    "BuildingFindings",
    "CaseRecord",
    "ChainCheck",
    "ChainProblem",
    "ChainProblemFound",
    "DailyEntries",
    "EnrollmentRecord",
    "EntryRecord",
    "EventRecord",
    "FindingRecord",
    "FoldResult",
    "GatewayCounts",
    "GatewayRecord",
    "HeartbeatState",
    "ListChange",
    "OfficeDatabase",
    "PendingRequest",
    "ReconcileParams",
    "ReconcileSession",
    "RegistryCounts",
    "RegistryRow",
    "RequestOutcome",
    "RevokedHash",
    "SnapshotContents",
    "StoredBatch",
    "StoredEvent",
    "TenantEvent",
]


# == The registry comparison, cases and retention ======================================
# (provisioning/reconcile/, provisioning/retention.py; the SQLite statements are in
# provisioning/db/sqlite_reconcile.py, the tables in migration 3 of sqlite_schema.py).
# What an implementation keeps besides the rules above:
#
# - A reconcile session holds one connection for its whole life: what it stages (the
#   registry rows, with their permit numbers; the cards able to enter; the findings) lives
#   in temporary tables of that connection and dies with it, so no registry number is
#   ever written to the office's own tables, and a crash leaves nothing behind. Its reads
#   of the office's tables see one snapshot (``find`` is one read transaction), and it
#   takes no write lock on them, so ``serve`` goes on storing events meanwhile.
# - Memory stays bounded whatever the sizes (1,000,000 registry rows, 10,000,000 events):
#   rows come in batches, findings go out in pages, events are aggregated by the database.
# - Days are whole days of the office's time zone, numbered from 1970-01-01 (day 0):
#   ``(ts_ms // 1000 + offset_s) // 86_400``, ``offset_s`` the zone's offset from UTC.


class ReconcileSession(Protocol):
    """One comparison with the registry, on one connection (see the banner above)."""

    def stage_registry(self, rows: Sequence[RegistryRow]) -> None:
        """Add a batch of registry rows."""

    def registry_counts(self) -> RegistryCounts:
        """Set aside the rows replaced by later ones, once every row is staged; what was
        staged, set aside, and outside the office's buildings."""

    def find(self, params: ReconcileParams) -> int:
        """Compute every finding (``FINDING_KINDS``) from the staged rows and the office's
        tables as of one snapshot; how many. Calling it again replaces them."""

    def findings(self, after: int, limit: int) -> list[FindingRecord]:
        """The next ``limit`` findings after position ``after`` (0: from the start)."""

    def building_findings(self) -> list[BuildingFindings]:
        """Findings counted by building and kind, by building then kind."""


class OfficeDatabase(Protocol):
    """Every operation the office performs on its database (see the module docstring for
    what each implementation keeps)."""

    def close(self) -> None:
        """Close every connection; a later use opens fresh ones."""

    # -- gateways and enrollment ----------------------------------------------------

    def add_gateway(self, gateway: str, site: str, site_key_path: str, acked_upto: int,
                    created_ms: int) -> bool:
        """Register a gateway; False (nothing changed) when the id exists already."""

    def gateway(self, gateway: str) -> GatewayRecord | None:
        """One gateway, or None when it is not registered."""

    def gateways(self) -> list[GatewayRecord]:
        """Every gateway, by id."""

    def gateway_ids(self) -> list[str]:
        """Every gateway id, sorted."""

    def put_entries(self, gateway: str, entries: Sequence[EntryRecord]) -> None:
        """Store (or replace, by credential hash) entries of ``gateway``, all at once."""

    def delete_entry(self, gateway: str, cred: bytes) -> bool:
        """Delete one entry; False when there was none."""

    def begin_rekey(self, gateway: str, site_key_path: str) -> int:
        """Start a site-key change-over (provisioning.db.rekey_sql.begin)."""

    def rekey(self, gateway: str, pairs: Sequence[tuple[bytes, bytes]], now_ms: int
              ) -> tuple[list[tuple[bytes, bytes]], int]:
        """Re-key reported pairs (provisioning.db.rekey_sql.apply)."""

    def rekey_pending(self, gateway: str) -> int:
        """Entries still under the previous site key (provisioning.db.rekey_sql.pending)."""

    def end_rekey(self, gateway: str, *, drop: bool) -> int:
        """End a change-over (provisioning.db.rekey_sql.end)."""

    def entries(self, gateway: str) -> list[EntryRecord]:
        """The entries of ``gateway`` by credential hash."""

    def revocations(self, gateway: str) -> list[RevokedHash]:
        """What a snapshot for ``gateway`` revokes: its own and the global revocations,
        each once, by kind and hash."""

    # -- publishing: each allocates a seq (or version), committed before it returns ------
    # The time passed in (``published_ms``, ``now_ms``...) is the clock of the allocation
    # rule (provisioning.db.seqs.next_seq).

    def allocate_snapshot(self, gateway: str, published_ms: int, *,
                          resync: bool) -> SnapshotContents:
        """The next list version with the entries and revocations it carries; with
        ``resync`` it also marks the gateway's resync request answered now."""

    def allocate_delta(self, gateway: str, upsert: Sequence[bytes], published_ms: int
                       ) -> tuple[Allocated, list[EntryRecord]] | None:
        """The next list version (and the one before it, the delta's base) and the stored
        entries of the credentials ``upsert``; None (no version spent) when one of them is
        not enrolled."""

    def allocate_revocation(self, target: str, items: Sequence[RevokedHash],
                            revoked_ms: int) -> Allocated:
        """Record revocations at gateway ``target`` (its ``rev`` stream) or, with ``*``,
        at every gateway (the ``all`` stream); returns the stream seq that carries them
        and the stream's seq before it."""

    def allocate_command(self, gateway: str, now_ms: int) -> int:
        """The next ``cmd`` seq."""

    def allocate_heartbeat(self, gateway: str, now_ms: int) -> HeartbeatState:
        """The next ``hb`` seq and the versions it vouches for."""

    def allocate_ack(self, gateway: str, now_ms: int) -> int:
        """The next ``ack`` seq."""

    # -- receiving ---------------------------------------------------------------------

    def store_events(self, gateway: str, events: Sequence[EventRecord], received_ms: int,
                     check: ChainCheck) -> StoredBatch:
        """Store a batch in order, each seq once (a seq stored already keeps its first
        copy), record what ``check`` finds for each event as chain problems, and advance
        ``acked_upto`` over the contiguous seqs now stored; one transaction."""

    def record_applied(self, gateway: str, applied: AppliedRecord) -> None:
        """Keep a gateway's report on one stream (replacing the last one) and its list
        version as reported."""

    def record_status(self, gateway: str, status_json: str, list_version: int | None,
                      received_ms: int) -> None:
        """Keep a gateway's status and, when it names one, its list version."""

    def record_resync_request(self, gateway: str, reason: str,
                              requested_ms: int) -> int | None:
        """Note a resync request; returns when the last one was answered (ms), if ever."""

    def raise_counters(self, gateway: str, versions: Mapping[str, int], now_ms: int) -> None:
        """Raise the gateway's counters, and the ``all`` stream's, to the versions it
        reports having stored (``status.versions``, or a resync request's), never lowering
        one and taking none more than a day ahead of ``now_ms``
        (``provisioning.db.seqs.reported_counters``): an office restored from a backup,
        or whose clock went back, then continues above them. Nothing is written when no
        counter is below."""

    def count_malformed(self, gateway: str) -> None:
        """One more malformed message from a registered gateway."""

    def count_unknown_gateway_message(self) -> None:
        """One more message from a gateway that is not registered."""

    # -- reports -----------------------------------------------------------------------

    def all_seq(self) -> int:
        """The broadcast revocation stream's seq."""

    def global_revocation_count(self) -> int:
        """How many revocations apply at every gateway."""

    def unknown_gateway_messages(self) -> int:
        """How many messages came from gateways that are not registered."""

    def applied(self, gateway: str) -> list[AppliedRecord]:
        """The gateway's last report on each stream, by stream."""

    def chain_problems(self, gateway: str) -> list[ChainProblem]:
        """The chain problems found in the gateway's events, by seq and problem."""

    def counts(self, gateway: str) -> GatewayCounts:
        """How many entries, own revocations and events the office holds for it."""

    def events(self, gateway: str, *, after_seq: int, limit: int | None) -> list[StoredEvent]:
        """Stored events with seq above ``after_seq`` in seq order; with ``limit``, the
        newest ``limit`` of them."""

    def enrollment_counts(self, gateway: str) -> dict[str, int]:
        """How many of the gateway's enrollments are in each status (those with any)."""

    # -- enrollments made at gateways --------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A value of the office's settings (``enrollment_policy``), None when unset."""

    def set_meta(self, key: str, value: str) -> None:
        """Set one of the office's settings."""

    def tenant_events(self, gateway: str, limit: int) -> list[TenantEvent]:
        """The first ``limit`` stored tenant events (``TENANT_KINDS``) above the
        gateway's ``tenant_upto`` and up to its ``acked_upto`` (so without holes), in seq
        order, with their attachments; at a cost that does not grow with the other
        events stored."""

    def advance_tenant_cursor(self, gateway: str, upto: int) -> None:
        """Raise ``tenant_upto`` to ``upto`` (never lower it): a tenant event passed over."""

    def revoked(self, gateway: str, kind: str, digest: bytes) -> bool:
        """Whether ``digest`` is revoked (as ``kind``) at ``gateway`` or everywhere."""

    def permit_elsewhere(self, gateway: str, permit_hash: bytes, now_s: int) -> list[str]:
        """Other gateways whose list holds an entry of this permit valid at ``now_s``, or
        that hold a received, held or confirmed enrollment of it; sorted."""

    def record_enrollment(self, record: EnrollmentRecord) -> bool:
        """Store a new enrollment and raise the gateway's ``tenant_upto`` to its
        ``seq``, together; False (only the cursor moves) when the gateway's enrollment id
        is known already."""

    def end_enrollment(self, gateway: str, enrollment_id: str, seq: int, reason: str,
                       ended_ms: int) -> ListChange | None:
        """Mark an enrollment ended (moved out, lease ended) and raise ``tenant_upto`` to
        ``seq``, together; a confirmed one's card leaves the list under a new list
        version, returned. None when nothing was listed (an unknown enrollment, one
        ended already, one never confirmed)."""

    def enrollment(self, gateway: str, enrollment_id: str) -> EnrollmentRecord | None:
        """One enrollment."""

    def enrollments(self, gateway: str | None = None, status: str | None = None
                    ) -> list[EnrollmentRecord]:
        """Enrollments of one gateway or all, of one status or all, by gateway and
        event seq."""

    def hold_enrollments(self, gateway: str, ids: Sequence[str], reason: str) -> None:
        """Received enrollments to ``held`` (others are left as they are)."""

    def confirm_enrollments(self, gateway: str, entries: Mapping[str, EntryRecord],
                            decided_ms: int) -> ListChange | None:
        """For each enrollment id still received or held: its entry into the list and
        the enrollment confirmed, all under one new list version (returned, with the
        enrollments it confirmed); None (no version spent) when none was."""

    def reject_enrollment(self, gateway: str, enrollment_id: str, reason: str,
                          decided_ms: int) -> tuple[EnrollmentRecord, ListChange | None] | None:
        """Reject a received, held or confirmed enrollment (a confirmed one's card leaves
        the list under a new list version); the decision becomes due. None when it is in
        no such state."""

    def resend_decision(self, gateway: str, enrollment_id: str) -> bool:
        """Make a confirmed or rejected enrollment's decision due again."""

    def allocate_decisions(self, gateway: str, limit: int, now_ms: int
                           ) -> tuple[int, list[EnrollmentRecord]] | None:
        """The next ``enr`` seq and up to ``limit`` enrollments whose decision is due
        (confirmed or rejected, none sent), now marked as sent under it; None (no seq
        spent) when none is due."""

    # -- requests from one-shot commands to the running serve --------------------------

    def queue_request(self, op: str, args: str, requested_ms: int) -> int:
        """Queue a request; returns its id."""

    def request_outcome(self, request: int) -> RequestOutcome | None:
        """How the request ended, or None while it is open."""

    def withdraw_request(self, request: int, now_ms: int) -> bool:
        """Close a request as ``expired`` unless ``serve`` has taken it; whether it did."""

    def open_requests(self) -> list[PendingRequest]:
        """Requests neither taken nor done, oldest first."""

    def take_request(self, request: int, now_ms: int) -> bool:
        """Claim an open request for this ``serve``; False when it was withdrawn."""

    def finish_request(self, request: int, now_ms: int, outcome: RequestOutcome) -> None:
        """Record a request's outcome (once)."""

    def reset_requests(self, now_ms: int, keep_ms: int) -> None:
        """At the start of ``serve``: forget requests done more than ``keep_ms`` ago, and
        close as failed those a stopped ``serve`` had taken but not finished."""

    # == the registry comparison, cases and retention (see the banner above) ===========

    def reconcile_session(self) -> AbstractContextManager[ReconcileSession]:
        """A new comparison session; leaving the ``with`` block drops what it staged."""

    def daily_entries(self, from_day: int, offset_s: int,
                      gateways: Sequence[str] | None = None) -> list[DailyEntries]:
        """Granted entries per day from ``from_day`` on: the daily counts retention kept
        plus the events still stored. With ``gateways``, per gateway (those named);
        without, summed over every gateway (gateway ``*``). By gateway, then day."""

    def entries_by_gateway(self, from_day: int, offset_s: int) -> dict[str, int]:
        """Granted entries per gateway from ``from_day`` on (the same sources)."""

    def record_case(self, record: CaseRecord) -> int:
        """Add a record to the case audit; its id."""

    def case_records(self, limit: int) -> list[CaseRecord]:
        """The newest ``limit`` case audit records, newest first."""

    def permit_cards(self, permit_hash: bytes) -> list[tuple[str, bytes]]:
        """Every ``(gateway, credential hash)`` the office knows for a permit: listed, or
        enrolled at a gateway (whatever the enrollment's status); sorted."""

    def card_events(self, gateway: str, cred_prefix: str, since_ms: int,
                    limit: int) -> list[StoredEvent]:
        """The access events (granted and denied) of one card at one gateway from
        ``since_ms`` on, by the 10-hex prefix events carry; the newest ``limit``, oldest
        first."""

    def fold_events(self, gateway: str, before_ms: int, offset_s: int,
                    limit: int) -> FoldResult:
        """One retention step at ``gateway``, one transaction: among its oldest ``limit``
        stored events, the prefix (by seq) older than ``before_ms`` is counted into the
        daily counts (entries, exits, denials, other, per day) and deleted. Never past
        ``acked_upto`` (a seq above it may be stored again), never a tenant event not yet
        acted on or anything after it; an event at or below the highest seq folded before
        (a copy the gateway sent again) is deleted without being counted twice."""

    def erase_ended_permits(self, before_ms: int) -> int:
        """Drop the permit number and its hash from enrollments rejected or ended before
        ``before_ms``; how many."""
