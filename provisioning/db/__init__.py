"""The office's database: every operation the office needs of it, one method each.

``OfficeDatabase`` names them; ``SqliteOfficeDatabase`` (``provisioning/db/sqlite.py``,
the ``central.db`` file) is the implementation today, and a PostgreSQL one can sit beside
it in this package without changing a caller. Only the modules of this package that
implement it speak SQL (tests/test_office_rooms.py checks).

What every implementation keeps:

- Plain Python values in and out: hashes as ``bytes``, times as Unix ms (or s where a
  field says so), JSON as text, the records below; no connection or cursor leaves it.
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

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    """A registered gateway and the counters of every stream sent to it."""

    id: str
    site: str
    site_key_path: str
    """The building's site-key file; the key itself stays in it."""
    list_version: int
    list_published_ms: int | None
    rev_seq: int
    cmd_seq: int
    hb_seq: int
    ack_seq: int
    acked_upto: int
    """The highest contiguous event seq stored."""
    status: str | None
    """The last retained ``Status``, JSON."""
    status_ms: int | None
    applied_list_version: int | None
    """As last reported (an ``applied`` message or a status)."""
    applied_ms: int | None
    resync_requested_ms: int | None
    resync_reason: str | None
    resync_answered_ms: int | None
    malformed: int
    created_ms: int
    enr_seq: int = 0
    """The ``enr`` stream: enrollment decisions sent."""
    tenant_upto: int = 0
    """The seq of the last tenant event acted on (at most ``acked_upto``: tenant events
    are acted on in seq order, once every event before them is stored)."""


@dataclass(frozen=True, slots=True)
class EntryRecord:
    """One enrolled card of a gateway: keyed hashes only."""

    cred: bytes
    """HMAC-SHA256(site key, ``"cred\\0"`` + card id)."""
    permit: bytes | None
    """HMAC-SHA256(permit key, ``"permit\\0"`` + number)."""
    valid_from: int | None
    valid_until: int | None
    """Exclusive."""
    doors: tuple[str, ...] | None
    """None: every door."""
    schedule: str | None
    """None: always."""
    confirmed_at: int | None
    """Unix s."""
    updated_ms: int


RevokedHash = tuple[str, bytes]
"""A revocation as stored: ``(kind, hash)``, kind ``credential`` or ``permit``."""


@dataclass(frozen=True, slots=True)
class SnapshotContents:
    """A new list version and everything a snapshot of it carries, read in the same
    transaction that allocated the version."""

    version: int
    rev_seq: int
    all_seq: int
    entries: list[EntryRecord]
    """By credential hash."""
    revoked: list[RevokedHash]
    """The gateway's own and the global revocations, each once, by kind and hash."""


@dataclass(frozen=True, slots=True)
class Allocated:
    """A new seq (or list version) and the stream's seq before it: the ``prev_seq`` of a
    revocation, the ``base`` of a delta."""

    seq: int
    prev: int


@dataclass(frozen=True, slots=True)
class HeartbeatState:
    """A new heartbeat seq and the versions the heartbeat vouches for."""

    seq: int
    list_version: int
    rev_seq: int
    all_seq: int


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event as a gateway sent it (its hash chain included)."""

    seq: int
    event_id: str
    ts_ms: int
    kind: str
    door: str | None
    reader: str | None
    direction: str | None
    reason: str | None
    cred: str | None
    data: str
    """JSON text, keys sorted, compact, UTF-8 unescaped."""
    prev_hash: str
    hash: str
    attachment: str | None = None
    """What travelled with the event outside its hash (a ``tenant_enrolled`` event's
    ``EnrollmentAttachment`` JSON); its SHA-256 is in ``data``."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A stored event and when the office received it."""

    event: EventRecord
    received_ms: int


@dataclass(frozen=True, slots=True)
class Arrival:
    """What storing one event of a batch found, at the moment it was stored (a batch is
    stored in order, so an earlier event of the same batch counts as stored)."""

    index: int
    """Its place in the batch."""
    new: bool
    """False: this seq was stored already (the stored copy stays)."""
    stored_hash: str | None
    """For a seq stored already: the hash stored under it."""
    before_hash: str | None
    """For a new event: the stored hash of seq - 1, if that is stored."""
    after_prev_hash: str | None
    """For a new event: the stored ``prev_hash`` of seq + 1, if that is stored."""


ChainProblemFound = tuple[int, str]
"""``(seq, problem)``."""

