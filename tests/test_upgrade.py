"""Upgrades with provisioning/install.sh: a release folder per run behind the
``/opt/permitgate`` link, the store migrated by ``permitgate migrate`` before the new
release starts, and the previous release put back when a start check fails.

install.sh runs for real, into a temporary root (``--root``: no users, no systemd, the
checks run as this user). Its one stand-in is the virtual environment: instead of
``scripts/bootstrap.sh`` and pip (PyPI), ``$PERMITGATE_BOOTSTRAP`` makes a small one
whose ``permitgate`` runs the release's own code on this environment's packages (noting
the extras it was asked for), so what a test sees is the code of the release the link
points at. The releases are copies of this
checkout, with a version, a store migration or a file of their own.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import __version__, cli
from agent.cli_migrate import MIGRATED_NAME
from agent.datalock import DataLock
from agent.store import CredentialEntry, Store, lists_path
from protocol.chain import Event
from protocol.hashing import CredentialHasher
from tests.agentconf import KEY, write_agent

REPO = Path(__file__).resolve().parent.parent
INSTALL = Path("provisioning/install.sh")
SKIP = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".mypy_cache", ".pytest_cache",
                              ".ruff_cache", ".hypothesis", "*.egg-info", "permitgate-data",
                              "trial", "*.db", "*.db-wal", "*.db-shm")
PROBE_TABLE = "upgrade_probe"
GOOD_MIGRATION = f"CREATE TABLE {PROBE_TABLE} (id INTEGER PRIMARY KEY);"
BROKEN_MIGRATION = "CREATE TABLE broken_by_design (;"
RETIRED = "docs/retired-in-the-next-release.md"
"""A file the old release has and the new one does not."""
CARDS = ("em4100:67003B51C6", "em4100:67003BA86C")
BOOTSTRAP = """#!{python}
import subprocess, sys
from pathlib import Path

release = Path(sys.argv[1])
venv = release / ".venv"
subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
python = venv / "bin" / "python"
site = subprocess.run([str(python), "-c", "import sysconfig; "
                       "print(sysconfig.get_paths()['purelib'])"],
                      check=True, capture_output=True, text=True).stdout.strip()
# The release first, then this environment's packages (its own .pth files, such as the
# checkout's editable install, are not read from a folder added this way).
Path(site, "permitgate-release.pth").write_text(f"{{release}}\\n{deps}\\n")
script = venv / "bin" / "permitgate"
script.write_text(f"#!{{python}}\\nimport sys\\nfrom agent.cli import main\\n"
                  "sys.exit(main())\\n")
