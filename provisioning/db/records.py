"""The records of the office's database: the plain values ``OfficeDatabase``
(``provisioning/db/__init__.py``) takes and returns, and the names of its kinds and
statuses. Every one is importable from ``provisioning.db`` as well.

Hashes are ``bytes``, times Unix ms (or s where a field says so), JSON is text; a record
holds no connection or cursor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


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
# (what an implementation keeps for them: the banner in provisioning/db/__init__.py)

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
