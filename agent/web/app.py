"""The page's shared machinery: the application object, the per-request context, the
``page`` decorator every view goes through, rendering, the agent's site facts and the
audit outbox.

``page`` is where a request is let in or not: it reads the session (server-side, from
web.db, on every request), sends the signed-out to the sign-in page, refuses a role that
is not allowed, and for a POST checks the origin (security.same_origin), reads the form
(URL-encoded, at most ``MAX_FORM`` bytes) and checks its token against the session's (or,
before sign-in, against the pre-session cookie: a double-submit token). A view then gets a
``Ctx`` with the session, the language and its gettext.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote
from zoneinfo import ZoneInfo

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from agent.web import i18n, messages
from agent.web.agentlink import AgentLink, AgentUnavailable
from agent.web.db import Session, WebDB
from agent.web.security import csrf_ok, same_origin
from agent.web.settings import Settings

log = structlog.get_logger("permitgate.web")

SESSION_COOKIE = "__Host-session"
PRE_COOKIE = "__Host-pre"
"""Before sign-in: a random token the sign-in and sign-up forms must echo."""
LANG_COOKIE = "__Host-lang"
MAX_FORM = 8 * 1024
SITE_TTL_S = 30.0
AUDIT_RETRY_S = 5.0
TEMPLATES = Path(__file__).parent / "templates"

View = Callable[["Ctx"], Awaitable[Response]]


class Refused(Exception):  # noqa: N818 - a response, not an error of the program
    """A request stopped on its way to the view; ``response`` answers it."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


