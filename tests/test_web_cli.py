"""``permitgate-web``: accounts from the command line, and the refusals of ``run``."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from agent.web import cli
from agent.web.db import WebDB
from tests.agentconf import write_agent
from tests.web_fake_agent import FakeAgent


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """An agent configuration with a [web] section whose state folder is in tmp."""
    return write_agent(tmp_path, extra=f'\n[web]\nstate_dir = "{tmp_path / "web"}"\n')


def run(config: Path, *argv: str, stdin: str = "",
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str]:
    """``permitgate-web -c CONFIG ARGV`` in-process; exit status and output."""
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    out = io.StringIO()
    return cli.main(["-c", str(config), *argv], out), out.getvalue()


def test_init_prints_a_code_for_the_asked_role(config: Path, tmp_path: Path) -> None:
    """``users init`` prints a one-time code valid 15 minutes for a new account of the
    role asked for (landlord by default)."""
    status, out = run(config, "users", "init", "--role", "installer")
    assert status == 0
    code = out.split("account: ")[1].split()[0]
    assert len(code) == 14 and code.count("-") == 2
    assert "installer" in out and "15 minutes" in out
    db = WebDB(tmp_path / "web" / "web.db")
    assert db.setup_code_role(code.replace("-", "")) == "installer"


def test_accounts_are_added_listed_changed_and_deleted(config: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """add, list, passwd, role and delete do what they say, and each change goes to the
    agent's log with the account's name."""
    agent = FakeAgent(tmp_path / "web.sock")
    try:
        assert run(config, "users", "add", "Alice", "--password-stdin",
                   stdin="correct horse battery\n", monkeypatch=monkeypatch)[0] == 0
        status, out = run(config, "users", "list")
        assert status == 0 and out.split() == ["alice", "landlord"]
        assert run(config, "users", "passwd", "alice", "--password-stdin",
                   stdin="another long password\n", monkeypatch=monkeypatch)[0] == 0
        assert run(config, "users", "role", "alice", "installer")[0] == 0
        status, out = run(config, "users", "list", "--json")
        assert '"role": "installer"' in out
        assert run(config, "users", "delete", "alice")[0] == 0
        assert run(config, "users", "list")[1].startswith("no accounts")
        audits = [(r["kind"], r["account"]) for r in agent.requests if r["op"] == "audit"]
        assert audits == [("web_account_created", "alice"), ("web_account_changed", "alice"),
                          ("web_account_changed", "alice"), ("web_account_deleted", "alice")]
    finally:
        agent.close()


def test_changes_wait_for_the_agent_when_it_is_not_running(config: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """With no agent the change is made, a note says its record will follow, and the
    record waits in web.db's outbox."""
    status, out = run(config, "users", "add", "bob", "--password-stdin",
                      stdin="correct horse battery\n", monkeypatch=monkeypatch)
    assert status == 0 and "not answering" in out
    pending = WebDB(tmp_path / "web" / "web.db").pending_audits()
    assert [m["kind"] for _i, m in pending] == ["web_account_created"]


@pytest.mark.parametrize(("argv", "stdin", "says"), [
    (("users", "add", "x"), "correct horse battery\n", "2 to 32"),
    (("users", "add", "carol"), "short\n", "at least 10"),
    (("users", "add", "carol"), "carol\n", "at least 10"),
    (("users", "delete", "nobody"), "", "no account called 'nobody'"),
    (("users", "role", "nobody", "installer"), "", "no account"),
])
def test_unusable_input_exits_2_saying_why(  # noqa: PLR0917 - fixtures and parameters
        config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        argv: tuple[str, ...], stdin: str, says: str) -> None:
    """A bad name, a short password or an unknown account exits 2 with the reason."""
    args = [*argv, "--password-stdin"] if argv[1] == "add" else list(argv)
    status, _out = run(config, *args, stdin=stdin, monkeypatch=monkeypatch)
    assert status == 2
    assert says in capsys.readouterr().err


def test_adding_a_taken_name_exits_2(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second account of the same name is refused."""
    for expected in (0, 2):
        status, _ = run(config, "users", "add", "dora", "--password-stdin",
                        stdin="correct horse battery\n", monkeypatch=monkeypatch)
        assert status == expected


def test_run_refuses_plain_http_beyond_localhost(tmp_path: Path) -> None:
    """``run`` without a certificate on a network address exits 2 before serving."""
    config = write_agent(tmp_path, extra='\n[web]\nlisten = "0.0.0.0"\ntls_cert = "none"\n'
                                         'tls_key = "none"\n')
    done = subprocess.run([sys.executable, "-m", "agent.web.cli", "-c", str(config), "run"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "localhost only" in done.stderr


def test_the_server_refuses_to_start_without_its_settings() -> None:
    """The server program started by hand (no settings from ``run``) says how to start
    it and exits 2."""
    done = subprocess.run([sys.executable, "-m", "agent.web.serve"], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "permitgate-web run" in done.stderr


def test_permitgate_users_hands_over_to_the_page(config: Path) -> None:
    """``permitgate users ...`` (the agent's command) runs these same account commands."""
    done = subprocess.run([sys.executable, "-m", "agent.cli", "users", "-c", str(config),
                           "init"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "one-time code" in done.stdout
