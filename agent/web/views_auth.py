"""Signing in and out, the first account from a one-time code, the language switch.

Every sign-in, failed sign-in, sign-out and account creation is recorded in the agent's
event log (``WebApp.audit``). A failed sign-in names the account only when it exists:
whatever someone typed into the name field (a password, sometimes) stays out of the log.
"""

from __future__ import annotations

import asyncio
import math
import secrets

from starlette.responses import RedirectResponse, Response

from agent.web import auth, messages
from agent.web.app import LANG_COOKIE, SESSION_COOKIE, Ctx, log, page
from agent.web.db import User
from agent.web.i18n import LANGUAGES

HOME = {"landlord": "/enroll", "installer": "/installer"}
UNKNOWN_ACCOUNT = "-"
"""The account a failed sign-in under a name that is no account is recorded with (no
account name can be ``-``, and the name typed is not recorded)."""


def _safe_next(target: str | None, default: str) -> str:
    """A local path to go on to after signing in (no open redirect)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")) and \
            all(c.isprintable() and c not in "\\\r\n" for c in target) and len(target) < 200:
        return target
    return default


@page(anonymous=True)
async def home(ctx: Ctx) -> Response:
    """The start: the role's first page, the sign-in page, or sign-up when no account
    exists yet."""
    if ctx.session is not None:
        return ctx.redirect(HOME.get(ctx.session.user.role, "/enroll"))
    if not ctx.web.db.users():
        return ctx.redirect("/setup")
    return ctx.redirect("/login")


@page(anonymous=True)
async def login_form(ctx: Ctx) -> Response:
    """The sign-in form."""
    if ctx.session is not None:
        return ctx.redirect(HOME.get(ctx.session.user.role, "/enroll"))
    params = ctx.request.query_params
    notice = messages.account_message(ctx._, "session_ended") if params.get("expired") else None
    return ctx.render("login.html", next=_safe_next(params.get("next"), ""), notice=notice,
                      no_accounts=not ctx.web.db.users())


def _wait_s(ctx: Ctx, name: str) -> float:
    db = ctx.web.db
    now = db.now_ms()
    return max(auth.ACCOUNT_BACKOFF.wait_s(*db.backoff(f"account:{name}"), now),
               auth.ADDRESS_BACKOFF.wait_s(*db.backoff(f"address:{ctx.address}"), now))


def _count_failure(ctx: Ctx, keys: list[str]) -> None:
    db = ctx.web.db
    now = db.now_ms()
    for key in keys:
        rule = auth.ACCOUNT_BACKOFF if key.startswith("account:") else auth.ADDRESS_BACKOFF
        failures, last = db.backoff(key)
        db.set_backoff(key, rule.live_failures(failures, last, now) + 1)


async def _verify(ctx: Ctx, pw_hash: str | None, password: str) -> bool:
    async with ctx.web.hash_slots:
        return await asyncio.to_thread(auth.verify_password, pw_hash, password)


def _sign_in(ctx: Ctx, user: User, target: str) -> Response:
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    ctx.web.db.create_session(user, token, csrf)
    response = ctx.redirect(target)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(ctx.web.settings.session_max_s),
                        path="/", secure=True, httponly=True, samesite="strict")
    return response



@page(anonymous=True)
async def login(ctx: Ctx) -> Response:
    """Check a name and password, with back-off; sign in."""
    name = auth.normalise_name(ctx.form.get("name", ""))[:64]
    password = ctx.form.get("password", "")[:auth.MAX_PASSWORD + 1]
    target = _safe_next(ctx.form.get("next"), "")
    wait = _wait_s(ctx, name)
    if wait > 0:
        log.warning("web_sign_in_backoff", address=ctx.address, wait_s=round(wait, 1))
        return ctx.render("login.html", status=429, next=target, name=name,
                          error=messages.account_message(ctx._, "backoff",
                                                         seconds=math.ceil(wait)))
    user = ctx.web.db.user(name)
    if not await _verify(ctx, user.pw_hash if user else None, password) or user is None:
        _count_failure(ctx, [f"account:{name}", f"address:{ctx.address}"])
        await ctx.web.audit("web_sign_in_failed", user.name if user else UNKNOWN_ACCOUNT,
                            address=ctx.address, known=user is not None)
        return ctx.render("login.html", status=401, next=target, name=name,
                          error=messages.account_message(ctx._, "bad_credentials"))
    ctx.web.db.set_backoff(f"account:{name}", 0)
    ctx.web.db.set_backoff(f"address:{ctx.address}", 0)
    await ctx.web.audit("web_sign_in", user.name, address=ctx.address, role=user.role)
    return _sign_in(ctx, user, target or HOME.get(user.role, "/enroll"))


@page(roles=auth.ROLES)
async def logout(ctx: Ctx) -> Response:
    """End this session."""
    token = ctx.request.cookies.get(SESSION_COOKIE, "")
    ctx.web.db.end_session(token)
    await ctx.web.audit("web_signed_out", ctx.account, address=ctx.address)
    response = ctx.redirect("/login")
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True,
                           samesite="strict")
    return response


@page(anonymous=True)
async def setup_form(ctx: Ctx) -> Response:
    """The form that makes an account from a one-time code."""
    return ctx.render("setup.html", no_accounts=not ctx.web.db.users())


@page(anonymous=True)
async def setup(ctx: Ctx) -> Response:
    """Make an account from a one-time code and sign it in."""
    form = ctx.form
    values = {"name": form.get("name", "")[:64], "no_accounts": not ctx.web.db.users()}
    db = ctx.web.db
    wait = auth.ADDRESS_BACKOFF.wait_s(*db.backoff(f"address:{ctx.address}"), db.now_ms())
    if wait > 0:
        return ctx.render("setup.html", status=429, **values, errors={
            "code": messages.account_message(ctx._, "backoff", seconds=math.ceil(wait))})
    code = auth.normalise_code(form.get("code", ""))
    errors: dict[str, str] = {}
    role = db.setup_code_role(code) if code else None
    if role is None:
        _count_failure(ctx, [f"address:{ctx.address}"])
        errors["code"] = messages.account_message(ctx._, "bad_code")
    try:
        name = auth.check_name(form.get("name", ""))
    except auth.InputError as exc:
        name = ""
        errors["name"] = messages.account_message(ctx._, exc.rule)
    password = form.get("password", "")
    try:
        auth.check_password(password, name)
    except auth.InputError as exc:
        errors["password"] = messages.account_message(ctx._, exc.rule, min=auth.MIN_PASSWORD)
    if not errors and password != form.get("password2", ""):
        errors["password2"] = messages.account_message(ctx._, "password_mismatch")
    if not errors and db.user(name) is not None:
        errors["name"] = messages.account_message(ctx._, "name_taken")
    if errors:
        return ctx.render("setup.html", status=422, **values, errors=errors)
    async with ctx.web.hash_slots:
        pw_hash = await asyncio.to_thread(auth.hash_password, password)
    try:
        user = db.redeem_setup_code(code, name, pw_hash)
    except ValueError:
        return ctx.render("setup.html", status=422, **values, errors={
            "name": messages.account_message(ctx._, "name_taken")})
    if user is None:
        return ctx.render("setup.html", status=422, **values, errors={
            "code": messages.account_message(ctx._, "bad_code")})
    db.set_backoff(f"address:{ctx.address}", 0)
    await ctx.web.audit("web_account_created", user.name, role=user.role, via="code",
                        address=ctx.address)
    await ctx.web.audit("web_sign_in", user.name, address=ctx.address, role=user.role)
    return _sign_in(ctx, user, HOME.get(user.role, "/enroll"))


@page(anonymous=True)
async def language(ctx: Ctx) -> Response:
    """Switch the page's language (a cookie) and go back."""
    lang = ctx.request.path_params.get("lang", "")
    target = _safe_next(ctx.request.query_params.get("next"), "/")
    response = RedirectResponse(target if lang in LANGUAGES else "/", status_code=303)
    if lang in LANGUAGES:
        response.set_cookie(LANG_COOKIE, lang, max_age=365 * 86400, path="/", secure=True,
                            httponly=True, samesite="strict")
    return response

