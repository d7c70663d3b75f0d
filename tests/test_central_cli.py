"""The ``permitgate-central`` command as a newcomer meets it: the README's office
walk-through run command by command (office, broker and gateway all real processes), the
``./permitgate-central`` launcher, ``keygen``'s folder, and what the office prints.

The README's ``sh`` blocks are read from README.md itself, so the test runs what the
reader copies. Only two things are changed: the checkout's launchers become this
interpreter (``python -m ...``; the launcher itself is tested on its own below), and the
broker port 1883 becomes the test broker's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.store import Store
from provisioning import central_cli
from tests.broker import Broker
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
OFFICE_SECTION = "### The office, step by step\n"
README_PORT = 1883
GATEWAY_DB = Path("trial/gateway/data/permitgate.db")
"""The gateway's database in the walk-through (its ``[store] path``, from its folder)."""
APPLIED = (
    (re.compile(r"published list version (\d+)"), "list"),
    (re.compile(r"\(broadcast seq (\d+)\)"), "all"),
    (re.compile(r"\(rev seq (\d+)\)"), "rev"),
    (re.compile(r"\(cmd seq (\d+)\)"), "cmd"),
)
"""What an office command says it sent, and the gateway's stream that applies it."""


def clean_env() -> dict[str, str]:
    """The environment of a shell a newcomer opens: none of our variables set."""
    return {k: v for k, v in os.environ.items()
            if k not in {"PERMITGATE_CONFIG", "PERMITGATE_CENTRAL_DIR", "CREDENTIALS_DIRECTORY",
                         "NOTIFY_SOCKET"}}


