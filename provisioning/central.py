"""The central office: allowlists, revocations and commands out; events, status in.

``Central`` is the reference peer of the gateway's sync (``protocol`` is the
contract) and a working tool for a small office (``permitgate-central``). It keeps its
state in one folder:

- ``central.db``: the database (``provisioning.db``; SQLite, WAL, ``synchronous=FULL``):
  gateways and the sequence number of every stream sent to them, enrolled entries (keyed
  hashes only), revocations, the events received and the chain problems found in them,
  what each gateway reported, enrollments made at gateways (with the permit numbers the
  office needs for the registry comparison), the enrollment policy, requests from
  one-shot commands to ``serve``; or, when the folder's ``database.url`` names one, a
  PostgreSQL database (``provisioning.db.backend``), which several ``serve`` instances
  can share (``share_group``);
- ``signing/<kid>.pem``, ``trusted-keys.txt``, ``permit.key``, ``seal.key`` and
  ``office-seal.pub``, ``site-keys/``: the keys (``provisioning.keys``, with the rotation
  of signing keys);
- ``serve.lock``: one publisher per folder (``provisioning.handoff``; with PostgreSQL,
  advisory locks in the database instead).

``Central`` only wires the rooms together; each does one job:

- ``provisioning.db``: every operation on the database, behind one interface;
- ``provisioning.keys``: keygen, the signing key, the permit key, site keys;
- ``provisioning.enrollment``: gateways and their enrolled cards;
- ``provisioning.publish``: typed operations built, numbered and signed;
- ``provisioning.receive``: gateway messages checked, stored, acknowledged, answered;
- ``provisioning.tenants``: enrollments made at gateways: unsealed, checked, confirmed or
  rejected by the office's policy or an officer, answered;
- ``provisioning.reports``: ``show``, ``events`` and ``enrollments``;
- ``provisioning.reconcile``: the comparison with the police registry, and queries for
  a case (``reconciler``, ``cases``); ``provisioning.retention``: old events folded into
  daily counts (``retention``, applied by ``serve`` when configured);
- ``provisioning.serve``: the worker thread of ``run()`` and its MQTT client;
- ``provisioning.mqtt``: broker settings and the one-shot connection;
- ``provisioning.handoff``: the folder lock and the request queue to a running ``serve``.

Threads: ``run()`` turns the calling thread into the one worker that does all database
work and all publishing; paho's network thread only hands messages to its queue. While
``run()`` is active, the public methods called from other threads are queued to that
worker and wait for its answer. Without ``run()`` (the one-shot CLI commands) they work
in the caller's thread on a short-lived connection and wait for the broker's PUBACK.
The chunks of a long snapshot are handed over by the pacer's thread (``chunk_rate``,
``provisioning.pacing.Pacer``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog

from protocol.messages import Entry, EventBatch, Revoked
from protocol.signing import b64
from provisioning.db import OfficeDatabase
from provisioning.db.backend import open_backend
from provisioning.enrollment import Enrollment, normalise_card_id
from provisioning.errors import CentralError, CentralUsageError, PublishError
from provisioning.handoff import REQUEST_TIMEOUT_S, Request, RequestQueue
from provisioning.keys import (
    DEFAULT_KID,
    PERMIT_KEY_NAME,
    SEAL_KEY_NAME,
    SEAL_PUBLIC_NAME,
    TRUSTED_KEYS_NAME,
    KeygenResult,
    OfficeKeys,
    keygen,
    permit_hash,
)
from provisioning.mqtt import DEFAULT_CLIENT_ID, BrokerSettings, OneShotLink
from provisioning.publish import (
    CHUNK_ENTRIES,
    COMMAND_ACTIONS,
    DEFAULT_CHUNK_RATE,
    DEFAULT_HEARTBEAT_TTL_S,
    DEFAULT_TTL_S,
    MAX_CHUNK_ENTRIES,
    REVOCATION_ITEMS,
    AnnounceKeys,
    HeartbeatAll,
    OpResult,
    Pacer,
    PublishDelta,
    Publisher,
    PublishSnapshot,
    RetireKey,
    Revoke,
    SendCommand,
    SendHeartbeat,
)
from provisioning.receive import (
    REMOVED_KEY,
    RESYNC_INTERVAL_S,
    Receiver,
    StoreResult,
    removed_record,
)
from provisioning.reconcile.cases import Cases
from provisioning.reconcile.findings import Reconciler
from provisioning.reports import Reports
from provisioning.retention import Retention
from provisioning.rotation import KEYS_SEQ_KEY, key_versions
from provisioning.serve import DEFAULT_HEARTBEAT_EVERY_S, Duties, Worker
from provisioning.site_rotation import FinishSiteKey, SiteKeyRotation, StartSiteKey
from provisioning.tenants import POLICIES, ConfirmEnrollment, RejectEnrollment, Tenants

__all__ = [  # what the CLI, tests and benchmarks take from the facade
    "CHUNK_ENTRIES",
    "COMMAND_ACTIONS",
    "DEFAULT_CHUNK_RATE",
    "DEFAULT_HEARTBEAT_EVERY_S",
    "DEFAULT_KID",
    "ENROLLMENT_POLICIES",
    "MAX_CHUNK_ENTRIES",
    "PERMIT_KEY_NAME",
    "SEAL_KEY_NAME",
    "SEAL_PUBLIC_NAME",
    "TRUSTED_KEYS_NAME",
    "Central",
    "CentralError",
    "CentralUsageError",
    "KeygenResult",
    "PublishError",
    "StoreResult",
    "keygen",
    "permit_hash",
]

ENROLLMENT_POLICIES = POLICIES

DB_NAME = "central.db"

log = structlog.get_logger()


class Central:
    """The central office's state and its MQTT peer (see the module docstring)."""

    def __init__(self, folder: Path, host: str = "localhost", port: int = 1883, *,
                 tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, client_id: str = DEFAULT_CLIENT_ID,
                 signing_kid: str | None = None, ttl_s: int = DEFAULT_TTL_S,
                 heartbeat_ttl_s: int = DEFAULT_HEARTBEAT_TTL_S,
                 resync_interval_s: float = RESYNC_INTERVAL_S,
                 clock: Callable[[], float] = time.time, connect_timeout_s: float = 10.0,
                 publish_timeout_s: float = 10.0,
                 session_expiry_s: int | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S,
                 share_group: str | None = None,
                 chunk_rate: int = DEFAULT_CHUNK_RATE) -> None:
        if ttl_s < 1 or heartbeat_ttl_s < 1:
            raise CentralUsageError("ttl: must be at least 1 s")
        broker = BrokerSettings(host, port, client_id, tls_ca, tls_cert, tls_key,
                                connect_timeout_s, publish_timeout_s, session_expiry_s,
                                share_group)
        # Snapshot chunks to each gateway at most chunk_rate bytes/s (0: unpaced).
        self._pacer = Pacer(chunk_rate, self._release)
        self.folder = folder
        self.host, self.port = host, port
        self.client_id = client_id
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CentralUsageError(f"--dir {folder}: cannot create it: {exc.strerror}"
                                    ) from None
        # central.db, or the PostgreSQL database the folder names (provisioning.db.backend).
        self._backend = open_backend(folder, client_id=client_id, share_group=share_group)
        self._db: OfficeDatabase = self._backend.db
        self._keys = OfficeKeys(folder, signing_kid)
        self._lock = self._backend.lock
        self._link = OneShotLink(broker)
        self._worker = Worker(broker, request_timeout_s, self._backend.order)
        self._requests = RequestQueue(self._db, request_timeout_s)
        self._publisher = Publisher(self._db, self._keys, self._send, clock=clock,
                                    ttl_s=ttl_s, heartbeat_ttl_s=heartbeat_ttl_s,
                                    pacer=self._pacer)
        self._enrollment = Enrollment(self._db, self._keys, clock=clock,
                                      on_worker=self._worker.submit)
        self._tenants = Tenants(self._db, self._keys, self._publisher, clock=clock)
        self._site_keys = SiteKeyRotation(self._db, self._keys, self._publisher, self._send,
                                          clock=clock, resend_interval_s=resync_interval_s)
        self._receiver = Receiver(self._db, self._publisher, clock=clock,
                                  resync_interval_s=resync_interval_s, tenants=self._tenants,
                                  site_keys=self._site_keys)
        self._reports = Reports(self._db)
        # The registry comparison, cases and retention (docs/registry.md, docs/privacy.md).
        self.reconciler = Reconciler(self._db, self._keys, clock=clock)
        self.cases = Cases(self._db, self._keys, clock=clock)
        self.retention = Retention(self._db, clock=clock)
        self._caught_up = False
        self.subscribed = self._worker.subscribed
        """Set once the serving client's subscription is acknowledged (tests wait on it)."""

    @property
    def malformed(self) -> int:
        """Malformed or unexpected gateway messages seen by this process."""
        return self._receiver.malformed

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Central:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect (one-shot mode), release the folder, close the database."""
        self._pacer.stop()
        try:
            self._link.close()
        finally:
            self._lock.release()
            self._db.close()

    def permit_key(self) -> bytes:
        """The office-wide permit key."""
        return self._keys.permit_key()

    # -- gateways and enrollment (provisioning.enrollment) ----------------------------

    def add_gateway(self, gateway_id: str, site_id: str, site_key: bytes | Path, *,
                    events_from: int = 1) -> None:
        """Register a gateway (``Enrollment.add_gateway``)."""
        self._enrollment.add_gateway(gateway_id, site_id, site_key, events_from=events_from)

    def gateways(self) -> list[str]:
        """Every registered gateway id."""
        return self._enrollment.gateways()

    def mark_removed(self, gateway_id: str, record: dict[str, str]) -> None:
        """Record ``gateway_id`` as removed (``record``: when, why, what was revoked): from
        now on the office refuses its messages (``Receiver``)."""
        self._db.set_meta(REMOVED_KEY.format(gateway=gateway_id), json.dumps(record))

    def removed(self, gateway_id: str) -> dict[str, str] | None:
        """What ``mark_removed`` recorded for ``gateway_id``, or None."""
        return removed_record(self._db, gateway_id)

    def enroll(self, gateway: str, card_id: str, permit_number: str, *,
               valid_from: int | None = None, valid_until: int | None = None,
               doors: Sequence[str] | None = None, schedule: str | None = None) -> bytes:
        """Store (or replace) a card's entry; returns its credential hash; sends nothing
        (``Enrollment.enroll``)."""
        return self._enrollment.enroll(gateway, card_id, permit_number,
                                       valid_from=valid_from, valid_until=valid_until,
                                       doors=doors, schedule=schedule)

    def enroll_many(self, gateway: str, cards: Iterable[tuple[str, str]], *,
                    valid_from: int | None = None, valid_until: int | None = None) -> int:
        """Store many ``(card id, permit number)`` entries in one transaction
        (``Enrollment.enroll_many``); returns how many."""
        return self._enrollment.enroll_many(gateway, cards, valid_from=valid_from,
                                            valid_until=valid_until)

    def remove(self, gateway: str, card_id: str) -> bytes:
        """Delete a card's entry for ``gateway``; returns its credential hash."""
        return self._enrollment.remove(gateway, card_id)

    def entries(self, gateway: str) -> list[Entry]:
        """The stored allowlist of ``gateway`` as wire entries, by credential hash."""
        return self._enrollment.entries(gateway)

    def revocations(self, gateway: str) -> list[Revoked]:
        """What a snapshot for ``gateway`` revokes: its own and the global revocations."""
        return self._enrollment.revocations(gateway)

    # -- publishing (provisioning.publish) -------------------------------------------

    def publish_snapshot(self, gateway: str, chunk_entries: int = CHUNK_ENTRIES) -> int:
        """Send the whole allowlist of ``gateway`` as a new version; returns it."""
        return self._seq(PublishSnapshot(gateway, chunk_entries))

    def publish_delta(self, gateway: str, upsert: Sequence[str] = (),
                      remove: Sequence[str] = ()) -> int:
        """Send the stored entries of the cards ``upsert`` and the removal of the cards
        ``remove`` (card ids) as version ``base + 1``; returns the new version."""
        hasher = self._enrollment.hasher(gateway)
        return self._seq(PublishDelta(
            gateway, tuple(hasher.credential(normalise_card_id(c)) for c in upsert),
            tuple(h for c in remove for h in self._enrollment.credentials(gateway, c))))

    def revoke(self, target: str, items: Sequence[Revoked]) -> int:
        """Revoke ``items`` at gateway ``target``, or at every gateway with ``"*"``
        (broadcast stream), in messages of at most ``REVOCATION_ITEMS``. Returns the
        stream seq of the last."""
        items = tuple(items)
        seq = 0
        for start in range(0, max(len(items), 1), REVOCATION_ITEMS):
            seq = self._seq(Revoke(target, items[start:start + REVOCATION_ITEMS]))
        return seq

    def revoke_permit(self, permit_number: str, gateway: str = "*") -> int:
        """Revoke a permit (every card of it) at one gateway or, by default, everywhere."""
        if not permit_number.strip():
            raise CentralUsageError("--permit: empty permit number")
        digest = self._keys.permit_hash(permit_number)
        return self.revoke(gateway, [Revoked(kind="permit", hash=b64(digest))])

    def revoke_card(self, gateway: str, card_id: str) -> int:
        """Revoke one card at ``gateway`` (under both keys during a site-key
        change-over)."""
        return self.revoke(gateway, [Revoked(kind="credential", hash=b64(digest))
                                     for digest in self._enrollment.credentials(gateway,
                                                                                card_id)])

    def command(self, gateway: str, action: str) -> int:
        """Send an operational command; returns its seq."""
        return self._seq(SendCommand(gateway, action))

    def heartbeat(self, gateway: str) -> int:
        """Send 'your lists are current as of these versions'; returns its seq."""
        return self._seq(SendHeartbeat(gateway))

    def heartbeat_all(self) -> dict[str, int]:
        """A heartbeat to every gateway; returns the seq sent to each."""
        result = self._publish(HeartbeatAll())
        if not isinstance(result, dict):
            raise CentralError(f"heartbeat_all: unexpected result {result!r}")
        return result

    # -- signing key rotation (provisioning.rotation) ----------------------------------

    def announce_keys(self) -> int:
        """Announce the signing keys and their states to every gateway; returns the seq."""
        return self._seq(AnnounceKeys())

    def retire_key(self, kid: str, grace_s: int = 0) -> int:
        """Stop signing with ``kid`` and announce it retired (``retiring`` for
        ``grace_s``); returns the announcement's seq."""
        return self._seq(RetireKey(kid, grace_s))

    def key_rotation_state(self) -> tuple[int, dict[str, int]]:
        """The latest ``keys`` seq sent (0: none) and the one each gateway holds."""
        return int(self._db.meta(KEYS_SEQ_KEY) or 0), key_versions(self._db)

    def start_site_key(self, gateway: str) -> int:
        """Begin a change-over to a new site key at ``gateway`` (provisioning.site_rotation);
        returns the ``site`` seq sent."""
        return self._seq(StartSiteKey(gateway))

    def finish_site_key(self, gateway: str, *, force: bool = False) -> int:
        """End ``gateway``'s change-over: the previous key dropped, the list sent again."""
        return self._seq(FinishSiteKey(gateway, force))

    def site_key_status(self, gateway: str) -> dict[str, Any]:
        """The progress of ``gateway``'s site-key rotation."""
        return self._site_keys.status(gateway)

    def signing_kid(self) -> str:
        """The id of the key the office signs with now."""
        self._keys.reload()
        return self._keys.signing()[0]

    # -- enrollments made at gateways (provisioning.tenants) ----------------------------

    def enrollment_policy(self) -> str:
        """``auto`` (confirm what checks out) or ``hold`` (wait for an officer)."""
        return self._tenants.policy()

    def set_enrollment_policy(self, policy: str) -> None:
        """Set the policy; a running ``serve`` applies it to what it receives next."""
        self._worker.submit(lambda: self._tenants.set_policy(policy))

    def enrollments(self, gateway: str | None = None, status: str | None = None, *,
                    reveal: bool = False) -> list[dict[str, Any]]:
        """Enrollments made at gateways (``Reports.enrollments``)."""
        return self._reports.enrollments(gateway, status, reveal=reveal)

    def confirm_enrollment(self, gateway: str, enrollment: str) -> dict[str, int]:
        """Confirm a received or held enrollment: its card into the list (a delta), then
        the signed decision; a confirmed one's decision is sent again. Returns
        ``{"enr": seq, "list": version}`` (``list`` only when the list changed)."""
        return self._decision(ConfirmEnrollment(gateway, enrollment))

    def reject_enrollment(self, gateway: str, enrollment: str,
                          reason: str = "officer") -> dict[str, int]:
        """Reject an enrollment (a confirmed one's card leaves the list), then the signed
        decision; a rejected one's decision is sent again."""
        return self._decision(RejectEnrollment(gateway, enrollment, reason))

    def _decision(self, op: Request) -> dict[str, int]:
        result = self._publish(op)
        if not isinstance(result, dict):
            raise CentralError(f"{type(op).__name__}: unexpected result {result!r}")
        return result

    def _seq(self, op: Request) -> int:
        result = self._publish(op)
        if not isinstance(result, int):
            raise CentralError(f"{type(op).__name__}: unexpected result {result!r}")
        return result

    def _check(self, op: Request) -> None:
        if isinstance(op, ConfirmEnrollment | RejectEnrollment):
            self._tenants.check(op)
        elif isinstance(op, StartSiteKey | FinishSiteKey):
            self._site_keys.check(op)
        else:
            self._publisher.check(op)

    def _perform(self, op: Request) -> OpResult:
        if isinstance(op, ConfirmEnrollment | RejectEnrollment):
            return self._tenants.perform(op)
        if isinstance(op, StartSiteKey | FinishSiteKey):
            return self._site_keys.perform(op)
        return self._publisher.perform(op)

    def _publish(self, op: Request) -> OpResult:
        """Check ``op``, then run it through the one publisher of this folder: on the
        worker while ``run()`` is active here; else handed to the ``serve`` that holds the
        folder lock elsewhere, without connecting (``provisioning.handoff``); else here,
        on a one-shot connection made before any sequence number is spent, every message
        acknowledged by the broker before this returns (``provisioning.mqtt``)."""
        self._check(op)
        if self._worker.active:
            return self._worker.submit(lambda: self._perform(op))
        if not self._link.connected and not self._lock.hold(exclusive=False):
            return self._requests.submit(op)
        self._link.connect()
        result = self._perform(op)
        self._pacer.drain()  # a long snapshot's chunks, handed over at the paced rate
        self._link.flush()
        return result

    def _send(self, topic: str, payload: bytes) -> None:
        """Hand one QoS 1 message to paho (worker thread or one-shot caller only)."""
        if self._worker.active:
            self._worker.send(topic, payload)
        else:
            self._link.send(topic, payload)

    def _release(self, topic: str, payload: bytes) -> None:
        """Hand one paced message to paho (the pacer's thread)."""
        if self._worker.active:
            self._worker.publish(topic, payload)
        else:
            self._link.send(topic, payload)

    # -- serving and receiving (provisioning.serve, provisioning.receive) -------------

    def run(self, stop: threading.Event, *, heartbeat_every_s: float | None = None) -> None:
        """Receive, store, acknowledge and answer until ``stop`` is set.

        The calling thread becomes the worker: it alone touches the database and
        publishes. With ``heartbeat_every_s`` every gateway gets a heartbeat right after
        the first connection and then at that interval.
        """
        if self._worker.active or self._link.connected:
            raise CentralError("this Central is running or publishing already")
        self._keys.signing()  # a missing key is a usage error now, not a log line later
        if not self._lock.hold(exclusive=True):
            raise CentralError(self._backend.refusal())
        try:
            self._requests.reset()
            self._caught_up = False
            self._worker.run(stop, Duties(self._receiver.handle,
                                          self._publisher.heartbeat_all, self._chores),
                             heartbeat_every_s=heartbeat_every_s)
        finally:
            self._pacer.stop()
            self._lock.release()

    def _chores(self) -> None:
        if not self._caught_up and self._worker.subscribed.is_set():
            # Once connected: tenant events a stop left unacted on, decisions it left
            # unsent (provisioning.tenants).
            self._caught_up = True
            try:
                self._tenants.catch_up()
            except (CentralError, CentralUsageError) as exc:
                log.error("tenant_events_not_processed", error=str(exc))
        self._receiver.answer_due_resyncs()
        self._requests.serve_pending(self._perform)
        self.retention.chore()  # one batch at most, when the setting is on

    def store_events(self, gateway: str, batch: EventBatch) -> StoreResult:
        """Store a batch once (dedupe by seq), check its links, advance ``acked_upto``
        (``Receiver.store_events``). Its tenant events are acted on by ``run()``: after
        the next batch it receives, or once it is connected."""
        return self._receiver.store_events(gateway, batch)

    # -- reports (provisioning.reports) ----------------------------------------------

    def report(self) -> dict[str, Any]:
        """Everything ``show`` prints, as plain data."""
        return {**self._reports.report(), "enrollment_policy": self._tenants.policy()}

    def gateway_report(self, gateway: str) -> dict[str, Any]:
        """The ``show`` report of one gateway."""
        return self._reports.gateway_report(gateway)

    def events(self, gateway: str, *, limit: int | None = None,
               after_seq: int = 0) -> list[dict[str, Any]]:
        """Stored events of ``gateway`` in seq order (the newest ``limit`` if given)."""
        return self._reports.events(gateway, limit=limit, after_seq=after_seq)
