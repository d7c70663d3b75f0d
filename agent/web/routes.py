"""The page's routes, and the ASGI application that serves them."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agent.web import views_auth, views_enroll, views_tenants
from agent.web.app import WebApp, log
from agent.web.security import Guard

STATIC = Path(__file__).parent / "static"
GET, POST, BOTH = ["GET"], ["POST"], ["GET", "POST"]
FAILED_PAGE = """<!doctype html><html lang="zh-Hans"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/app.css"><title>500</title></head><body><main>
<p class="alert" role="alert">页面出错了。请重试。<br><span lang="en">The page failed: please
try again.</span></p><p><a class="button" href="/">返回首页 · Back to the start</a></p>
</main></body></html>"""


async def _failed(_request: Request, exc: Exception) -> HTMLResponse:
    """A bug's page: both languages (the failure may lie in choosing one); the error
    itself goes to the log."""
    log.error("web_request_failed", error=repr(exc))
    return HTMLResponse(FAILED_PAGE, status_code=500)


def create_app(web: WebApp) -> Starlette:
    """The application for ``web``, behind the Host allowlist and security headers."""
    routes = [
        Route("/", views_auth.home, methods=GET),
        Route("/login", views_auth.login_form, methods=GET),
        Route("/login", views_auth.login, methods=POST),
        Route("/logout", views_auth.logout, methods=POST),
        Route("/setup", views_auth.setup_form, methods=GET),
        Route("/setup", views_auth.setup, methods=POST),
        Route("/lang/{lang}", views_auth.language, methods=GET),
        Route("/enroll", views_enroll.start, methods=GET),
        Route("/enroll/capture", views_enroll.capture_start, methods=POST),
        Route("/enroll/check", views_enroll.check_permit, methods=POST),
        Route("/enroll/c/{capture}", views_enroll.capture_page, methods=GET),
        Route("/enroll/c/{capture}", views_enroll.submit, methods=POST),
        Route("/enroll/c/{capture}/events", views_enroll.capture_events, methods=GET),
        Route("/enroll/done/{enrollment}", views_enroll.done, methods=GET),
        Route("/tenants", views_tenants.tenants, methods=GET),
        Route("/tenants/{enrollment}/move-out", views_tenants.move_out_one, methods=BOTH),
        Route("/units/{unit}/move-out", views_tenants.move_out_unit, methods=BOTH),
        Route("/doors", views_tenants.doors, methods=GET),
        Route("/installer", views_tenants.installer, methods=GET),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=web.lifespan,
                    middleware=[Middleware(Guard, allowed_hosts=web.settings.allowed_hosts)],
                    exception_handlers={500: _failed})
    app.state.web = web
    return app
