"""The agent's software version, from the gateway to the office: ``permitgate --version``
and ``status``, the optional ``version`` of the ``status`` message, and
``permitgate-central show`` listing gateways by version (on SQLite and PostgreSQL).

The end-to-end test runs the real processes of tests/harness.py: the agent with sync and
``permitgate-central serve`` against a Mosquitto broker.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent import __version__, cli
from agent.store import Store
from protocol.chain import Event
from protocol.messages import Status
from provisioning import central_cli
from provisioning.reports import by_version
from tests.agentconf import write_agent
from tests.broker import Broker
from tests.harness import GATEWAY, SITE_KEY, AgentProcess, Office, ServeProcess
from tests.waiting import wait_for

if TYPE_CHECKING:
    from tests.pg import OfficeDb

pytest_plugins = ("tests.pg",)  # office_db: the office runs on SQLite and on PostgreSQL

REPO = Path(__file__).resolve().parent.parent
SILENT = "gw-silent"
"""A gateway the office knows that never sends a status."""


def test_the_agent_version_is_the_package_version() -> None:
    """``agent.__version__`` (what status and ``--version`` report) is pyproject's version,
    the one install.sh names a release by."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    assert __version__ == project["version"]
    done = subprocess.run([sys.executable, "-m", "agent.cli", "--version"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.stdout.strip() == f"permitgate {__version__}"


def test_status_message_carries_the_version_only_when_given() -> None:
    """A status with a version carries it; one without has no ``version`` key at all
    (absent, never null), and both parse back."""
    said = Status(type="status", gateway="gw-1", state="online", version="1.2.3")
    unsaid = Status(type="status", gateway="gw-1", state="offline")
    assert json.loads(said.model_dump_json())["version"] == "1.2.3"
    assert "version" not in json.loads(unsaid.model_dump_json())
    assert Status.model_validate_json(said.model_dump_json()).version == "1.2.3"
    assert Status.model_validate_json(unsaid.model_dump_json()).version is None
    schema = json.loads((REPO / "docs" / "schemas" / "status.schema.json").read_text())
    assert "version" in schema["properties"] and "version" not in schema.get("required", [])


def test_gateways_are_grouped_by_version_in_release_order() -> None:
    """``show``'s groups order versions as releases (0.9.0 before 0.10.0), with gateways
    that reported none last."""
    gateways: list[dict[str, Any]] = [
        {"gateway": "a", "version": "0.10.0"}, {"gateway": "b", "version": None},
        {"gateway": "c", "version": "0.9.0"}, {"gateway": "d", "version": "0.10.0"}]
    assert by_version(gateways) == [{"version": "0.9.0", "gateways": ["c"]},
                                    {"version": "0.10.0", "gateways": ["a", "d"]},
                                    {"version": None, "gateways": ["b"]}]


@pytest.fixture
def rig(tmp_path: Path, broker: Broker, office_db: OfficeDb
        ) -> Iterator[tuple[Office, ServeProcess, AgentProcess]]:
    """An office on each database with the gateway and a silent one registered, its
    ``serve``, and the agent with sync (not started); all stopped afterwards."""
    site_key = tmp_path / "site.key"
    site_key.write_text(SITE_KEY.hex())
    folder = tmp_path / "central"
    folder.mkdir()
    office_db.use(folder)
    office = Office(folder, broker, site_key)
    office.central.add_gateway(SILENT, "site-s", site_key)
    serve = ServeProcess(office)
    agent = AgentProcess(tmp_path / "gw", broker, office.trusted_keys)
    try:
        yield office, serve, agent
    finally:
        agent.close()
        serve.kill()
        office.close()


def test_office_shows_each_gateway_with_the_version_its_status_reported(
        rig: tuple[Office, ServeProcess, AgentProcess]) -> None:
    """The running agent reports its version in its status: ``permitgate status`` shows
    it, the office stores it, ``show --json`` carries it per gateway and grouped by
    version, ``show`` prints it; after the agent stops, its offline status still names
    it, and a gateway that never reported stays "not reported"."""
    office, serve, agent = rig
    serve.start()
    agent.start()
    wait_for(lambda: office.report()["online"] and office.report()["version"],
             lambda: f"the gateway's status at the office: {office.report()['status']}")
    assert office.report()["version"] == __version__

    out = io.StringIO()
    assert cli.main(["status", "-c", str(agent.config)], out=out) == 0
    assert f"version    {__version__}" in out.getvalue().splitlines()
    out = io.StringIO()
    assert cli.main(["status", "--json", "-c", str(agent.config)], out=out) == 0
    local = json.loads(out.getvalue())
    assert (local["version"], local["agent"]["version"]) == (__version__, __version__)

    out = io.StringIO()
    assert central_cli.main(["--dir", str(office.folder), "show", "--json"], out=out) == 0
    report = json.loads(out.getvalue())
    versions = {gw["gateway"]: gw["version"] for gw in report["gateways"]}
    assert versions == {GATEWAY: __version__, SILENT: None}
    assert report["by_version"] == [{"version": __version__, "gateways": [GATEWAY]},
                                    {"version": None, "gateways": [SILENT]}]
    out = io.StringIO()
    assert central_cli.main(["--dir", str(office.folder), "show"], out=out) == 0
    text = out.getvalue().splitlines()
    assert f"version {__version__}: {GATEWAY}" in text
    assert f"version not reported: {SILENT}" in text
    assert any(line.startswith(f"{GATEWAY}  site ") and line.endswith(f"version {__version__}")
               for line in text)

    assert agent.stop() == 0
    wait_for(lambda: office.report()["online"] is False, "the gateway's offline status")
    assert office.report()["version"] == __version__


def test_status_names_a_running_agent_older_than_the_installed_program(
        tmp_path: Path) -> None:
    """When the running agent recorded another version than the installed ``permitgate``
    (upgraded, not restarted), ``status`` says both and that a restart is due."""
    config = write_agent(tmp_path, store={"path": str(tmp_path / "pg.db")})
    store = Store(tmp_path / "pg.db")
    try:
        store.append(Event("agent_started"), device=("system", "agent", json.dumps(
            {"state": "running", "pid": os.getpid(), "version": "0.0.1"})))
    finally:
        store.close()
    out = io.StringIO()
    assert cli.main(["status", "-c", str(config)], out=out) == 0
    assert (f"version    {__version__} installed; the agent runs 0.0.1 (restart it)"
            in out.getvalue().splitlines())
