"""Enrolling a tenant: pick a reader, tap the card, fill in the form, submit.

The tap is captured by the agent (``capture_start``); the page follows it with
server-sent events (``capture_events``: the server asks the agent every ``POLL_S`` and
sends the capture panel, rendered, the moment the card is in), so the hash prefix shows
within a fraction of a second of the tap. The permit number is checked as it is typed
(``check_permit``, an htmx call to protocol.permits) and again on submit, here and then by
the agent, which alone stores anything. A capture belongs to the session that started
it (web.db ``captures``): another session cannot follow or use it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta
from typing import Any

from starlette.responses import Response, StreamingResponse

from agent.web import messages
from agent.web.agentlink import AgentUnavailable
from agent.web.app import Ctx, Refused, log, page
from protocol.permits import MAX_INPUT, PermitError, validate_permit

POLL_S = 0.1
"""How often the event stream asks the agent about a waiting capture: the tap shows on
the page within this (plus the agent's own read time) of reaching the reader."""
KEEPALIVE_S = 15.0
CAPTURE_ID = re.compile(r"[0-9a-f]{16}")
EXTRA_STREAM_S = 10.0
"""An event stream outlives its capture's timeout by this much at most."""


def _today(ctx: Ctx) -> date:
    return datetime.now(ctx.web.zone).date()


def _readers(site: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in site.get("readers", []) if isinstance(r, dict) and "id" in r]


@page()
async def start(ctx: Ctx) -> Response:
    """Step 1: choose the reader the tenant will tap at."""
    site = await ctx.web.site()
    return ctx.render("enroll.html", readers=_readers(site), site=site, step="reader")


@page()
async def capture_start(ctx: Ctx) -> Response:
    """Ask the agent to capture the next tap at the chosen reader."""
    site = await ctx.web.site()
    reader = ctx.form.get("reader", "")
    if reader not in {r["id"] for r in _readers(site)}:
        return ctx.render("enroll.html", status=422, readers=_readers(site), site=site,
                          step="reader", error=ctx._("Choose the reader the tenant will tap."))
    reply = await ctx.web.link.call({"op": "capture_start", "reader": reader,
                                     "account": ctx.account})
    if not reply.get("ok"):
        log.warning("web_capture_refused", error=reply.get("error"))
        return ctx.render("enroll.html", status=409, readers=_readers(site), site=site,
                          step="reader", error=messages.enroll_message(
                              ctx._, "", str(reply.get("error")), {},
                              fallback=str(reply.get("message", ""))))
    capture = str(reply.get("capture", ""))
    assert ctx.session is not None
    ctx.web.db.add_capture(capture, ctx.session.id, reader)
    return ctx.redirect(f"/enroll/c/{capture}")


def _own_capture(ctx: Ctx) -> tuple[str, str]:
    capture = str(ctx.request.path_params.get("capture", ""))
    assert ctx.session is not None
    reader = ctx.web.db.capture_reader(capture, ctx.session.id) \
        if CAPTURE_ID.fullmatch(capture) else None
    if reader is None:
        raise Refused(ctx.redirect("/enroll"))
    return capture, reader


async def _status(ctx: Ctx, capture: str) -> dict[str, Any]:
    reply = await ctx.web.link.call({"op": "capture_status", "capture": capture})
    if not reply.get("ok"):
        return {"state": "expired", "prefix": None, "card": None}
    return reply


def _card_ok(status: dict[str, Any]) -> bool:
    return status.get("state") == "captured" and status.get("card") not in ("enrolled",
                                                                            "revoked")


def _panel(ctx: Ctx, capture: str, reader: str, status: dict[str, Any],
           site: dict[str, Any]) -> str:
    reader_info = next((r for r in _readers(site) if r["id"] == reader), {"id": reader})
    return ctx.render_text("_capture.html", capture=capture, reader=reader_info,
                           status=status, card_ok=_card_ok(status),
                           timeout_s=int(site.get("capture_timeout_s", 60)))


async def _form_page(ctx: Ctx, capture: str, reader: str, *, status: dict[str, Any],
                     http_status: int = 200, values: dict[str, str] | None = None,
                     errors: dict[str, str] | None = None) -> Response:
    site = await ctx.web.site()
    today = _today(ctx)
    return ctx.render("enroll.html", status=http_status, step="form", site=site,
                      capture=capture, reader=reader,
                      panel=_panel(ctx, capture, reader, status, site),
                      card_ok=_card_ok(status), units=site.get("units", []),
                      status_final=status.get("state") != "waiting",
                      values=values or {}, errors=errors or {},
                      min_date=(today + timedelta(days=1)).isoformat())


@page()
async def capture_page(ctx: Ctx) -> Response:
    """Step 2 and 3: "tap the card now", then the form."""
    capture, reader = _own_capture(ctx)
    return await _form_page(ctx, capture, reader, status=await _status(ctx, capture))


@page()
async def capture_events(ctx: Ctx) -> Response:
    """Server-sent events: one ``capture`` event when the card is tapped or the wait ends."""
    capture, reader = _own_capture(ctx)
    site = await ctx.web.site()
    limit = time.monotonic() + float(site.get("capture_timeout_s", 60)) + EXTRA_STREAM_S

    async def stream() -> AsyncIterator[str]:
        quiet_since = time.monotonic()
        yield "retry: 2000\n\n"
        while True:
            try:
                status = await _status(ctx, capture)
            except AgentUnavailable:
                status = {"state": "waiting"}
            now = time.monotonic()
            if status.get("state") == "waiting" and now >= limit:
                status = {"state": "expired", "prefix": None, "card": None}
            if status.get("state") != "waiting":
                data = json.dumps({"state": status.get("state"), "enable": _card_ok(status),
                                   "html": _panel(ctx, capture, reader, status, site)})
                yield f"event: capture\ndata: {data}\n\n"
                return
            if now - quiet_since >= KEEPALIVE_S:
                quiet_since = now
                yield ": waiting\n\n"
            await asyncio.sleep(POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"X-Accel-Buffering": "no"})