def run_central(*args: str, cwd: Path, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``permitgate-central ARGS`` as a child process."""
    return subprocess.run([sys.executable, "-m", "provisioning.central_cli", *args], cwd=cwd,
                          env={**clean_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=60, check=False)


def office_blocks() -> list[str]:
    """The three ``sh`` blocks of the README's office section: set-up, the two long-running
    processes, and the commands run against them."""
    text = README.read_text("utf-8")
    assert OFFICE_SECTION in text, "README.md lost its office walk-through"
    section = text.split(OFFICE_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.S | re.M)
    assert len(blocks) == 3, blocks
    return blocks


def localise(text: str, port: int) -> str:
    """README text as this test runs it: the launchers as ``python -m``, the test broker's
    port for 1883."""
    python = shlex.quote(sys.executable)
    text = text.replace("./permitgate-central ",
                        f"{python} -m provisioning.central_cli --port {port} ")
    text = text.replace("./permitgate ", f"{python} -m agent.cli ")
    assert "./permitgate" not in text
    return text.replace(f"port = {README_PORT}", f"port = {port}")


def commands(block: str) -> list[str]:
    """The command lines of a block, without blank lines."""
    return [line for line in block.splitlines() if line.strip()]


def comment(line: str) -> str:
    """The comment at the end of a command line ("" when there is none)."""
    return line.split(" # ", 1)[1].strip() if " # " in line else ""


def gateway_versions(db: Path) -> dict[str, int]:
    """The stream versions the gateway has applied (none before its database exists)."""
    if not db.exists():
        return {}
    store = Store(db)
    try:
        return store.versions()
    finally:
        store.close()


def applied(db: Path, stream: str, seq: int) -> Callable[[], bool]:
    """Whether the gateway has applied ``stream`` up to ``seq``, as a condition."""
    return lambda: gateway_versions(db).get(stream, 0) >= seq


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Long-running child processes, stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for child in started:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in started:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def test_readme_office_walkthrough_runs_as_written(
        tmp_path: Path, broker: Broker, children: list[subprocess.Popen[str]]) -> None:
    """Every command of the README's office section works as copied: the set-up block
    exits 0, the office and the gateway it starts connect and the gateway gets its list,
    each further command exits 0, and each tap prints the decision its comment shows."""
    setup, processes, session = (localise(b, broker.port) for b in office_blocks())

    done = subprocess.run(["bash", "-euo", "pipefail", "-c", setup], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trial/gateway/permitgate.toml: OK" in done.stdout

    logs = []
    for i, line in enumerate(commands(processes)):
        log = tmp_path / f"process-{i}.log"
        logs.append(log)
        with log.open("w") as out:
            children.append(subprocess.Popen(shlex.split(line, comments=True), cwd=tmp_path,
                                             env=clean_env(), stdout=out, stderr=out,
                                             text=True))
    db = tmp_path / GATEWAY_DB

    def both_logs() -> str:
        return "\n".join(f"{log.name}:\n{log.read_text()}" for log in logs)

    def list_applied() -> bool:
        assert all(child.poll() is None for child in children), both_logs()
        return gateway_versions(db).get("list", 0) >= 1

    wait_for(list_applied, lambda: "the gateway to apply its first list\n" + both_logs())

    outputs = []
    for line in commands(session):
        result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=clean_env(),
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, (line, result.stdout, result.stderr)
        outputs.append(result.stdout)
        if " sim tap " in line:
            assert result.stdout == comment(line) + "\n", line
        # Wait, as a reader watching the gateway would, until the gateway has applied
        # what the office just sent.
        for pattern, stream in APPLIED:
            for seq in pattern.findall(result.stdout):
                wait_for(applied(db, stream, int(seq)),
                         f"the gateway to apply {stream} seq {seq}")

    text = "".join(outputs)
    assert "OPEN   granted" in text and "DENIED revoked" in text
    assert re.search(r"applied v\d+ \(current\)", text)          # show
    assert re.search(r"^SEQ +TIME +KIND", text, re.M)             # the office's events
    assert "mode       lockdown" in text                         # the gateway's status
    assert re.search(r"^ +SEQ +TIME \(Asia/Shanghai\) +KIND", text, re.M)  # events tail

    for child in children:
        child.send_signal(signal.SIGTERM)
    assert [child.wait(timeout=30) for child in children] == [0, 0], both_logs()


def test_readme_gateway_example_is_a_plain_local_broker_setup() -> None:
    """The README's gateway configuration syncs with a plain local broker: no TLS, port
    1883, and the office's trusted keys in a file beside the configuration."""
    setup = office_blocks()[0]
    config = setup.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    assert "[sync]\nenabled = true\n" in config
    assert "\ntls = false " in config
    assert f"\nport = {README_PORT}\n" in config
    assert '\ntrusted_keys = "./trusted-keys.txt"' in config
    assert "cp trial/office/trusted-keys.txt trial/gateway/" in setup


def test_readme_says_where_the_site_key_comes_from_before_add_gateway() -> None:
    """The walk-through makes the site key (``permitgate keygen``) before ``add-gateway``
    names it, and gives the gateway the same file."""
    lines = commands(office_blocks()[0])
    keygen = next(i for i, line in enumerate(lines)
                  if line.startswith("./permitgate keygen trial/office/bldg-0001.key"))
    add = next(i for i, line in enumerate(lines) if " add-gateway " in line)
    assert keygen < add
    assert "--site-key trial/office/bldg-0001.key" in lines[add]
    assert any(line.startswith("cp trial/office/bldg-0001.key trial/gateway/site.key")
               for line in lines)


def test_readme_office_table_lists_every_command() -> None:
    """README's table of ``permitgate-central`` commands has a row for every command the
    tool has (what ``permitgate-central --help`` lists), and none that does not exist."""
    text = README.read_text("utf-8")
    table = text.split("| `permitgate-central` command |", 1)[1].split("\n\n", 1)[0]
    first_cells = [line.replace("\\|", "/").split("|")[1] for line in table.splitlines()
                   if line.startswith("| `")]
    names = {name for cell in first_cells for name in re.findall(r"`([a-z-]+)", cell)}
    help_text = central_cli.build_parser().format_help()
    assert names == set(re.findall(r"^    ([a-z-]+)  ", help_text, re.M))


# -- the launcher -------------------------------------------------------------------


def fake_checkout(folder: Path, bootstrap_status: int = 0) -> Path:
    """A copy of the launcher in a checkout whose bootstrap and venv command only record
    how they were called (in ``calls``)."""
    shutil.copy2(ROOT / "permitgate-central", folder / "permitgate-central")
    calls = folder / "calls"
    for relative, script in (
            ("scripts/bootstrap.sh",
             f'echo "bootstrap $*" >> {shlex.quote(str(calls))}\nexit {bootstrap_status}\n'),
            (".venv/bin/permitgate-central",
             f'echo "central $*" >> {shlex.quote(str(calls))}\n')):
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)
    return calls