@dataclass
class Ctx:
    """One request as a view sees it."""

    request: Request
    web: WebApp
    lang: str
    session: Session | None
    form: dict[str, str] = field(default_factory=dict)
    pre_token: str | None = None
    set_pre: bool = False

    def _(self, text: str) -> str:
        """``text`` in the page's language."""
        return i18n.translations(self.lang).gettext(text)

    @property
    def account(self) -> str:
        """The signed-in account's name."""
        assert self.session is not None
        return self.session.user.name

    @property
    def address(self) -> str:
        """The client's address."""
        client = self.request.client
        return client.host if client is not None else "unknown"

    @property
    def csrf(self) -> str:
        """The token forms of this page carry."""
        if self.session is not None:
            return self.session.csrf
        return self.pre_token or ""

    def render_text(self, template: str, **values: Any) -> str:
        """``template`` rendered in the page's language, as text."""
        env = self.web.envs[self.lang]
        return env.get_template(template).render(
            ctx=self, lang=self.lang, html_lang=i18n.HTML_LANG[self.lang],
            user=self.session.user if self.session else None, csrf=self.csrf,
            path=self.request.url.path, **values)

    def render(self, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        """``template`` rendered in the page's language."""
        response = HTMLResponse(self.render_text(template, **values), status_code=status)
        self.finish(response)
        return response

    def finish(self, response: Response) -> None:
        """Cookies this request owes its response."""
        if self.set_pre and self.pre_token:
            response.set_cookie(PRE_COOKIE, self.pre_token, max_age=3600, path="/",
                                secure=True, httponly=True, samesite="strict")

    def redirect(self, url: str) -> Response:
        """A see-other redirect (after a POST), or an htmx redirect for htmx requests."""
        if self.request.headers.get("hx-request") == "true":
            response: Response = Response(status_code=204, headers={"HX-Redirect": url})
        else:
            response = RedirectResponse(url, status_code=303)
        self.finish(response)
        return response


@dataclass(frozen=True, slots=True)
class Formats:
    """Date and time formatting in the page's language and the site's time zone."""

    lang: str
    zone: ZoneInfo

    def date(self, unix_s: float | None) -> str:
        """A Unix time as a site-local date."""
        return "" if unix_s is None else i18n.format_date(i18n.local(unix_s, self.zone).date(),
                                                          self.lang)

    def datetime(self, unix_s: float | None) -> str:
        """A Unix time as a site-local date and time of day."""
        return "" if unix_s is None else i18n.format_datetime(i18n.local(unix_s, self.zone),
                                                              self.lang)

    def day(self, iso: str | None) -> str:
        """A ``YYYY-MM-DD`` day."""
        if not iso:
            return ""
        try:
            return i18n.format_date(date.fromisoformat(iso), self.lang)
        except ValueError:
            return iso


class WebApp:
    """The application's state: settings, database, agent link, templates, site facts."""

    def __init__(self, settings: Settings, *, db: WebDB | None = None,
                 link: AgentLink | None = None,
                 housekeeping: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._housekeeping = housekeeping
        self.db = db or WebDB(settings.db_path)
        self.link = link or AgentLink(Path(settings.agent_socket))
        self.zone = ZoneInfo(settings.timezone)
        self.envs = {lang: self._environment(lang, self.zone) for lang in i18n.LANGUAGES}
        self._site: dict[str, Any] | None = None
        self._site_at = 0.0
        self._hash_slots: asyncio.Semaphore | None = None
        self._audit_task: asyncio.Task[None] | None = None
        self._audit_wake: asyncio.Event | None = None

    @staticmethod
    def _environment(lang: str, zone: ZoneInfo) -> Environment:
        # One environment per language, its gettext and formats as globals: macros then
        # need no "import ... with context", which would build (and leave as cyclic
        # garbage holding the whole page's data) a new module on every render.
        env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(),
                          extensions=["jinja2.ext.i18n"], trim_blocks=True,
                          lstrip_blocks=True, auto_reload=False)
        translations = i18n.translations(lang)
        env.install_gettext_translations(translations, newstyle=True)  # type: ignore[attr-defined]
        env.globals.update(m=messages, gt=translations.gettext, fmt=Formats(lang, zone))
        return env

    @property
    def hash_slots(self) -> asyncio.Semaphore:
        """Password hashes run one at a time (auth.HASH_SLOTS)."""
        if self._hash_slots is None:
            from agent.web.auth import HASH_SLOTS  # noqa: PLC0415 - argon2 loads on first use
            self._hash_slots = asyncio.Semaphore(HASH_SLOTS)
        return self._hash_slots

    # -- the agent ---------------------------------------------------------------------------

    async def site(self, *, fresh: bool = False) -> dict[str, Any]:
        """The agent's site facts (units, readers), cached for ``SITE_TTL_S``."""
        now = time.monotonic()
        if fresh or self._site is None or now - self._site_at >= SITE_TTL_S:
            reply = await self.link.call({"op": "site"})
            if not reply.get("ok"):
                raise AgentUnavailable(f"site: {reply.get('error')}: {reply.get('message')}")
            self._site, self._site_at = reply, now
        return self._site

    # -- audit outbox ------------------------------------------------------------------------

    async def audit(self, kind: str, account: str, **data: Any) -> None:
        """Record ``kind`` in the agent's event log, by way of web.db's outbox: an event
        the agent cannot take now goes later, in order."""
        message: dict[str, Any] = {"op": "audit", "kind": kind, "account": account,
                                   "data": {k: v for k, v in data.items() if v is not None}}
        self.db.queue_audit(message)
        log.info(kind, account=account, **data)
        await self.flush_audits()

    async def flush_audits(self) -> int:
        """Send queued audit events until the outbox is empty or the agent fails."""
        sent = 0
        for audit_id, message in self.db.pending_audits():
            try:
                reply = await self.link.call(message, timeout=2.0)
            except AgentUnavailable as exc:
                log.warning("web_audit_deferred", error=str(exc))
                return sent
            if not reply.get("ok"):
                if reply.get("error") in ("unknown_op", "internal", "busy"):
                    log.warning("web_audit_deferred", error=reply.get("error"))
                    return sent
                # A request the agent refuses as malformed would block the outbox for good.
                log.error("web_audit_refused", error=reply.get("error"),
                          detail=reply.get("message"), kind=message.get("kind"))
            self.db.audit_sent(audit_id)
            sent += 1
        return sent

    async def audit_loop(self) -> None:
        """Retry the outbox every ``AUDIT_RETRY_S`` and prune expired sessions."""
        while True:
            await asyncio.sleep(AUDIT_RETRY_S)
            try:
                await self.flush_audits()
                self.db.prune(idle_ms=int(self.settings.session_idle_s * 1000),
                              max_ms=int(self.settings.session_max_s * 1000))
                gc.collect()
                if self._housekeeping is not None:
                    self._housekeeping()
            except Exception as exc:  # noqa: BLE001 - the loop's one boundary: log, go on
                log.error("web_housekeeping_failed", error=repr(exc))

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: object) -> Any:
        """Starts and stops the housekeeping task with the server."""
        # Everything loaded so far lives as long as the process: out of the collector's
        # way, so that full collections (which free the reference cycles each rendered
        # page leaves) run often and cost little.
        gc.collect()
        gc.freeze()
        task = asyncio.create_task(self.audit_loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.db.close()
            log.info("web_stopped")


# -- the gate every view goes through ---------------------------------------------------------


def _session(web: WebApp, request: Request) -> Session | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 200:
        return None
    s = web.settings
    return web.db.session(token, idle_ms=int(s.session_idle_s * 1000),
                          max_ms=int(s.session_max_s * 1000))


async def _form(request: Request) -> dict[str, str]:
    if request.headers.get("content-type", "").split(";")[0].strip() != \
            "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise Refused(Response("form too large", status_code=413))
    pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                      max_num_fields=50)
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