ChainCheck = Callable[[Arrival], Iterable[ChainProblemFound]]
"""The chain rules (``provisioning.receive``), run inside the transaction that stores the
batch: the problems they find are recorded with the events, so a crash cannot keep the
events and lose the problems (a resent batch would find no problem the second time)."""


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """What storing one event batch did."""

    new: int
    acked_upto: int
    problems: tuple[ChainProblemFound, ...]
    """In the order found (the record keeps each ``(seq, problem)`` once)."""


@dataclass(frozen=True, slots=True)
class AppliedRecord:
    """A gateway's last report of one stream: applied, or refused and why."""

    stream: str
    seq: int | None
    status: str
    reason: str | None
    list_version: int
    ts_ms: int
    received_ms: int


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """A chain problem found in a gateway's events."""

    seq: int
    problem: str
    found_ms: int


@dataclass(frozen=True, slots=True)
class GatewayCounts:
    """How much the office holds for a gateway."""

    entries: int
    revocations: int
    """Its own, not the global ones."""
    events: int
    highest_seq: int | None


TENANT_KINDS = ("tenant_enrolled", "tenant_moved_out", "tenant_lease_ended")
"""The events the office acts on for enrollments made at gateways."""
ENROLLMENT_STATUSES = ("received", "held", "confirmed", "rejected", "ended")
"""Where an enrollment made at a gateway stands at the office: ``received`` (checked, the
policy not yet applied), ``held`` (for an officer), ``confirmed``, ``rejected``, ``ended``
(moved out or lease ended at the gateway)."""


@dataclass(frozen=True, slots=True)
class EnrollmentRecord:
    """An enrollment a landlord made at a gateway, as the office keeps it."""

    gateway: str
    id: str
    """The gateway's enrollment id (unique per gateway)."""
    seq: int
    """The seq of its ``tenant_enrolled`` event."""
    unit: str | None
    cred: bytes | None
    """The card's credential hash, from the attachment (None: it did not check out)."""
    permit: str | None
    """The permit number, unsealed and validated (None: it did not open or validate)."""
    permit_hash: bytes | None
    """Under the office permit key."""
    lease_end: int | None
    provisional_until: int | None
    account: str | None
    received_ms: int
    status: str
    """One of ``ENROLLMENT_STATUSES``."""
    reason: str | None
    decided_ms: int | None = None
    list_version: int | None = None
    """The list version that added its card (or, after a rejection or the end of a
    confirmed enrollment, removed it)."""
    decision_seq: int | None = None
    """The ``enr`` seq of the decision sent; None while a decision is due."""
    elsewhere: tuple[str, ...] = ()
    """Other gateways whose list held the same permit when it was received (a finding for
    the registry comparison, not a rejection)."""
    ended_ms: int | None = None


@dataclass(frozen=True, slots=True)
class TenantEvent:
    """A stored event about a tenant, due to be acted on."""

    event: EventRecord
    chain_problem: bool
    """A chain problem is recorded at its seq (its contents, its link, a second copy)."""


@dataclass(frozen=True, slots=True)
class ListChange:
    """A list version allocated for enrollments, and what it changes."""

    version: int
    upsert: list[EntryRecord]
    remove: list[bytes]
    enrollments: list[str]
    """The enrollment ids it concerns."""
    base: int
    """The list version before it (the delta's ``base``)."""


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A publishing request a one-shot command left for the running ``serve``."""

    id: int
    op: str
    args: str
    requested_ms: int
    """Wall-clock ms (requests cross processes)."""


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """How a request ended: ``error_kind`` None (ok, ``result`` JSON), ``usage``,
    ``failure`` or ``expired``."""

    result: str | None
    error_kind: str | None
    error: str | None


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

REGISTRY_STATUSES = ("active", "lapsed", "cancelled", "moved_out")
"""A registry row's status (docs/registry.md)."""
FINDING_KINDS = ("unregistered_resident", "registry_inactive_but_open", "registered_no_card",
                 "no_entry_since", "permit_in_two_buildings", "lease_ended_still_active",
                 "gateway_silent", "list_stale")
"""What the comparison reports, in the order it reports them (docs/registry.md)."""