def test_launcher_bootstraps_the_venv_then_runs_the_office_command(tmp_path: Path) -> None:
    """``./permitgate-central`` (run from any folder) sets up ``.venv`` with
    ``scripts/bootstrap.sh runtime``, as ``./permitgate`` does, then runs the venv's
    ``permitgate-central`` with the arguments as given."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    calls = fake_checkout(checkout)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([str(checkout / "permitgate-central"), "--dir", "my office",
                           "keygen"], cwd=elsewhere, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == ["bootstrap runtime",
                                              "central --dir my office keygen"]
    assert os.access(ROOT / "permitgate-central", os.X_OK)
    assert '"$here/scripts/bootstrap.sh" runtime' in (ROOT / "permitgate").read_text()


def test_launcher_stops_when_the_bootstrap_fails(tmp_path: Path) -> None:
    """A bootstrap that fails (no python3-venv) stops the launcher with its status; the
    office command is not run."""
    calls = fake_checkout(tmp_path, bootstrap_status=2)
    done = subprocess.run([str(tmp_path / "permitgate-central"), "show"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert calls.read_text().splitlines() == ["bootstrap runtime"]


# -- keygen's folder ----------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--dir", "office", "keygen"],
    ["keygen", "--dir", "office"],
    ["keygen", "office"],
], ids=["dir-before", "dir-after", "positional"])
def test_keygen_takes_the_folder_as_every_command_does(tmp_path: Path,
                                                       argv: list[str]) -> None:
    """``keygen`` writes to the folder given by ``--dir`` (before or after the command) or
    as its argument."""
    done = run_central(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "office" / "trusted-keys.txt").is_file()
    assert (tmp_path / "office" / "permit.key").is_file()


def test_keygen_reads_the_folder_from_the_environment(tmp_path: Path) -> None:
    """Without ``--dir`` or an argument, ``keygen`` uses ``$PERMITGATE_CENTRAL_DIR``."""
    done = run_central("keygen", cwd=tmp_path, env={"PERMITGATE_CENTRAL_DIR": "from-env"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "from-env" / "trusted-keys.txt").is_file()


@pytest.mark.parametrize(("argv", "message"), [
    (["keygen", "one", "--dir", "two"], "two folders given (one and --dir two)"),
    (["keygen"], "--dir: no central folder given"),
], ids=["two-folders", "none"])
def test_keygen_without_one_clear_folder_exits_2(tmp_path: Path, argv: list[str],
                                                 message: str) -> None:
    """``keygen`` with two different folders, or none at all, exits 2 saying so and
    creates nothing."""
    done = run_central(*argv, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_message_suggests_a_command_that_works(tmp_path: Path) -> None:
    """A command on a folder that does not exist names a ``keygen`` command that creates
    it, in the ``--dir`` form every command takes."""
    done = run_central("--dir", "nowhere", "show", cwd=tmp_path)
    assert done.returncode == 2
    assert "create it with 'permitgate-central --dir nowhere keygen'" in done.stderr
    follow = run_central("--dir", "nowhere", "keygen", cwd=tmp_path)
    assert follow.returncode == 0, follow.stderr


# -- what the office prints ---------------------------------------------------------


def test_office_times_are_local_with_their_offset(tmp_path: Path) -> None:
    """The office prints times in its machine's local zone with the offset, not UTC."""
    code = ("from provisioning.central_cli import local_time; "
            "print(local_time(1_796_000_000_000)); "
            "print(local_time(1_796_000_000_123, 'milliseconds'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          env={**clean_env(), "TZ": "Asia/Shanghai"}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["2026-11-30 08:53:20+08:00",
                                        "2026-11-30 08:53:20.123+08:00"]


def test_show_without_gateways_says_how_to_add_one(tmp_path: Path) -> None:
    """``show`` on a new folder says there are no gateways and how to add one."""
    assert run_central("--dir", "office", "keygen", cwd=tmp_path).returncode == 0
    done = run_central("--dir", "office", "show", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no gateways (add one with 'permitgate-central add-gateway')" in done.stdout