def context(web: WebApp, request: Request) -> Ctx:
    """The request's context before any check."""
    lang = i18n.choose(request.cookies.get(LANG_COOKIE), web.settings.language,
                       request.headers.get("accept-language"))
    return Ctx(request=request, web=web, lang=lang, session=_session(web, request))


def origin(request: Request) -> str:
    """The page's own origin, as this request reached it."""
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def page(*, roles: tuple[str, ...] = ("landlord",), anonymous: bool = False
         ) -> Callable[[View], Callable[[Request], Awaitable[Response]]]:
    """Wrap a view: session, role, origin, form and token checks (module docstring)."""

    def wrap(view: View) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(view)
        async def endpoint(request: Request) -> Response:
            web: WebApp = request.app.state.web
            ctx = context(web, request)
            try:
                await _admit(ctx, roles=roles, anonymous=anonymous)
                return await view(ctx)
            except Refused as refused:
                ctx.finish(refused.response)
                return refused.response
            except AgentUnavailable as exc:
                log.warning("web_agent_unavailable", path=request.url.path, error=str(exc))
                return ctx.render("error.html", status=503, message=messages.enroll_message(
                    ctx._, "", "agent_unavailable", {}))

        return endpoint

    return wrap


async def _admit(ctx: Ctx, *, roles: tuple[str, ...], anonymous: bool) -> None:
    request = ctx.request
    htmx = request.headers.get("hx-request") == "true"
    # First of all: a POST from another site is refused whoever is signed in (with
    # SameSite=Strict its cookie would not even come along).
    if request.method == "POST" and not same_origin(request.scope, origin(request)):
        log.warning("web_cross_site_refused", path=request.url.path)
        raise Refused(Response("cross-site request refused\n", status_code=403,
                               media_type="text/plain"))
    if not anonymous:
        if ctx.session is None:
            had_cookie = SESSION_COOKIE in request.cookies
            target = "/login?next=" + quote(request.url.path, safe="/")
            if had_cookie:
                target += "&expired=1"
            if request.method != "GET" or htmx or request.url.path.endswith("/events"):
                raise Refused(Response(status_code=401, headers={"HX-Redirect": target}))
            raise Refused(RedirectResponse(target, status_code=303))
        if ctx.session.user.role not in roles:
            raise Refused(ctx.render("error.html", status=403, message=ctx._(
                "This page is not for your account's role.")))
    if anonymous:
        ctx.pre_token = request.cookies.get(PRE_COOKIE)
        if not ctx.pre_token or len(ctx.pre_token) > 100:
            ctx.pre_token, ctx.set_pre = secrets.token_urlsafe(24), True
    if request.method == "POST":
        ctx.form = await _form(request)
        given = ctx.form.get("csrf") or request.headers.get("x-csrf-token")
        expected = ctx.session.csrf if ctx.session is not None and not anonymous else (
            request.cookies.get(PRE_COOKIE))
        if not csrf_ok(expected, given):
            log.warning("web_csrf_refused", path=request.url.path)
            raise Refused(ctx.render("error.html", status=403, message=messages.account_message(
                ctx._, "form_expired")))
