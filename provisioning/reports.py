"""Reports: what ``show``, ``events`` and ``enrollments`` print, as plain data (JSON-ready
dicts)."""

from __future__ import annotations

import json
import re
from typing import Any

from protocol.hashing import log_prefix
from provisioning.db import ENROLLMENT_STATUSES, GatewayRecord, OfficeDatabase
from provisioning.enrollment import known_gateway
from provisioning.errors import CentralUsageError
from provisioning.receive import removed_record


def _version_key(version: str | None) -> tuple[int, list[int], str]:
    """Versions in release order (0.9.0 before 0.10.0), those never reported last."""
    if version is None:
        return (1, [], "")
    return (0, [int(n) for n in re.findall(r"\d+", version)], version)


def by_version(gateways: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gateways expected to report, grouped by the software version their last status
    reported (None: no status yet, or from a gateway that does not report one), oldest
    first. Removed gateways (``remove-gateway``) are left out: they report no more."""
    groups: dict[str | None, list[str]] = {}
    for gw in gateways:
        if gw.get("removed") is None:
            groups.setdefault(gw["version"], []).append(gw["gateway"])
    return [{"version": version, "gateways": groups[version]}
            for version in sorted(groups, key=_version_key)]


class Reports:
    """Reads the office's state for people (``show``, ``events``) and tests."""

    def __init__(self, db: OfficeDatabase) -> None:
        self._db = db

    def report(self) -> dict[str, Any]:
        """Everything ``show`` prints, as plain data."""
        db = self._db
        all_seq = db.all_seq()
        gateways = [self._gateway_report(row) for row in db.gateways()]
        return {"all_seq": all_seq, "global_revocations": db.global_revocation_count(),
                "unknown_gateway_messages": db.unknown_gateway_messages(),
                "gateways": gateways, "by_version": by_version(gateways),
                "removed": [gw["gateway"] for gw in gateways if gw["removed"] is not None]}

    def gateway_report(self, gateway: str) -> dict[str, Any]:
        """The ``show`` report of one gateway."""
        return self._gateway_report(known_gateway(self._db, gateway))

    def _gateway_report(self, row: GatewayRecord) -> dict[str, Any]:
        gw = row.id
        status = json.loads(row.status) if row.status else None
        applied = {r.stream: {"seq": r.seq, "status": r.status, "reason": r.reason,
                              "list_version": r.list_version, "ts_ms": r.ts_ms,
                              "received_ms": r.received_ms}
                   for r in self._db.applied(gw)}
        problems = [{"seq": p.seq, "problem": p.problem, "found_ms": p.found_ms}
                    for p in self._db.chain_problems(gw)]
        counts = self._db.counts(gw)
        removed = removed_record(self._db, gw)
        return {
            "gateway": gw,
            "site": row.site,
            # A removed gateway's last status is kept in "status", but it is neither online
            # nor offline: the office refuses what it sends.
            "state": ("removed" if removed is not None else "no status" if status is None
                      else "online" if status.get("state") == "online" else "offline"),
            "removed": removed,
            "online": None if status is None or removed is not None
            else status.get("state") == "online",
            "version": (status or {}).get("version"),
            "status": status,
            "status_ms": row.status_ms,
            "list": {"published": row.list_version,
                     "published_ms": row.list_published_ms,
                     "applied": row.applied_list_version,
                     "applied_ms": row.applied_ms,
                     "current": row.applied_list_version == row.list_version},
            "streams": {"rev": row.rev_seq, "cmd": row.cmd_seq, "hb": row.hb_seq,
                        "ack": row.ack_seq, "enr": row.enr_seq},
            "enrollments": self._db.enrollment_counts(gw),
            "reported_versions": (status or {}).get("versions", {}),
            "applied": applied,
            "entries": counts.entries,
            "revocations": counts.revocations,
            "events": {"stored": counts.events,
                       "highest_seq": counts.highest_seq,
                       "acked_upto": row.acked_upto},
            "chain_problems": problems,
            "resync": {"requested_ms": row.resync_requested_ms,
                       "reason": row.resync_reason,
                       "answered_ms": row.resync_answered_ms},
            "malformed": row.malformed,
        }

    def events(self, gateway: str, *, limit: int | None = None,
               after_seq: int = 0) -> list[dict[str, Any]]:
        """Stored events of ``gateway`` in seq order (the newest ``limit`` if given)."""
        known_gateway(self._db, gateway)
        return [{"seq": s.event.seq, "event_id": s.event.event_id, "ts_ms": s.event.ts_ms,
                 "kind": s.event.kind, "door": s.event.door, "reader": s.event.reader,
                 "direction": s.event.direction, "reason": s.event.reason,
                 "cred": s.event.cred, "data": json.loads(s.event.data),
                 "prev_hash": s.event.prev_hash, "hash": s.event.hash,
                 "received_ms": s.received_ms}
                for s in self._db.events(gateway, after_seq=after_seq, limit=limit)]

    def enrollments(self, gateway: str | None = None, status: str | None = None, *,
                    reveal: bool = False) -> list[dict[str, Any]]:
        """Enrollments made at gateways, by gateway and event seq. The card shows as its
        hash prefix; the permit number only with ``reveal`` (an officer comparing it with
        the registry), else only whether the office holds one."""
        if gateway is not None:
            known_gateway(self._db, gateway)
        if status is not None and status not in ENROLLMENT_STATUSES:
            raise CentralUsageError(f"--status {status!r}: one of "
                                    f"{', '.join(ENROLLMENT_STATUSES)}")
        return [{"gateway": r.gateway, "enrollment": r.id, "seq": r.seq, "unit": r.unit,
                 "cred": None if r.cred is None else log_prefix(r.cred),
                 "permit": r.permit if reveal else None,
                 "permit_held": r.permit is not None,
                 "lease_end": r.lease_end, "provisional_until": r.provisional_until,
                 "account": r.account, "received_ms": r.received_ms, "status": r.status,
                 "reason": r.reason, "decided_ms": r.decided_ms,
                 "list_version": r.list_version, "decision_seq": r.decision_seq,
                 "elsewhere": list(r.elsewhere), "ended_ms": r.ended_ms}
                for r in self._db.enrollments(gateway, status)]