script.chmod(0o755)
# The extras install.sh asks for (the packages are this environment's: all of them).
(venv / "extras").write_text(sys.argv[2])
"""


def release_source(base: Path, folder: Path, *, version: str | None = None,
                   migration: str | None = None, extra: str | None = None) -> Path:
    """A copy of the checkout at ``folder``: with ``version`` in pyproject.toml and
    ``agent.__version__``, ``migration`` appended to the event store's migrations, and a
    file ``extra``."""
    shutil.copytree(base, folder, symlinks=True)
    if version is not None:
        for name, pattern, line in (
                ("pyproject.toml", r'^version = ".*"$', f'version = "{version}"'),
                ("agent/__init__.py", r'^__version__ = ".*"$', f'__version__ = "{version}"')):
            path = folder / name
            text, count = re.subn(pattern, line, path.read_text("utf-8"), count=1, flags=re.M)
            assert count == 1, f"{name} names no version"
            path.write_text(text, "utf-8")
    if migration is not None:
        store = folder / "agent" / "store.py"
        anchor = "SCHEMA_VERSION = len(EVENT_MIGRATIONS)"
        text = store.read_text("utf-8")
        assert text.count(anchor) == 1, "agent/store.py changed how it counts migrations"
        store.write_text(text.replace(anchor, f"EVENT_MIGRATIONS = (*EVENT_MIGRATIONS, "
                                              f"{migration!r})\n{anchor}"), "utf-8")
    if extra is not None:
        (folder / extra).write_text("# Retired\n", "utf-8")
    return folder


def bumped(version: str) -> str:
    """``version`` with its last number one higher (0.1.0 -> 0.1.1)."""
    head, last = re.fullmatch(r"(.*?)(\d+)", version).groups()  # type: ignore[union-attr]
    return f"{head}{int(last) + 1}"


@dataclass
class Gateway:
    """A temporary root to install into, a building's configuration and its data folder."""

    root: Path
    site: Path
    """The configuration and key install.sh is given."""
    data: Path
    base: Path
    """A copy of this checkout with the file ``RETIRED``: the release installed first."""
    checkout: Path
    """A copy of this checkout as it is."""
    bootstrap: Path
    work: Path

    @property
    def config(self) -> Path:
        """The installed configuration."""
        return self.root / "etc" / "permitgate" / "permitgate.toml"

    @property
    def db(self) -> Path:
        """The event store (its store path is absolute: in ``data``)."""
        return self.data / "pg.db"

    @property
    def link(self) -> Path:
        """``/opt/permitgate``: the link to the current release."""
        return self.root / "opt" / "permitgate"

    @property
    def releases(self) -> Path:
        """``/opt/permitgate-releases``."""
        return self.root / "opt" / "permitgate-releases"

    def current(self) -> str:
        """The release the link points at."""
        return self.link.readlink().name

    def install(self, source: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``source``'s install.sh into the temporary root."""
        env = {**os.environ, "PERMITGATE_BOOTSTRAP": str(self.bootstrap)}
        env.pop("PERMITGATE_CONFIG", None)
        return subprocess.run(["bash", str(source / INSTALL), "--root", str(self.root), *args],
                              capture_output=True, text=True, env=env, timeout=300,
                              check=False)

    def permitgate(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The current release's ``permitgate`` (through the link), on the installed
        configuration."""
        return subprocess.run([str(self.link / ".venv" / "bin" / "permitgate"), *args,
                               "-c", str(self.config)], capture_output=True, text=True,
                              cwd=self.work, timeout=120, check=False)

    def source(self, name: str, **changes: str) -> Path:
        """A release's source: the checkout with ``changes`` (``release_source``)."""
        return release_source(self.checkout, self.work / name, **changes)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout as install.sh copies it (no environment, caches or databases)."""
    folder = tmp_path_factory.mktemp("checkout") / "permitgate"
    shutil.copytree(REPO, folder, ignore=SKIP, symlinks=True)
    return folder


@pytest.fixture
def gateway(tmp_path: Path, checkout: Path) -> Gateway:
    """A building's configuration (store in ``data``), and a base release that has the
    file ``RETIRED``."""
    bootstrap = tmp_path / "bootstrap.py"
    bootstrap.write_text(BOOTSTRAP.format(python=sys.executable,
                                          deps=sysconfig.get_paths()["purelib"]))
    bootstrap.chmod(0o755)
    site, data = tmp_path / "site", tmp_path / "data"
    write_agent(site, store={"path": str(data / "pg.db")})
    base = release_source(checkout, tmp_path / "old", extra=RETIRED)
    return Gateway(tmp_path / "root", site, data, base, checkout, bootstrap, tmp_path)


def make_data(db: Path) -> None:
    """The data folder a gateway running the current code has: events, an allowlist,
    revocations."""
    hasher = CredentialHasher(KEY)
    store = Store(db)
    try:
        store.append(Event("agent_started", data={"version": "previous"}))
        store.append(Event("access_granted", door="front", reader="front-in",
                           direction="entry", reason="granted"))
        store.replace_allowlist([CredentialEntry(hasher.credential(c)) for c in CARDS],
                                version=7)
        store.revoke([(hasher.permit("DEMO-PERMIT-303"), "permit")], version=2)
    finally:
        store.close()


def schema(path: Path) -> int:
    """The schema version stamped in a database file."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                ).fetchone()[0])


def table_names(path: Path) -> set[str]:
    """The tables of a database file."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE "
                                           "type = 'table'")}


def counts(db: Path) -> tuple[int, int, int]:
    """(events, allowlist entries, revocations), read with SQLite alone (the current code
    refuses a store that a newer release migrated)."""
    with contextlib.closing(sqlite3.connect(db)) as ev, \
            contextlib.closing(sqlite3.connect(lists_path(db))) as ls:
        return (int(ev.execute("SELECT count(*) FROM events").fetchone()[0]),
                int(ls.execute("SELECT count(*) FROM credentials").fetchone()[0]),
                int(ls.execute("SELECT count(*) FROM revocations").fetchone()[0]))


@pytest.fixture
def installed(gateway: Gateway) -> tuple[str, str, tuple[int, int, int]]:
    """The base release installed with the configuration and key, and its data folder
    made; (release id, its version, the store's counts)."""
    done = gateway.install(gateway.base, "--config", str(gateway.site / "permitgate.toml"),
                           "--site-key", str(gateway.site / "site.key"))
    assert done.returncode == 0, done.stderr
    make_data(gateway.db)
    return gateway.current(), __version__, counts(gateway.db)


def test_first_install_makes_a_release_behind_the_link(gateway: Gateway) -> None:
    """A first install copies the checkout into a release folder named by its version,
    points ``/opt/permitgate`` at it, installs configuration, key and unit, and runs the
    release's code from its own environment."""
    done = gateway.install(gateway.base, "--config", str(gateway.site / "permitgate.toml"),
                           "--site-key", str(gateway.site / "site.key"))
    assert done.returncode == 0, done.stderr
    release = gateway.current()
    assert release.startswith(f"{__version__}-")
    assert gateway.link.is_symlink()
    assert [p.name for p in gateway.releases.iterdir()] == [release]
    assert (gateway.link / RETIRED).is_file()
    assert not (gateway.link / ".git").exists()
    assert gateway.config.read_bytes() == (gateway.site / "permitgate.toml").read_bytes()
    key = gateway.root / "etc" / "permitgate" / "credentials" / "site.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (gateway.root / "etc" / "systemd" / "system" / "permitgate.service").is_file()
    assert "store" in done.stdout and "none yet" in done.stdout
    assert f"installed {release}" in done.stdout
    version = gateway.permitgate("--version")
    assert version.stdout.strip() == f"permitgate {__version__}"


def test_upgrade_keeps_data_and_configuration_migrates_and_drops_retired_files(
        gateway: Gateway, installed: tuple[str, str, tuple[int, int, int]]) -> None:
    """Re-running install.sh from a newer release, with the previous release's data
    folder: the link moves to the new release, a file the new release does not have is
    gone, the configuration is untouched, the store is migrated before any start (with a
    copy kept), its events and lists are intact, and the previous release stays for
    rollback."""
    previous, old_version, before = installed
    config = gateway.config.read_bytes()
    old_schema = schema(gateway.db)
    new_version = bumped(old_version)
    source = gateway.source("new", version=new_version, migration=GOOD_MIGRATION)
    done = gateway.install(source)
    assert done.returncode == 0, done.stderr
    release = gateway.current()
    assert release.startswith(f"{new_version}-")
    assert f"upgraded to {release} (from {previous}" in done.stdout
    assert sorted(p.name for p in gateway.releases.iterdir()) == sorted([previous, release])
    assert not (gateway.link / RETIRED).exists()
    assert (gateway.releases / previous / RETIRED).is_file()
    assert gateway.config.read_bytes() == config
    assert schema(gateway.db) == old_schema + 1
    assert PROBE_TABLE in table_names(gateway.db)
    assert f"schema {old_schema} -> {old_schema + 1}" in done.stdout
    assert counts(gateway.db) == before
    backup = gateway.root / "var" / "backups" / "permitgate" / release
    assert (backup / MIGRATED_NAME).exists()
    assert schema(backup / gateway.db.name) == old_schema
    verified = gateway.permitgate("events", "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"OK: {before[0]} events")
    status = gateway.permitgate("status")
    assert status.returncode == 0, status.stderr
    assert f"version    {new_version}" in status.stdout.splitlines()
    assert any(line.startswith("allowlist  2 entries, version 7") for line in
               status.stdout.splitlines())


def test_upgrades_keep_the_current_and_the_previous_release(
        gateway: Gateway, installed: tuple[str, str, tuple[int, int, int]]) -> None:
    """After a second upgrade the oldest release is removed: the current release and the
    one before it remain; without a migration due no store copy is kept."""
    first, old_version, before = installed
    source = gateway.source("new", version=bumped(old_version))
    assert gateway.install(source).returncode == 0
    second = gateway.current()
    done = gateway.install(source)
    assert done.returncode == 0, done.stderr
    third = gateway.current()
    assert len({first, second, third}) == 3
    assert sorted(p.name for p in gateway.releases.iterdir()) == sorted([second, third])
    assert not any((gateway.root / "var" / "backups" / "permitgate").iterdir())
    assert counts(gateway.db) == before


def test_an_upgrade_installs_the_extras_the_current_release_has(
        gateway: Gateway, installed: tuple[str, str, tuple[int, int, int]]) -> None:
    """The hardware extras found in the current release's environment (here the test
    environment's own packages) are installed in the new one, besides ``--extras``; a
    first install has only those asked for."""
    first, old_version, _ = installed
    assert (gateway.releases / first / ".venv" / "extras").read_text() == ""
    has = [extra for extra, dist in (("osdp", "libosdp"), ("gpio", "gpiod"),
                                     ("pcsc", "pyscard")) if _installed(dist)]
    source = gateway.source("new", version=bumped(old_version))
    done = gateway.install(source, "--extras", "pcsc")
    assert done.returncode == 0, done.stderr
    wanted = (gateway.link / ".venv" / "extras").read_text().split(",")
    assert sorted(wanted) == sorted({*has, "pcsc"})
    refused = gateway.install(source, "--extras", "office")
    assert refused.returncode == 2
    assert "unknown extra 'office'" in refused.stderr


def _installed(distribution: str) -> bool:
    """Whether this environment has ``distribution``."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_a_release_whose_migration_fails_is_rolled_back(
        gateway: Gateway, installed: tuple[str, str, tuple[int, int, int]]) -> None:
    """A new release whose store migration fails is removed and the previous release is
    current again, with the store as it was."""
    previous, old_version, before = installed
    old_schema = schema(gateway.db)
    source = gateway.source("broken", version=bumped(old_version),
                            migration=BROKEN_MIGRATION)
    done = gateway.install(source)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "permitgate migrate failed" in done.stderr
    assert f"rolled back: {previous} is the current release again" in done.stderr
    assert gateway.current() == previous
    assert [p.name for p in gateway.releases.iterdir()] == [previous]
    assert (gateway.link / RETIRED).is_file()
    assert schema(gateway.db) == old_schema
    assert counts(gateway.db) == before
    version = gateway.permitgate("--version")
    assert version.stdout.strip() == f"permitgate {old_version}"
    verified = gateway.permitgate("events", "verify")
    assert verified.returncode == 0, verified.stderr


def test_a_release_failing_its_start_check_gets_the_old_store_and_configuration_back(
        gateway: Gateway, installed: tuple[str, str, tuple[int, int, int]]) -> None:
    """A new release that migrates the store but then fails a start check (here
    ``--check``) is rolled back with the store copy put back, which the previous release
    opens, and the configuration it replaced restored."""
    previous, old_version, before = installed
    config = gateway.config.read_bytes()
    old_schema = schema(gateway.db)
    changed = gateway.work / "changed.toml"
    changed.write_text(config.decode() + "\n# the new release's configuration\n")
    source = gateway.source("new", version=bumped(old_version), migration=GOOD_MIGRATION)
    done = gateway.install(source, "--config", str(changed), "--check",
                           'test "$(basename "$PERMITGATE_RELEASE")" = nowhere')
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"schema {old_schema} -> {old_schema + 1}" in done.stdout
    assert "--check" in done.stderr and "failed" in done.stderr
    assert "the store is back as it was before the migration" in done.stderr
    assert gateway.current() == previous
    assert gateway.config.read_bytes() == config
    assert schema(gateway.db) == old_schema
    assert PROBE_TABLE not in table_names(gateway.db)
    assert counts(gateway.db) == before
    status = gateway.permitgate("status", "--json")
    assert status.returncode == 0, status.stderr
    assert f'"version": "{old_version}"' in status.stdout


def test_a_copy_installed_before_releases_becomes_the_previous_release(
        gateway: Gateway) -> None:
    """An ``/opt/permitgate`` that is a plain folder (installed before releases) becomes
    the previous release as it is, and a rollback to it runs it again."""
    flat = gateway.link
    shutil.copytree(gateway.base, flat, symlinks=True)
    subprocess.run([str(gateway.bootstrap), str(flat), ""], check=True)
    (gateway.root / "etc" / "permitgate").mkdir(parents=True)
    shutil.copy(gateway.site / "permitgate.toml", gateway.config)
    make_data(gateway.db)
    source = gateway.source("new", version=bumped(__version__))
    done = gateway.install(source, "--check", "false")
    assert done.returncode == 1, done.stdout + done.stderr
    adopted = f"{__version__}-before-releases"
    assert gateway.current() == adopted
    assert (gateway.releases / adopted / RETIRED).is_file()
    assert gateway.permitgate("--version").stdout.strip() == f"permitgate {__version__}"
    done = gateway.install(source)
    assert done.returncode == 0, done.stderr
    assert f"(from {adopted}, kept for rollback)" in done.stdout
    assert gateway.permitgate("--version").stdout.strip() == (
        f"permitgate {bumped(__version__)}")


def test_a_configuration_the_new_release_refuses_changes_nothing(
        gateway: Gateway, installed: tuple[str, str, tuple[int, int, int]]) -> None:
    """A configuration the new release's ``check-config`` refuses stops the install
    before the switch: the running release, its configuration and the store stay."""
    previous, old_version, before = installed
    config = gateway.config.read_bytes()
    broken = gateway.work / "broken.toml"
    broken.write_text("[site]\nsite_id = 'x'\n")
    done = gateway.install(gateway.source("new", version=bumped(old_version)),
                           "--config", str(broken))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refuses the configuration" in done.stderr
    assert gateway.current() == previous
    assert [p.name for p in gateway.releases.iterdir()] == [previous]
    assert gateway.config.read_bytes() == config
    assert counts(gateway.db) == before


# -- permitgate migrate on its own -------------------------------------------------------


def test_migrate_without_a_store_creates_nothing(tmp_path: Path) -> None:
    """``migrate`` on a gateway whose agent never ran says so and creates no file."""
    config = write_agent(tmp_path / "site", store={"path": str(tmp_path / "data" / "pg.db")})
    out = io.StringIO()
    assert cli.main(["migrate", "-c", str(config), "--backup", str(tmp_path / "bk")],
                    out=out) == 0
    assert "none yet" in out.getvalue()
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "bk").exists()


def test_migrate_refuses_while_an_agent_holds_the_data_folder(tmp_path: Path) -> None:
    """``migrate`` does not touch a store an agent is running on (exit status 2)."""
    config = write_agent(tmp_path, store={"path": str(tmp_path / "pg.db")})
    make_data(tmp_path / "pg.db")
    lock = DataLock.acquire(tmp_path / "agent.lock")
    try:
        assert cli.main(["migrate", "-c", str(config)], out=io.StringIO()) == 2
    finally:
        lock.release()


def test_migrate_refuses_a_store_of_another_user(tmp_path: Path) -> None:
    """``migrate`` run as another user than the store's owner (root by hand) is refused,
    so it never leaves files the agent cannot open."""
    config = write_agent(tmp_path, store={"path": str(tmp_path / "pg.db")})
    make_data(tmp_path / "pg.db")
    if os.geteuid() != 0:
        pytest.skip("needs root to give the store another owner")
    os.chown(tmp_path / "pg.db", 4321, -1)
    assert cli.main(["migrate", "-c", str(config)], out=io.StringIO()) == 2
