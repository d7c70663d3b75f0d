"""The control socket's tenant requests: what the landlord page and ``permitgate enroll``
ask of the agent (docs/landlord.md, "The page and the agent").

The page is its own process with its own user; it holds no key and cannot write the
stores. It asks over ``web.sock`` (these requests only); the CLI over ``sim.sock`` (these
and the simulation's). Every request is a strict model (extra fields refused, lengths
bounded); replies are ``{"ok": true, ...}`` or ``{"ok": false, "error", "message"}``,
and a refused enrollment names the field and rule so the page can say it in the
landlord's language. Handlers run on the control socket's thread and see the agent only
through ``TenantHost``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, StringConstraints

from agent.config import Config
from agent.control import Address, RequestError, _Request
from agent.enroll import Captures, Enroller, EnrollError, end_of_day_s
from agent.store import Store
from agent.tenants import Enrollment, TenantState
from protocol.chain import Event
from protocol.hashing import log_prefix

Name = Annotated[str, StringConstraints(min_length=1, max_length=64,
                                        pattern=r"^[A-Za-z0-9._@-]+$")]
Unit = Annotated[str, StringConstraints(min_length=1, max_length=32)]
Uuid = Annotated[str, StringConstraints(pattern=r"^[0-9a-f-]{36}$")]
CaptureId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
AUDIT_KINDS = ("web_sign_in", "web_sign_in_failed", "web_signed_out", "web_account_created",
               "web_account_changed", "web_account_deleted")


class SiteRequest(_Request):
    """The building as the page needs it: units, readers, time zone, windows."""

    op: Literal["site"]


class CaptureStartRequest(_Request):
    """Capture the next tap at a reader for enrollment."""

    op: Literal["capture_start"]
    reader: Annotated[str, StringConstraints(min_length=1, max_length=63)]
    account: Name | None = None


class CaptureStatusRequest(_Request):
    """Where a capture stands."""

    op: Literal["capture_status"]
    capture: CaptureId


class EnrollRequest(_Request):
    """Enroll the tenant of a captured card."""

    op: Literal["enroll"]
    capture: CaptureId
    unit: Unit
    permit: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    lease_end: Annotated[str, StringConstraints(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    account: Name | None = None


class MoveOutRequest(_Request):
    """End one tenant's access, or every tenant's of a unit."""

    op: Literal["move_out"]
    enrollment: Uuid | None = None
    unit: Unit | None = None
    account: Name | None = None


class TenantsRequest(_Request):
    """Every enrollment, newest first."""

    op: Literal["tenants"]


class DoorSummaryRequest(_Request):
    """Alarms, faults and entries per day (counts only) of the last days."""

    op: Literal["door_summary"]
    days: int = 14


class InstallerStatusRequest(_Request):
    """Readers, doors, mode, sync, clock, disk, outbox and the doctor's file checks."""

    op: Literal["installer_status"]


class AuditRequest(_Request):
    """Record a page event (sign-in, account change) in the chain."""

    op: Literal["audit"]
    kind: Literal["web_sign_in", "web_sign_in_failed", "web_signed_out",
                  "web_account_created", "web_account_changed", "web_account_deleted"]
    account: Name
    data: dict[str, Annotated[str, StringConstraints(max_length=128)] | int | bool] = Field(
        default_factory=dict, max_length=8)


class TenantHost(Protocol):
    """What the tenant requests need of the agent."""

    config: Config
    captures: Captures

    def tenant_store(self) -> Store:
        """The open store."""
        ...

    def enroller(self) -> Enroller:
        """The enroller (``EnrollError`` with rule ``no_seal_key`` if it cannot seal)."""
        ...

    def record(self, event: Event) -> None:
        """Append an event to the chain."""
        ...


Handler = Callable[[Any, Address], dict[str, Any] | None]


