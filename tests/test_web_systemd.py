"""The landlord page's systemd unit: its own user, no key, the hardening score."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.test_systemd import ROOT, Unit, parse_unit, systemd_analyze

UNIT = ROOT / "systemd" / "permitgate-web.service"
AGENT_UNIT = ROOT / "systemd" / "permitgate.service"
MAX_EXPOSURE = 1.5


def _one(unit: Unit, key: str) -> str:
    values = unit.get("Service", {}).get(key, [])
    assert len(values) == 1, f"{UNIT.name}: expected one {key}=, found {values}"
    return values[0]


def test_security_exposure_is_at_most_the_documented_bound() -> None:
    """``systemd-analyze security --offline=true`` rates the page's unit at or below 1.5."""
    result = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager",
                             str(UNIT)], capture_output=True, text=True, timeout=60,
                            check=False)
    match = re.search(r"Overall exposure level for permitgate-web\.service:\s*"
                      r"([0-9]+(?:\.[0-9]+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_page_runs_as_its_own_user_without_the_site_key() -> None:
    """The page has its own user and state folder, gets only its TLS files as
    credentials (never the site key), no devices and no capabilities."""
    unit, agent = parse_unit(UNIT), parse_unit(AGENT_UNIT)
    assert _one(unit, "User") == "permitgate-web" != _one(agent, "User")
    assert _one(unit, "StateDirectory") == "permitgate-web"
    credentials = unit["Service"]["LoadCredential"]
    assert sorted(c.split(":")[0] for c in credentials) == ["web.crt", "web.key"]
    assert not any("site.key" in c for c in credentials)
    assert _one(unit, "PrivateDevices") == "yes" and "DeviceAllow" not in unit["Service"]
    assert _one(unit, "CapabilityBoundingSet") == ""
    assert _one(unit, "NoNewPrivileges") == "yes"


def test_page_serves_the_agents_configuration() -> None:
    """``permitgate-web run`` reads the same configuration file as the agent."""
    unit, agent = parse_unit(UNIT), parse_unit(AGENT_UNIT)
    config = re.search(r"--config (\S+)", _one(agent, "ExecStart"))
    assert config is not None
    assert _one(unit, "ExecStart") == (
        f"/opt/permitgate/.venv/bin/permitgate-web run --config {config.group(1)}")
    assert Path(_one(unit, "ExecStart").split()[0]).name == "permitgate-web"
