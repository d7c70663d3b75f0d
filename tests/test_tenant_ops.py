"""The control socket's tenant requests on a running agent: capture a tap, enroll,
list, move out, audit; the page's socket serves these and no simulation."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.config import load_config
from agent.control import request
from agent.runtime import Agent
from drivers.simulated import SimBus
from protocol.sealing import public_key_text
from tests.agentconf import DoorSpec, ReaderSpec, write_agent
from tests.conftest import wait_for

CARD = "em4100:67003B51C6"
PERMIT = "11010519491231002X"


class Running:
    """An in-process agent with enrollment on, and its two sockets."""

    def __init__(self, folder: Path) -> None:
        self.office = X25519PrivateKey.generate()
        (folder / "office-seal.pub").write_text(public_key_text(self.office.public_key()))
        config_path = write_agent(
            folder, doors=(DoorSpec(unlock_s=0.05),),
            readers=(ReaderSpec("front-in", debounce_s=0),
                     ReaderSpec("front-out", direction="exit", debounce_s=0)),
            extra='[enrollment]\nenabled = true\nunits = ["101", "102"]\n'
                  'seal_key = "./office-seal.pub"\ncapture_timeout_s = 30\n')
        self.bus = SimBus()
        self.agent = Agent(load_config(config_path), config_path=config_path, bus=self.bus)
        self.sim = folder / "sim.sock"
        self.web = folder / "web.sock"

    def ask(self, message: dict[str, Any], *, web: bool = True) -> dict[str, Any]:
        """One request to the page's socket (or the CLI's)."""
        return request(self.web if web else self.sim, message)

    def tap(self, card: str = CARD, reader: str = "front-in") -> dict[str, Any]:
        """Present ``card`` through the simulation socket; the decision's reply."""
        return self.ask({"op": "tap", "reader": reader, "card": card}, web=False)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """A started agent with enrollment on."""
    r = Running(tmp_path)
    r.agent.start()
    yield r
    r.agent.stop()


def capture(running: Running) -> str:
    """Start a capture at front-in, tap the card, and return the capture id."""
    started = running.ask({"op": "capture_start", "reader": "front-in", "account": "alice"})
    assert started["ok"] and started["timeout_s"] == 30
    assert running.ask({"op": "capture_status", "capture": started["capture"]})[
        "state"] == "waiting"
    assert running.tap() == {"ok": True, "op": "tap", "reader": "front-in",
                             "granted": False, "reason": "captured"}
    return str(started["capture"])


def test_enroll_through_the_socket_grants_at_once(running: Running) -> None:
    """A captured tap shows as a hash prefix, the enrollment succeeds, and the next tap
    of that card opens the door; the tenant list shows it pending."""
    capture_id = capture(running)
    status = running.ask({"op": "capture_status", "capture": capture_id})
    assert status["state"] == "captured" and status["card"] == "new"
    assert len(status["prefix"]) == 10 and "67003B51C6" not in json.dumps(status)
    lease_end = (date.today() + timedelta(days=200)).isoformat()
    reply = running.ask({"op": "enroll", "capture": capture_id, "unit": "101",
                         "permit": PERMIT, "lease_end": lease_end, "account": "alice"})
    assert reply["ok"], reply
    assert reply["enrollment"]["state"] == "pending"
    assert running.tap()["reason"] == "granted"
    (tenant,) = running.ask({"op": "tenants"})["tenants"]
    assert (tenant["unit"], tenant["state"], tenant["prefix"]) == ("101", "pending",
                                                                   status["prefix"])
    assert tenant["last_entry"] is not None
    moved = running.ask({"op": "move_out", "unit": "101", "account": "alice"})
    assert moved == {"ok": True, "ended": [reply["enrollment"]["id"]]}
    assert running.tap(reader="front-out")["reason"] == "revoked"


@pytest.mark.parametrize(("form", "field", "rule"), [
    ({"unit": "999"}, "unit", "unknown_unit"),
    ({"permit": "110105194912310021"}, "permit", "check_mismatch"),
    ({"lease_end": "2001-01-01"}, "lease_end", "lease_end_past"),
    ({"lease_end": "2027-02-30"}, "lease_end", "bad_date"),
])
def test_refused_form_keeps_the_capture(running: Running, form: dict[str, str], field: str,
                                        rule: str) -> None:
    """A refused form names the field and rule, enrolls nobody, and the captured card can
    be enrolled once the form is right."""
    capture_id = capture(running)
    message = {"op": "enroll", "capture": capture_id, "unit": "101", "permit": PERMIT,
               "lease_end": (date.today() + timedelta(days=30)).isoformat(), **form}
    reply = running.ask(message)
    assert (reply["ok"], reply["field"], reply["rule"]) == (False, field, rule)
    assert running.ask({"op": "tenants"})["tenants"] == []
    message.update({"unit": "101", "permit": PERMIT,
                    "lease_end": (date.today() + timedelta(days=30)).isoformat()})
    assert running.ask(message)["ok"]


def test_second_enrollment_of_one_card_is_refused(running: Running) -> None:
    """A card that belongs to an enrolled tenant is said so at capture and refused."""
    lease_end = (date.today() + timedelta(days=30)).isoformat()
    first = {"op": "enroll", "capture": capture(running), "unit": "101", "permit": PERMIT,
             "lease_end": lease_end}
    assert running.ask(first)["ok"]
    again = capture(running)
    assert running.ask({"op": "capture_status", "capture": again})["card"] == "enrolled"
    reply = running.ask({**first, "capture": again})
    assert (reply["field"], reply["rule"]) == ("card", "card_enrolled")


def test_web_socket_serves_no_simulation(running: Running) -> None:
    """The page's socket refuses simulated taps; it is private to the agent's user when
    no web group is configured."""
    reply = running.ask({"op": "tap", "reader": "front-in", "card": CARD})
    assert reply["ok"] is False and reply["error"] == "unknown_op"
    assert stat.S_IMODE(running.web.stat().st_mode) == 0o600


def test_audit_and_summary(running: Running) -> None:
    """An audit request becomes an event with the account; the door summary counts
    entries per day and door, without naming cards."""
    assert running.ask({"op": "audit", "kind": "web_sign_in", "account": "alice"})["ok"]
    store = running.agent.tenant_store()
    wait_for(lambda: bool(store.events(kind="web_sign_in")), "the audit event")
    assert store.events(kind="web_sign_in")[0].data == {"account": "alice"}
    summary = running.ask({"op": "door_summary", "days": 7})
    assert summary["ok"] and summary["entries_per_day"] == []
    status = running.ask({"op": "installer_status"})
    assert status["ok"] and {c["name"] for c in status["checks"]} >= {"store", "site key"}
    site = running.ask({"op": "site"})
    assert site["units"] == ["101", "102"] and site["readers"][0]["id"] == "front-in"


def test_capture_times_out_and_the_card_is_decided_again(tmp_path: Path) -> None:
    """With no tap within the capture's time, the capture expires and a later tap is
    decided as usual."""
    r = Running(tmp_path)
    r.agent.captures._clock = lambda: 0.0  # noqa: SLF001 - steer the capture clock
    r.agent.start()
    try:
        started = r.ask({"op": "capture_start", "reader": "front-in"})
        r.agent.captures._clock = lambda: 1000.0  # noqa: SLF001 - past the deadline
        assert r.ask({"op": "capture_status", "capture": started["capture"]})[
            "state"] == "expired"
        assert r.tap()["reason"] == "unknown_card"
    finally:
        r.agent.stop()
