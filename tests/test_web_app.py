"""The landlord page's application over HTTP (Starlette's test client) against a stand-in
for the agent's socket: headers, cookies, the origin and token checks, roles, the audit
outbox and the enrollment form's own checks. The real agent and a real browser are in
tests/test_web_browser.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from agent.web import auth
from agent.web.app import WebApp
from agent.web.routes import create_app
from agent.web.settings import Settings
from protocol.permits import check_character
from tests.web_fake_agent import FakeAgent

PASSWORD = "correct horse battery"  # noqa: S105 - a test account
SAME = {"Origin": "https://127.0.0.1", "Sec-Fetch-Site": "same-origin"}
LEASE = (date.today() + timedelta(days=300)).isoformat()
PERMIT = "11010519491231002X"


class Page:
    """The application, its database, the fake agent and a client."""

    def __init__(self, folder: Path) -> None:
        self.settings = Settings(
            listen="127.0.0.1", port=8443, tls_cert="unused.crt", tls_key="unused.key",
            allowed_hosts=("127.0.0.1",), state_dir=str(folder / "web"),
            agent_socket=str(folder / "web.sock"), timezone="Asia/Shanghai")
        self.web = WebApp(self.settings)
        self.agent: FakeAgent | None = FakeAgent(folder / "web.sock")
        self.client = TestClient(create_app(self.web), base_url="https://127.0.0.1",
                                 follow_redirects=False)
        self.web.db.add_user("alice", "landlord", auth.hash_password(PASSWORD))

    @property
    def fake(self) -> FakeAgent:
        """The running fake agent."""
        assert self.agent is not None
        return self.agent

    def token(self, path: str = "/login") -> str:
        """The form token a page carries."""
        match = re.search(r'name="csrf" value="([^"]+)"', self.client.get(path).text)
        assert match, f"no form token on {path}"
        return match.group(1)

    def sign_in(self, name: str = "alice", password: str = PASSWORD) -> Any:
        """Post the sign-in form."""
        return self.client.post("/login", data={"name": name, "password": password,
                                                "csrf": self.token()}, headers=SAME)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """The page, started (lifespan on), with a landlord alice."""
    p = Page(tmp_path)
    with p.client:
        yield p
    if p.agent is not None:
        p.agent.close()


def test_every_response_carries_the_security_headers(page: Page) -> None:
    """Pages, static files and refusals carry a CSP without inline script, no framing,
    same-origin referrers; pages are never stored, static files may be."""
    for response in (page.client.get("/login"), page.client.get("/static/app.js"),
                     page.client.get("/login", headers={"Host": "evil.example"})):
        headers = response.headers
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe" not in csp
        assert "frame-ancestors 'none'" in csp
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "same-origin"
        assert headers["x-content-type-options"] == "nosniff"
        assert "server" not in headers
    assert page.client.get("/login").headers["cache-control"] == "no-store"
    assert "max-age" in page.client.get("/static/app.css").headers["cache-control"]


def test_a_host_not_on_the_list_gets_nothing(page: Page) -> None:
    """DNS rebinding: a Host the gateway was not configured with is answered 421."""
    response = page.client.get("/login", headers={"Host": "attacker.example:8443"})
    assert response.status_code == 421
    assert "Sign in" not in response.text


def test_sign_in_sets_a_host_only_secure_strict_session_cookie(page: Page) -> None:
    """Signing in gives an HttpOnly, Secure, SameSite=Strict, Path=/ ``__Host-`` cookie
    and records the sign-in with the account's name in the agent's log."""
    response = page.sign_in()
    assert response.status_code == 303 and response.headers["location"] == "/enroll"
    cookie = next(c for c in response.headers.get_list("set-cookie")
                  if c.startswith("__Host-session="))
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite", "path"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()
    assert "domain" not in attributes
    audit = [r for r in page.fake.requests if r["op"] == "audit"]
    assert audit[-1]["kind"] == "web_sign_in" and audit[-1]["account"] == "alice"


def test_posts_without_origin_or_token_are_refused(page: Page) -> None:
    """A POST with no Origin and no Sec-Fetch-Site, from another origin, or without the
    session's token is refused and reaches nothing in the agent."""
    page.sign_in()
    token = page.token("/tenants")
    before = list(page.fake.ops())
    target = "/units/101/move-out"
    assert page.client.post(target, data={"csrf": token}).status_code == 403
    assert page.client.post(target, data={"csrf": token}, headers={
        "Origin": "https://evil.example"}).status_code == 403
    assert page.client.post(target, data={"csrf": token}, headers={
        "Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert page.client.post(target, data={"csrf": "wrong"}, headers=SAME).status_code == 403
    assert page.client.post(target, data={}, headers=SAME).status_code == 403
    assert "move_out" not in page.fake.ops()[len(before):]


def test_sign_in_goes_back_only_to_a_local_page(page: Page) -> None:
    """The page to return to after signing in must be a path on this page, not another
    site."""
    for target, expected in (("/tenants", "/tenants"), ("//evil.example/", "/enroll"),
                             ("https://evil.example/", "/enroll"), ("/\\evil", "/enroll")):
        page.client.cookies.clear()
        response = page.client.post("/login", data={
            "name": "alice", "password": PASSWORD, "csrf": page.token(), "next": target},
            headers=SAME)
        assert response.headers["location"] == expected


def test_signed_out_visitors_go_to_sign_in_and_roles_are_enforced(page: Page) -> None:
    """Without a session a page sends to the sign-in form (an htmx call gets 401); a
    landlord is refused the installer's page."""
    response = page.client.get("/tenants")
    assert response.status_code == 303 and response.headers["location"] == \
        "/login?next=/tenants"
    assert page.client.post("/enroll/check", data={"permit": "1"}, headers={
        **SAME, "HX-Request": "true"}).status_code == 401
    page.sign_in()
    assert page.client.get("/installer").status_code == 403


def test_a_missing_agent_is_a_clear_page_not_a_crash(page: Page) -> None:
    """With the agent gone, pages say the door controller does not answer (503), and the
    sign-in itself still works (its audit record waits in the outbox)."""
    page.fake.close()
    page.agent = None
    assert page.sign_in().status_code == 303
    response = page.client.get("/tenants")
    assert response.status_code == 503
    assert "does not answer" in response.text
    assert [m["kind"] for _i, m in page.web.db.pending_audits()] == ["web_sign_in"]


def test_audit_records_wait_for_the_agent_and_go_in_order(page: Page, tmp_path: Path
                                                          ) -> None:
    """Sign-in events made while the agent is away reach it, in order, once it is back."""
    page.fake.close()
    page.sign_in(password="wrong password")  # noqa: S106 - a wrong one on purpose
    page.sign_in()
    agent = FakeAgent(tmp_path / "web.sock")
    page.agent = agent
    page.client.cookies.clear()
    page.sign_in()  # the next audit flushes the queue first
    kinds = [r["kind"] for r in agent.requests if r["op"] == "audit"]
    assert kinds == ["web_sign_in_failed", "web_sign_in", "web_sign_in"]
    assert page.web.db.pending_audits() == []


@pytest.mark.parametrize(("typed", "shown"), [
    ("1101051949", "10 of 18 characters"),
    ("110105194912310021", "The check character does not match"),
    ("11010519491231002x", "Resident identity card"),
    ("８１００００１９９４０８２３００２１", "Hong Kong"),  # noqa: RUF001 - full-width, as typed
    ("11010519491331002" + check_character("11010519491331002"), "are not a date of birth"),
    ("11010519491231002", "17 of 18 characters"),
    ("110105491231002", "first-generation"),
])
def test_the_permit_number_is_checked_as_typed(page: Page, typed: str, shown: str) -> None:
    """Each keystroke's number gets a fragment: how far along, fine (and which document),
    or the rule it breaks; nothing reaches the agent."""
    page.sign_in()
    token = page.token("/enroll")
    before = len(page.fake.requests)
    response = page.client.post("/enroll/check", data={"permit": typed, "csrf": token},
                                headers={**SAME, "HX-Request": "true"})
    assert response.status_code == 200
    assert shown in response.text
    assert len(page.fake.requests) == before


def _capture(page: Page, state: str = "captured", card: str = "new") -> str:
    page.fake.replies["capture_start"] = {"ok": True, "capture": "0123456789abcdef",
                                          "timeout_s": 60}
    page.fake.replies["capture_status"] = {"ok": True, "state": state,
                                           "prefix": "a1b2c3d4e5", "card": card}
    response = page.client.post("/enroll/capture", data={
        "reader": "front-in", "csrf": page.token("/enroll")}, headers=SAME)
    assert response.headers["location"] == "/enroll/c/0123456789abcdef"
    return "/enroll/c/0123456789abcdef"


def test_the_form_is_checked_before_the_agent_is_asked(page: Page) -> None:
    """A unit not in the building, a bad permit number and a past lease end are refused
    by the page itself, each under its field; the agent is not asked to enroll."""
    page.sign_in()
    url = _capture(page)
    response = page.client.post(url, data={
        "unit": "999", "permit": "110105194912310021", "lease_end": "2020-01-01",
        "csrf": page.token(url)}, headers=SAME)
    assert response.status_code == 422
    for field in ("unit-error", "permit-error", "lease-error"):
        assert f'id="{field}"' in response.text
    assert "enroll" not in page.fake.ops()


def test_the_agents_refusal_is_said_under_its_field(page: Page) -> None:
    """A rule only the agent knows (the lease too far away) comes back as a sentence
    under the field it names, with its values."""
    page.sign_in()
    url = _capture(page)
    page.fake.replies["enroll"] = {"ok": False, "error": "invalid", "field": "lease_end",
                                   "rule": "lease_end_too_far", "message": "too far",
                                   "params": {"max_days": 3660}}
    response = page.client.post(url, data={"unit": "101", "permit": PERMIT,
                                           "lease_end": LEASE, "csrf": page.token(url)},
                                headers=SAME)
    assert response.status_code == 422
    assert "more than 3660 days away" in response.text
    enroll = next(r for r in page.fake.requests if r["op"] == "enroll")
    assert enroll["account"] == "alice" and enroll["unit"] == "101"


def test_a_capture_belongs_to_the_session_that_started_it(page: Page) -> None:
    """Another session cannot open or follow someone else's capture."""
    page.sign_in()
    url = _capture(page)
    assert page.client.get(url).status_code == 200
    page.client.cookies.clear()
    page.web.db.add_user("bob", "landlord", auth.hash_password(PASSWORD))
    page.sign_in("bob")
    assert page.client.get(url).headers["location"] == "/enroll"
    assert page.client.get(url + "/events").headers["location"] == "/enroll"


def test_the_capture_stream_sends_the_panel_once_the_card_is_in(page: Page) -> None:
    """The event stream sends one ``capture`` event with the card's panel (hash prefix
    and what the gateway knows of the card) and ends."""
    page.sign_in()
    url = _capture(page, card="enrolled")
    with page.client.stream("GET", url + "/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    assert "event: capture" in body
    assert "a1b2c3d4e5" in body and '"enable": false' in body


def test_moving_out_a_whole_unit_asks_first_then_ends_every_tenant(page: Page) -> None:
    """The unit's move-out page lists its current tenants and asks; only the confirming
    POST asks the agent to end them all, with the account's name."""
    tenants = [{"id": f"00000000-0000-0000-0000-00000000000{i}", "unit": "101",
                "prefix": f"a1b2c3d4e{i}", "state": "pending", "valid_until": 1_900_000_000,
                "provisional_until": 1_900_000_000, "lease_end": 1_950_000_000,
                "last_entry": None, "created_ms": i, "account": "alice", "reason": None}
               for i in range(2)]
    page.fake.replies["tenants"] = {"ok": True, "tenants": tenants}
    page.fake.replies["move_out"] = {"ok": True, "ended": [t["id"] for t in tenants]}
    page.sign_in()
    confirm = page.client.get("/units/101/move-out")
    assert confirm.status_code == 200
    assert "a1b2c3d4e0" in confirm.text and "a1b2c3d4e1" in confirm.text
    assert "move_out" not in page.fake.ops()
    response = page.client.post("/units/101/move-out", data={
        "csrf": page.token("/units/101/move-out")}, headers=SAME)
    assert response.headers["location"] == "/tenants?ended=2"
    move_out = next(r for r in page.fake.requests if r["op"] == "move_out")
    assert move_out == {"op": "move_out", "unit": "101", "account": "alice"}
    assert page.client.get("/units/999/move-out").headers["location"] == "/tenants"