@dataclass(frozen=True, slots=True)
class RegistryRow:
    """One usable row of a registry export, checked and normalised."""

    line: int
    """Where it is in the file (1-based; for an .xlsx file, the sheet's row number)."""
    permit: str
    """The permit number, validated and normalised (``protocol.permits``)."""
    permit_hash: bytes
    """Under the office permit key: how it is matched with lists and enrollments."""
    building: str
    """The site id the office gave the building's gateway."""
    unit: str | None
    status: str
    """One of ``REGISTRY_STATUSES``."""
    registered_day: int | None
    valid_until_day: int | None
    """The last day the registration is valid (inclusive); None: no end given."""


@dataclass(frozen=True, slots=True)
class ReconcileParams:
    """The moment a comparison is made for, and its thresholds, as instants."""

    now_ms: int
    today: int
    """The day of ``now_ms`` in the office's zone: a registration valid until an earlier
    day has expired."""
    quiet_since_ms: int
    """``no_entry_since``: a listed card with no granted entry since this instant (and
    listed before it)."""
    silent_before_ms: int
    """``gateway_silent``: nothing heard from the gateway since before this instant."""
    stale_before_ms: int
    """``list_stale``: a list version (or revocation) sent before this instant and still
    not reported applied."""


@dataclass(frozen=True, slots=True)
class RegistryCounts:
    """What staging found in the registry rows."""

    staged: int
    duplicates: int
    """Rows set aside because a later row of the same permit and building replaced them
    (the later registration date, else the later line, wins)."""
    outside: int
    """Rows of buildings that no gateway of the office serves (kept for the detail
    "registered elsewhere", never a finding of their own)."""


@dataclass(frozen=True, slots=True)
class FindingRecord:
    """One finding of a session, in report order (building, kind, then as found)."""

    position: int
    """Its place in the order: the ``after`` of the next page."""
    kind: str
    """One of ``FINDING_KINDS``."""
    building: str
    gateway: str | None
    """The gateway whose list or state it concerns; None for ``registered_no_card``."""
    cred: bytes | None
    """The card's credential hash, when it is about a card."""
    permit: str | None
    """The permit number, when the office holds it: from the registry row, else from the
    enrollment made at the gateway; None for a card the office listed by hash only."""
    permit_hash: bytes | None
    unit: str | None
    """The unit as the registry (else the enrollment) gives it."""
    line: int | None
    """The registry row it rests on."""
    enrollment: str | None
    """The gateway's enrollment id, when the card came from an enrollment."""
    detail: str
    """JSON object text, by kind: ``unregistered_resident`` ``{"source": "list" |
    "provisional", "registered_at": [building…]}`` (buildings where the registry has the
    permit active); ``registry_inactive_but_open`` ``{"status": "lapsed" | "cancelled" |
    "moved_out" | "expired", "valid_until_day": int | null}``; ``registered_no_card``
    ``{}``; ``no_entry_since`` ``{"listed_since_ms": int}``; ``permit_in_two_buildings``
    ``{"other_buildings": [building…]}``; ``lease_ended_still_active`` ``{"lease_end":
    int (Unix s), "enrollment_status": str}``; ``gateway_silent`` ``{"last_seen_ms": int |
    null, "state": str | null}``; ``list_stale`` ``{"list": [applied | null, published],
    "rev": [reported | null, sent], "all": [reported | null, sent]}`` (the streams
    behind)."""


@dataclass(frozen=True, slots=True)
class BuildingFindings:
    """How many findings of one kind a building has."""

    building: str
    kind: str
    count: int


@dataclass(frozen=True, slots=True)
class DailyEntries:
    """Granted entries at a gateway on one day (``gateway`` ``*``: all gateways)."""

    gateway: str
    day: int
    entries: int


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


@dataclass(frozen=True, slots=True)
class CaseRecord:
    """One look at a person's movements, as the audit table keeps it."""

    at_ms: int
    officer: str
    """Who asked (``--officer``, else the operating-system user)."""
    reason: str
    """Why, in the officer's words (required)."""
    scope: str
    """What was shown: ``permit`` (``case --permit``) or ``events <gateway>``
    (``events GW --case``)."""
    permit_hash: bytes | None
    """Whose: the permit's hash (the number itself is not kept here)."""
    shown: int
    """How many events were shown."""
    id: int = 0
    """Given by the database."""


@dataclass(frozen=True, slots=True)
class FoldResult:
    """What one retention step did at one gateway."""

    folded: int
    """Events counted into the daily counts."""
    deleted: int
    """Events deleted (folded ones, and copies of events folded before)."""
    more: bool
    """Whether old events may remain beyond this step's batch."""


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
