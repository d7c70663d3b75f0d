"""Tenants, moving out, the door events summary and the installer's page.

What a landlord sees of tenants is what the agent keeps: unit, card-hash prefix, state,
validity and the day of the last entry. No page lists one person's comings and goings:
the door events page counts entries per day and door, and lists alarms and faults.
Moving out ends access at once, after a confirmation step; the agent records it with the
account's name.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from starlette.responses import Response

from agent.web.app import Ctx, log, page

STATE_ORDER = {"pending": 0, "confirmed": 1, "rejected": 2, "ended": 3}
ACTIVE = ("pending", "confirmed")
SUMMARY_DAYS = 14
_ENROLLMENT_ID = re.compile(r"[0-9a-f-]{36}")


def _natural(unit: str) -> tuple[Any, ...]:
    """Units in the order people count them: 2 before 10, 101 before 1001."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", unit))


async def _tenants(ctx: Ctx) -> list[dict[str, Any]]:
    reply = await ctx.web.link.call({"op": "tenants"})
    tenants = [t for t in reply.get("tenants", []) if isinstance(t, dict)]
    tenants.sort(key=lambda t: (_natural(str(t.get("unit", ""))),
                                STATE_ORDER.get(str(t.get("state")), 9),
                                -int(t.get("created_ms") or 0)))
    return tenants


@page()
async def tenants(ctx: Ctx) -> Response:
    """Every tenant by unit: current ones first, earlier ones folded away."""
    rows = await _tenants(ctx)
    units: dict[str, list[dict[str, Any]]] = defaultdict(list)
    earlier: list[dict[str, Any]] = []
    for tenant in rows:
        if tenant.get("state") in ACTIVE:
            units[str(tenant.get("unit"))].append(tenant)
        else:
            earlier.append(tenant)
    ended = ctx.request.query_params.get("ended")
    return ctx.render("tenants.html", units=units, earlier=earlier, total=len(rows),
                      ended=int(ended) if ended and ended.isdigit() else None)


async def _find(ctx: Ctx, enrollment_id: str) -> dict[str, Any] | None:
    if not _ENROLLMENT_ID.fullmatch(enrollment_id):
        return None
    return next((t for t in await _tenants(ctx) if t.get("id") == enrollment_id), None)


@page()
async def move_out_one(ctx: Ctx) -> Response:
    """Confirm (GET), then end (POST) one tenant's access."""
    enrollment_id = str(ctx.request.path_params["enrollment"])
    tenant = await _find(ctx, enrollment_id)
    if tenant is None or tenant.get("state") not in ACTIVE:
        return ctx.redirect("/tenants")
    if ctx.request.method == "GET":
        return ctx.render("move_out.html", tenant=tenant, unit=tenant.get("unit"),
                          count=1, action=f"/tenants/{enrollment_id}/move-out")
    return await _move_out(ctx, {"op": "move_out", "enrollment": enrollment_id,
                                 "account": ctx.account})


@page()
async def move_out_unit(ctx: Ctx) -> Response:
    """Confirm (GET), then end (POST) the access of every tenant of a unit."""
    unit = str(ctx.request.path_params["unit"])
    site = await ctx.web.site()
    if unit not in site.get("units", []):
        return ctx.redirect("/tenants")
    active = [t for t in await _tenants(ctx) if t.get("unit") == unit and
              t.get("state") in ACTIVE]
    if not active:
        return ctx.redirect("/tenants")
    if ctx.request.method == "GET":
        return ctx.render("move_out.html", tenant=None, unit=unit, count=len(active),
                          tenants=active, action=f"/units/{unit}/move-out")
    return await _move_out(ctx, {"op": "move_out", "unit": unit, "account": ctx.account})


async def _move_out(ctx: Ctx, message: dict[str, Any]) -> Response:
    reply = await ctx.web.link.call(message)
    if not reply.get("ok"):
        log.warning("web_move_out_refused", error=reply.get("error"))
        return ctx.render("error.html", status=409, message=str(reply.get("message", "")))
    return ctx.redirect(f"/tenants?ended={len(reply.get('ended', []))}")


@page(roles=("landlord", "installer"))
async def doors(ctx: Ctx) -> Response:
    """Alarms, faults and entries per day, for the last two weeks."""
    reply = await ctx.web.link.call({"op": "door_summary", "days": SUMMARY_DAYS})
    per_day: dict[str, dict[str, int]] = defaultdict(dict)
    door_ids: set[str] = set()
    for row in reply.get("entries_per_day", []):
        day, door = str(row.get("day")), str(row.get("door"))
        per_day[day][door] = per_day[day].get(door, 0) + int(row.get("count", 0))
        door_ids.add(door)
    days = sorted(per_day, reverse=True)
    return ctx.render("doors.html", alarms=reply.get("alarms", []),
                      faults=reply.get("faults", []), days=days, per_day=per_day,
                      door_ids=sorted(door_ids), summary_days=SUMMARY_DAYS)


@page(roles=("installer",))
async def installer(ctx: Ctx) -> Response:
    """The gateway's health: readers, doors, mode, sync, clock, disk, outbox, checks."""
    status = await ctx.web.link.call({"op": "installer_status"}, timeout=10.0)
    disk = status.get("disk") or {}
    free, total = disk.get("free_bytes"), disk.get("total_bytes")
    disk_pct = round(100 * free / total) if isinstance(free, int) and total else None
    return ctx.render("installer.html", gateway=status, disk_pct=disk_pct,
                      checks=status.get("checks", []))