class TenantOps:
    """The handlers, keyed by request model (``ControlServer(extra=...)``)."""

    def __init__(self, host: TenantHost, *, clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self._clock = clock

    def handlers(self) -> Mapping[str, tuple[type[_Request], Handler]]:
        """``op`` → (request model, handler)."""
        return {
            "site": (SiteRequest, self._site),
            "capture_start": (CaptureStartRequest, self._capture_start),
            "capture_status": (CaptureStatusRequest, self._capture_status),
            "enroll": (EnrollRequest, self._enroll),
            "move_out": (MoveOutRequest, self._move_out),
            "tenants": (TenantsRequest, self._tenants),
            "door_summary": (DoorSummaryRequest, self._door_summary),
            "installer_status": (InstallerStatusRequest, self._installer_status),
            "audit": (AuditRequest, self._audit),
        }

    @property
    def _config(self) -> Config:
        return self.host.config

    def _site(self, _r: SiteRequest, _s: Address) -> dict[str, Any]:
        cfg = self._config
        return {"ok": True, "site": cfg.site.site_id, "timezone": cfg.site.timezone,
                "units": list(cfg.enrollment.units),
                "readers": [{"id": r.id, "door": r.door, "direction": r.direction}
                            for r in cfg.readers],
                "provisional_h": cfg.enrollment.provisional_h,
                "capture_timeout_s": cfg.enrollment.capture_timeout_s}

    def _capture_start(self, r: CaptureStartRequest, _s: Address) -> dict[str, Any]:
        if r.reader not in {reader.id for reader in self._config.readers}:
            raise RequestError("unknown_reader", "reader: no reader with that id")
        timeout = self._config.enrollment.capture_timeout_s
        capture = self.host.captures.start(r.reader, timeout, r.account)
        return {"ok": True, "capture": capture.id, "timeout_s": timeout}

    def _capture_status(self, r: CaptureStatusRequest, _s: Address) -> dict[str, Any]:
        capture = self.host.captures.get(r.capture)
        if capture is None:
            return {"ok": True, "state": "expired", "prefix": None, "card": None}
        state = "captured" if capture.cred is not None else "waiting"
        return {"ok": True, "state": state, "prefix": capture.prefix,
                "card": None if capture.status is None else capture.status.value,
                "reader": capture.reader}

    def _enroll(self, r: EnrollRequest, _s: Address) -> dict[str, Any]:
        zone = self._config.zone
        try:
            lease_end = date.fromisoformat(r.lease_end)
        except ValueError:
            return _invalid(EnrollError("lease_end", "bad_date",
                                        "lease_end: not a date (YYYY-MM-DD)"))
        capture = self.host.captures.get(r.capture)
        if capture is None or capture.cred is None:
            return _invalid(EnrollError("capture", "no_capture", "no card was captured for "
                                        "this enrollment (or the capture expired): tap the "
                                        "card again"))
        try:
            enroller = self.host.enroller()
            # Check the form before the capture is used up: a typo keeps the card.
            today = datetime.fromtimestamp(self._clock(), zone).date()
            enroller.check(unit=r.unit, permit=r.permit, lease_end=lease_end, today=today)
            if self.host.captures.use(r.capture) is None:
                raise EnrollError("capture", "no_capture", "the captured card was used for "
                                  "another enrollment: tap the card again")
            enrollment = enroller.enroll(
                capture.cred, unit=r.unit, permit=r.permit, lease_end=lease_end,
                today=today, lease_end_s=end_of_day_s(lease_end, zone), account=r.account)
        except EnrollError as exc:
            return _invalid(exc)
        return {"ok": True, "enrollment": _tenant(enrollment, None)}

    def _move_out(self, r: MoveOutRequest, _s: Address) -> dict[str, Any]:
        if (r.enrollment is None) == (r.unit is None):
            raise RequestError("bad_request", "give either enrollment or unit")
        ended = self.host.enroller().move_out(account=r.account, enrollment_id=r.enrollment,
                                              unit=r.unit)
        return {"ok": True, "ended": [e.id for e in ended]}

    def _tenants(self, _r: TenantsRequest, _s: Address) -> dict[str, Any]:
        store = self.host.tenant_store()
        tenants = store.tenants.all()
        last = store.last_passages([e.cred for e in tenants])
        zone = self._config.zone
        return {"ok": True, "tenants": [
            _tenant(e, None if e.cred not in last else
                    datetime.fromtimestamp(last[e.cred], zone).date().isoformat())
            for e in tenants]}

    def _door_summary(self, r: DoorSummaryRequest, _s: Address) -> dict[str, Any]:
        days = max(1, min(r.days, 90))
        since_ms = int((self._clock() - days * 86_400) * 1000)
        store = self.host.tenant_store()
        alarms = [{"ts_ms": e.ts_ms, "kind": e.kind, "door": e.door}
                  for e in store.events(since_ms=since_ms, newest_first=True, limit=500)
                  if e.kind in ("door_forced", "door_held_open")]
        faults = [{"ts_ms": e.ts_ms, "kind": e.kind, "door": e.door or e.reader}
                  for e in store.events(since_ms=since_ms, newest_first=True, limit=2000)
                  if e.kind.endswith("_fault") or e.kind in ("reader_offline",
                                                              "reader_tamper", "reader_power")]
        return {"ok": True, "alarms": alarms[:100], "faults": faults[:100],
                "entries_per_day": store.entries_per_day(self._config.zone, since_ms)}

    def _installer_status(self, _r: InstallerStatusRequest, _s: Address) -> dict[str, Any]:
        from agent import doctor  # noqa: PLC0415 - doctor imports the runtime that imports this

        store = self.host.tenant_store()
        devices: dict[str, dict[str, Any]] = {}
        for row in store.device_states():
            devices.setdefault(row["kind"], {})[row["id"]] = json.loads(row["state"])
        cfg, path = self._config, getattr(self.host, "config_path", None)
        checks = [doctor.check_store(cfg, path), doctor.check_site_key(cfg, path),
                  *doctor.check_sync(cfg, path), doctor.check_clock(cfg, path)]
        disk = shutil.disk_usage(store.path.parent)
        sync_states = {row["stream"]: row for row in store.sync_states()}
        heartbeat = sync_states.get("hb")
        return {
            "ok": True, "mode": devices.get("system", {}).get("mode", {}).get(
                "mode", cfg.policy.mode),
            "readers": devices.get("reader", {}), "doors": devices.get("door", {}),
            "sync": {"enabled": cfg.sync.enabled,
                     "stale": devices.get("system", {}).get("sync", {}).get("stale"),
                     "last_heartbeat_age_s": None if heartbeat is None else
                     round(self._clock() - heartbeat["updated_ms"] / 1000),
                     "versions": {s: row["version"] for s, row in sync_states.items()}},
            "clock": devices.get("system", {}).get("clock", {}).get("state", "unknown"),
            "disk": {"free_bytes": disk.free, "total_bytes": disk.total},
            "outbox": store.counts("outbox")["outbox"],
            "checks": [{"status": c.status, "name": c.subject, "detail": c.detail,
                        "fix": c.fix} for c in checks]}

    def _audit(self, r: AuditRequest, _s: Address) -> dict[str, Any]:
        self.host.record(Event(r.kind, data={"account": r.account, **r.data}))
        return {"ok": True}


def _invalid(exc: EnrollError) -> dict[str, Any]:
    return {"ok": False, "error": "invalid", "field": exc.field, "rule": exc.rule,
            "message": str(exc), "params": {k: v for k, v in exc.params.items()
                                            if isinstance(v, str | int | float | bool)}}


def _tenant(e: Enrollment, last_entry: str | None) -> dict[str, Any]:
    valid_until = {TenantState.PENDING: min(e.provisional_until, e.lease_end),
                   TenantState.CONFIRMED: e.lease_end}.get(e.state)
    return {"id": e.id, "unit": e.unit, "prefix": log_prefix(e.cred), "state": e.state.value,
            "valid_until": valid_until,
            "provisional_until": e.provisional_until, "lease_end": e.lease_end,
            "last_entry": last_entry, "created_ms": e.created_ms, "account": e.account,
            "reason": e.reason}
