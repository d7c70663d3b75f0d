"""The terminal's tenant commands: validate-permit, enroll by flags against a running
agent (the tap through the simulation), tenants, unenroll."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import cli
from agent.config import load_config
from agent.control import request
from agent.runtime import Agent
from drivers.simulated import SimBus
from protocol.sealing import public_key_text
from tests.agentconf import ReaderSpec, write_agent
from tests.conftest import wait_for

CARD = "em4100:67003B51C6"
PERMIT = "11010519491231002X"


def run(*argv: str) -> tuple[int, str]:
    """``permitgate ARGV`` in-process: exit status and output."""
    out = io.StringIO()
    status = cli.main(list(argv), out=out)
    return status, out.getvalue()


@pytest.mark.parametrize(("number", "status", "words"), [
    ("11010519491231002x", 0, "resident identity card"),
    ("810000199408230021", 0, "Hong Kong residents"),
    ("110105194912310021", 2, "check character is '1'"),
    ("123", 2, "3 characters"),
])
def test_validate_permit(number: str, status: int, words: str) -> None:
    """validate-permit prints the kind of document (exit 0) or the broken rule (exit 2)."""
    got, text = run("validate-permit", number)
    assert got == status and words in text


@pytest.fixture
def agent_folder(tmp_path: Path) -> Iterator[tuple[Path, Agent]]:
    """A running in-process agent with enrollment on."""
    office = X25519PrivateKey.generate()
    (tmp_path / "office-seal.pub").write_text(public_key_text(office.public_key()))
    config_path = write_agent(
        tmp_path, readers=(ReaderSpec("front-in", debounce_s=0),),
        extra='[enrollment]\nenabled = true\nunits = ["101", "102"]\n'
              'seal_key = "./office-seal.pub"\n')
    agent = Agent(load_config(config_path), config_path=config_path, bus=SimBus())
    agent.start()
    yield config_path, agent
    agent.stop()


def test_enroll_by_flags_list_and_unenroll(agent_folder: tuple[Path, Agent]) -> None:
    """``enroll`` with every step as a flag waits for the tap, enrolls, and prints the
    provisional window; ``tenants`` lists it; ``unenroll`` ends it."""
    config, agent = agent_folder
    lease_end = (date.today() + timedelta(days=90)).isoformat()
    result: list[tuple[int, str]] = []
    worker = threading.Thread(target=lambda: result.append(run(
        "enroll", "-c", str(config), "--reader", "front-in", "--unit", "102", "--permit",
        PERMIT, "--lease-end", lease_end)))
    worker.start()
    wait_for(lambda: agent.captures.waiting("front-in"), "the capture to start")
    assert request(config.parent / "sim.sock", {"op": "tap", "reader": "front-in",
                                                "card": CARD})["reason"] == "captured"
    worker.join(30)
    status, text = result[0]
    assert status == 0, text
    assert "captured (new)" in text and "unit 102" in text and "provisional access" in text
    status, text = run("tenants", "-c", str(config), "--json")
    (tenant,) = json.loads(text)
    assert (tenant["unit"], tenant["state"], tenant["lease_end"]) == ("102", "pending",
                                                                      lease_end)
    status, text = run("unenroll", "-c", str(config), "--unit", "102")
    assert status == 0 and f"moved out {tenant['id']}" in text
    status, text = run("tenants", "-c", str(config), "--state", "ended")
    assert "ended" in text and "102" in text


@pytest.mark.parametrize(("flags", "words"), [
    (["--unit", "999"], "--unit '999': not in this building's units"),
    (["--permit", "110105194912310021"], "--permit: the check character"),
    (["--lease-end", "2001-01-01"], "must be after today"),
    (["--reader", "nowhere"], "--reader: one of front-in"),
])
def test_enroll_refuses_bad_flags_before_any_tap(agent_folder: tuple[Path, Agent],
                                                 flags: list[str], words: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong unit, permit, lease end or reader exits 2 naming it, before a capture is
    started (nobody is asked to tap)."""
    config, agent = agent_folder
    base = {"--reader": "front-in", "--unit": "101", "--permit": PERMIT,
            "--lease-end": (date.today() + timedelta(days=9)).isoformat()}
    base.update(dict(zip(flags[::2], flags[1::2], strict=True)))
    status, _ = run("enroll", "-c", str(config), *[x for kv in base.items() for x in kv])
    assert status == 2
    assert words in capsys.readouterr().err
    assert not agent.captures.waiting("front-in")


def test_enroll_without_enrollment_enabled_says_so(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """On a gateway without [enrollment] the command exits 2 saying how to enable it."""
    config = write_agent(tmp_path)
    status, _ = run("enroll", "-c", str(config), "--reader", "front-in")
    assert status == 2
    assert "[enrollment] enabled = true" in capsys.readouterr().err