def _permit_error(ctx: Ctx, exc: PermitError) -> str:
    return messages.permit_message(ctx._, exc.rule, exc.params, exc.position) or str(exc)


@page()
async def check_permit(ctx: Ctx) -> Response:
    """The permit number as typed so far: fine, not finished, or which rule it breaks
    (an htmx fragment; nothing is stored or logged)."""
    text = ctx.form.get("permit", "")[:MAX_INPUT + 1]
    try:
        permit = validate_permit(text, today=_today(ctx))
    except PermitError as exc:
        typed = len(text.strip())
        if exc.rule in ("empty", "bad_length") and typed < 18 and exc.rule != "first_generation_id":
            return ctx.render("_permit_check.html", state="typing", typed=typed)
        return ctx.render("_permit_check.html", state="error", message=_permit_error(ctx, exc))
    return ctx.render("_permit_check.html", state="ok",
                      message=messages.permit_kind_label(ctx._, permit.kind.value))


def _check_form(ctx: Ctx, site: dict[str, Any], values: dict[str, str]
                ) -> dict[str, str]:
    errors: dict[str, str] = {}
    if values["unit"] not in site.get("units", []):
        errors["unit"] = messages.enroll_message(
            ctx._, "unit", "unknown_unit" if values["unit"] else "missing_unit", {})
    try:
        validate_permit(values["permit"], today=_today(ctx))
    except PermitError as exc:
        errors["permit"] = _permit_error(ctx, exc)
    try:
        lease_end = date.fromisoformat(values["lease_end"])
    except ValueError:
        errors["lease_end"] = messages.enroll_message(ctx._, "lease_end", "missing_lease_end", {})
    else:
        if lease_end <= _today(ctx):
            errors["lease_end"] = messages.enroll_message(ctx._, "lease_end", "lease_end_past",
                                                          {})
    return errors


@page()
async def submit(ctx: Ctx) -> Response:
    """Enroll: checked here, then by the agent, which gives provisional access at once."""
    capture, reader = _own_capture(ctx)
    site = await ctx.web.site()
    values = {"unit": ctx.form.get("unit", "")[:40],
              "permit": ctx.form.get("permit", "")[:MAX_INPUT],
              "lease_end": ctx.form.get("lease_end", "")[:20]}
    status = await _status(ctx, capture)
    errors = _check_form(ctx, site, values)
    if not errors and status.get("state") != "captured":
        errors["card"] = messages.enroll_message(ctx._, "capture", "capture_gone", {})
    if errors:
        return await _form_page(ctx, capture, reader, status=status, http_status=422,
                                values=values, errors=errors)
    reply = await ctx.web.link.call({"op": "enroll", "capture": capture, **values,
                                     "account": ctx.account})
    if not reply.get("ok"):
        field = str(reply.get("field") or "card")
        if field == "capture":
            field = "card"
        params = reply.get("params") if isinstance(reply.get("params"), dict) else {}
        rule = str(reply.get("rule") or reply.get("error") or "")
        errors[field if field in ("unit", "permit", "lease_end") else "card"] = \
            messages.enroll_message(ctx._, field, rule, params or {},
                                    fallback=str(reply.get("message", "")))
        log.info("web_enroll_refused", field=field, rule=rule)
        return await _form_page(ctx, capture, reader, status=await _status(ctx, capture),
                                http_status=422, values=values, errors=errors)
    enrollment = reply.get("enrollment", {})
    return ctx.redirect(f"/enroll/done/{enrollment.get('id', '')}")


@page()
async def done(ctx: Ctx) -> Response:
    """The result: access from now on, provisional until the office answers."""
    enrollment_id = str(ctx.request.path_params.get("enrollment", ""))
    reply = await ctx.web.link.call({"op": "tenants"})
    tenant = next((t for t in reply.get("tenants", []) if t.get("id") == enrollment_id), None)
    if tenant is None:
        return ctx.redirect("/tenants")
    return ctx.render("done.html", tenant=tenant)
