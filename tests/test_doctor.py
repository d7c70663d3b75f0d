"""``permitgate doctor``: device probes, file checks, clock check, fixes and exit status.

Serial devices are real pseudo-terminals (ok) or paths that do not exist (a fix is
suggested); ``/dev/serial/by-id`` is replaced by a folder of real symlinks to the ptys,
as udev would make them. GPIO chips do not exist on this kernel, which is itself the
"missing chip" case. Output is checked in-process through ``agent.cli.main``; the exit
status also through the real command in a child process.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from serial.tools import list_ports
from serial.tools.list_ports_common import ListPortInfo

from agent import cli, doctor
from agent.store import Store
from drivers.serial_reader import SerialReader
from provisioning import pki
from tests.agentconf import SIMULATED, DoorSpec, ReaderSpec, agent_toml

if TYPE_CHECKING:
    from tests.conftest import PtyPeer

REPO = Path(__file__).resolve().parent.parent


SIMULATED_READER = ReaderSpec(debounce_s=None)


def write_config(folder: Path, *, reader: ReaderSpec = SIMULATED_READER,
                 relay: Mapping[str, Any] = SIMULATED, sync: Mapping[str, Any] | None = None,
                 clock_floor: date = date(2020, 1, 1)) -> Path:
    """A configuration with one door and one reader, its store under ``data/`` and no
    ``site_key`` set, so the key is looked for next to the store (see ``install_key``)."""
    path = folder / "permitgate.toml"
    path.write_text(agent_toml(
        folder, site_id="s1", gateway_id="gw1", store={"path": "data/permitgate.db"},
        keys={"site_key": None}, policy={"clock_floor": clock_floor, "clock_trust_ntp": False},
        sync=sync, doors=(DoorSpec(unlock_s=None, relay=relay),), readers=(reader,)))
    return path


def serial_reader(port: str) -> ReaderSpec:
    """A serial reader on ``port``."""
    return ReaderSpec(driver="serial", debounce_s=None, options={"port": port})


def relay_board(port: str) -> dict[str, Any]:
    """A relay board on ``port``, channel 2."""
    return {"driver": "relay_board", "options": {"port": port, "channel": 2}}


def install_key(folder: Path, mode: int = 0o600, data: bytes | None = None) -> Path:
    """Put a site key next to the store, as an installed gateway has it."""
    (folder / "data").mkdir(exist_ok=True)
    key = folder / "data" / "site.key"
    key.write_bytes(data if data is not None else os.urandom(32).hex().encode() + b"\n")
    key.chmod(mode)
    return key


def run_doctor(config: Path) -> tuple[int, str]:
    """Run ``permitgate doctor -c config`` in-process: exit status and output."""
    out = io.StringIO()
    status = cli.main(["doctor", "-c", str(config)], out=out)
    return status, out.getvalue()


def check_line(output: str, subject: str) -> str:
    """The output line of the check on ``subject``."""
    lines = [ln for ln in output.splitlines() if f" {subject}: " in ln]
    assert len(lines) == 1, output
    return lines[0].strip()


def nothing_written(pty: PtyPeer) -> bool:
    """Whether nothing arrived at the device end of ``pty``."""
    return pty.unread() == b""


@pytest.fixture
def relay_pty(pty_peer: PtyPeer) -> Iterator[Callable[[], PtyPeer]]:
    """More ptys, e.g. for the relay board (pty_peer is the reader's)."""
    made: list[PtyPeer] = []

    def make() -> PtyPeer:
        peer = type(pty_peer)()
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture(autouse=True)
def comports(monkeypatch: pytest.MonkeyPatch) -> list[ListPortInfo]:
    """The ports pyserial reports: none unless a test adds some (the host's own, such as
    a built-in /dev/ttyS0, would make the output depend on the machine)."""
    ports: list[ListPortInfo] = []
    monkeypatch.setattr(list_ports, "comports", lambda: list(ports))
    return ports


@pytest.fixture(autouse=True)
def by_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty stand-in for /dev/serial/by-id, so results do not depend on the host."""
    folder = tmp_path / "by-id"
    folder.mkdir()
    monkeypatch.setattr(doctor, "BY_ID", folder)
    return folder


# --- devices -----------------------------------------------------------------------------


def test_all_checks_pass_with_devices_on_ptys(
        tmp_path: Path, pty_peer: PtyPeer, relay_pty: Callable[[], PtyPeer]) -> None:
    """Reader and relay board on ptys that open, a writable store, a private site key and
    a set clock: every check is ok and the exit status is 0."""
    relay = relay_pty()
    install_key(tmp_path)
    config = write_config(tmp_path, reader=serial_reader(pty_peer.path),
                          relay=relay_board(relay.path))
    status, output = run_doctor(config)
    assert status == 0, output
    assert check_line(output, "reader front-in") == (
        f"ok    reader front-in: {pty_peer.path} opens")
    assert check_line(output, "door front relay") == f"ok    door front relay: {relay.path} opens"
    assert check_line(output, "store").startswith("ok    store: ")
    assert check_line(output, "site key").startswith("ok    site key: ")
    assert check_line(output, "clock").startswith("ok    clock: ")
    assert output.rstrip().endswith("all checks passed")


def test_probes_write_nothing_to_the_devices(
        tmp_path: Path, pty_peer: PtyPeer, relay_pty: Callable[[], PtyPeer]) -> None:
    """The doctor opens and closes the ports without writing a byte to them, the relay
    board's included."""
    relay = relay_pty()
    install_key(tmp_path)
    config = write_config(tmp_path, reader=serial_reader(pty_peer.path),
                          relay=relay_board(relay.path))
    assert run_doctor(config)[0] == 0
    assert nothing_written(pty_peer)
    assert nothing_written(relay)


def test_missing_port_fails_with_a_fix(tmp_path: Path, relay_pty: Callable[[], PtyPeer]
                                       ) -> None:
    """A reader port that does not exist fails, with the plain-words fix: plug it in and
    use a stable by-id name; the exit status is 1."""
    install_key(tmp_path)
    config = write_config(tmp_path, reader=serial_reader("/dev/ttyUSB9"),
                          relay=relay_board(relay_pty().path))
    status, output = run_doctor(config)
    assert status == 1
    line = check_line(output, "reader front-in")
    assert line.startswith("FAIL  reader front-in: /dev/ttyUSB9 does not exist — is the "
                           "reader plugged in and powered? Use a /dev/serial/by-id/... name")
    assert "no serial device is connected at all" in line
    assert output.rstrip().endswith("1 problem(s), 0 warning(s)")


def test_missing_port_fix_lists_the_connected_devices(
        tmp_path: Path, by_id: Path, pty_peer: PtyPeer) -> None:
    """When the configured port is missing, the fix names the by-id links present, and
    the port list shows each device with its by-id name."""
    link = by_id / "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"
    link.symlink_to(pty_peer.path)
    install_key(tmp_path)
    config = write_config(tmp_path, reader=serial_reader("/dev/ttyUSB0"))
    status, output = run_doctor(config)
    assert status == 1
    assert f"connected now: {link}" in check_line(output, "reader front-in")
    assert f"  {pty_peer.path}\n      {link}\n" in output


def test_port_list_shows_pyserial_ports_with_descriptions(
        tmp_path: Path, comports: list[ListPortInfo], pty_peer: PtyPeer) -> None:
    """Ports pyserial finds are listed with their description, before the checks."""
    port = ListPortInfo(pty_peer.path)
    port.description = "CP2102 USB to UART Bridge Controller"
    comports.append(port)
    install_key(tmp_path)
    config = write_config(tmp_path)
    _, output = run_doctor(config)
    assert output.split("\n\n")[1] == (
        f"serial ports\n  {pty_peer.path}  CP2102 USB to UART Bridge Controller")


def test_dangling_by_id_link_says_the_device_is_not_connected(
        tmp_path: Path, by_id: Path) -> None:
    """A by-id name whose device is unplugged (udev removed or left a dangling link)
    fails with "no reader with this id is connected"."""
    gone = by_id / "usb-1a86_USB_Serial-if00-port0"
    gone.symlink_to("/dev/ttyUSB7")
    install_key(tmp_path)
    config = write_config(tmp_path, reader=serial_reader(str(gone)))
    status, output = run_doctor(config)
    assert status == 1
    assert (f"{gone} does not exist — no reader with this id is connected"
            in check_line(output, "reader front-in"))


def test_unstable_name_opens_with_a_tip(tmp_path: Path, by_id: Path, pty_peer: PtyPeer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A port under a kernel-numbered name (ttyUSB*, here the pty's folder stands in)
    opens with a warning that names its stable by-id link; warnings do not fail."""
    monkeypatch.setattr(doctor, "UNSTABLE_PREFIXES", ("/dev/pts/",))
    link = by_id / "usb-Prolific_PL2303-if00-port0"
    link.symlink_to(pty_peer.path)
    install_key(tmp_path)
    config = write_config(tmp_path, reader=serial_reader(pty_peer.path))
    status, output = run_doctor(config)
    assert status == 0
    assert check_line(output, "reader front-in") == (
        f"warn  reader front-in: {pty_peer.path} opens — {pty_peer.path} may name another "
        f"device after a reboot; use {link}")


def test_port_held_by_the_agent_is_a_warning(tmp_path: Path, pty_peer: PtyPeer) -> None:
    """A port another process holds exclusively (here a running serial reader) is a
    warning that says how to find the holder, not a failure."""
    holder = SerialReader("agent", {"port": pty_peer.path})
    holder.open()
    try:
        install_key(tmp_path)
        config = write_config(tmp_path, reader=serial_reader(pty_peer.path))
        status, output = run_doctor(config)
    finally:
        holder.close()
    assert status == 0
    assert check_line(output, "reader front-in").startswith(
        f"warn  reader front-in: {pty_peer.path} is in use by another process — if the "
        f"agent is running that is expected; otherwise find the holder with 'fuser -v")


def test_missing_gpio_chip_fails_with_a_fix(tmp_path: Path) -> None:
    """A Wiegand reader and a GPIO relay on chips that do not exist (none do on this
    kernel) fail, pointing at gpiodetect; a non-chip device path fails as such."""
    install_key(tmp_path)
    config = write_config(
        tmp_path, relay={"driver": "gpio", "options": {"chip": "/dev/null", "line": 4}},
        reader=ReaderSpec(driver="wiegand", debounce_s=None,
                          options={"chip": "/dev/gpiochip9", "d0": 17, "d1": 18}))
    status, output = run_doctor(config)
    assert status == 1
    assert check_line(output, "reader front-in").startswith(
        "FAIL  reader front-in: /dev/gpiochip9 does not exist — this machine shows no such "
        "GPIO chip: 'gpiodetect' lists the chips")
    assert check_line(output, "door front relay").startswith(
        "FAIL  door front relay: /dev/null is not a GPIO chip")


def test_simulated_devices_are_not_probed(tmp_path: Path) -> None:
    """Simulated devices have nothing to check and say so, without failing."""
    install_key(tmp_path)
    config = write_config(tmp_path)
    status, output = run_doctor(config)
    assert status == 0
    assert check_line(output, "reader front-in") == (
        "--    reader front-in: simulated, no device to check")


# --- files -------------------------------------------------------------------------------


def test_missing_site_key_fails_with_a_fix(tmp_path: Path) -> None:
    """Without the site key the doctor fails and says where to put it and how to make a
    test key."""
    config = write_config(tmp_path)
    status, output = run_doctor(config)
    key = tmp_path / "data" / "site.key"
    assert status == 1
    assert check_line(output, "site key") == (
        f"FAIL  site key: {key} does not exist — install the site key from the central "
        f"office there (mode 0600), or for a test site run 'permitgate keygen {key}'")
    assert not key.exists()


def test_malformed_site_key_fails(tmp_path: Path) -> None:
    """A site key of the wrong size fails with the key loader's reason."""
    install_key(tmp_path, data=b"too short")
    config = write_config(tmp_path)
    status, output = run_doctor(config)
    assert status == 1
    assert "a site key is 32 bytes or 64 hex characters" in check_line(output, "site key")


def test_world_readable_site_key_fails(tmp_path: Path) -> None:
    """A site key other users can read fails, as the agent refuses to start with it, and
    the line gives the chmod that fixes it."""
    key = install_key(tmp_path, mode=0o644)
    config = write_config(tmp_path)
    status, output = run_doctor(config)
    assert status == 1
    line = check_line(output, "site key")
    assert line.startswith(f"FAIL  site key: {key}: the site key can be read by its group "
                           "and other users (mode 0644)")
    assert line.endswith(f"— chmod 600 {key}")


def test_store_folder_that_is_a_file_fails(tmp_path: Path) -> None:
    """A store folder that cannot hold files (here a plain file in its place) fails with a
    fix; the doctor creates nothing."""
    (tmp_path / "data").write_text("not a folder")
    config = write_config(tmp_path)
    status, output = run_doctor(config)
    assert status == 1
    assert check_line(output, "store").startswith(
        f"FAIL  store: {tmp_path / 'data'} is not writable")


def test_store_folder_not_yet_made_is_fine(tmp_path: Path) -> None:
    """A store folder that does not exist yet, under a writable parent, is ok: the agent
    makes it at the first start; the doctor does not."""
    config = write_config(tmp_path)
    _, output = run_doctor(config)
    assert check_line(output, "store") == (
        f"ok    store: {tmp_path / 'data'} will be created at the first start")
    assert not (tmp_path / "data").exists()


SYNC = {"enabled": True, "trusted_keys": "./office/trusted-keys.txt",
        "ca_file": "./office/ca.crt", "cert_file": "./office/gateway.crt",
        "key_file": "./office/gateway.key"}


def test_sync_files_missing_fail_one_by_one(tmp_path: Path) -> None:
    """With sync on, a missing trusted-keys file and missing TLS files each fail with
    their own line."""
    install_key(tmp_path)
    config = write_config(tmp_path, sync=SYNC)
    status, output = run_doctor(config)
    assert status == 1
    for subject in ("sync trusted keys", "sync ca_file", "sync cert_file", "sync key_file"):
        assert check_line(output, subject).startswith(f"FAIL  {subject}: ")
    assert "install the file issued for this gateway" in check_line(output, "sync ca_file")


def test_sync_files_present_pass(tmp_path: Path) -> None:
    """With sync on and every file in place, the sync checks pass and count the keys, and
    the certificate's expiry is far."""
    install_key(tmp_path)
    office = tmp_path / "office"
    office.mkdir()
    public = Ed25519PrivateKey.generate().public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    (office / "trusted-keys.txt").write_text(f"k1 {base64.b64encode(public).decode()}\n")
    for name in ("ca.crt", "gateway.key"):
        (office / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    _, cert = pki.make_client_cert(pki.make_ca("test CA"), "gw-0001")
    (office / "gateway.crt").write_bytes(cert.public_bytes(Encoding.PEM))
    config = write_config(tmp_path, sync=SYNC)
    status, output = run_doctor(config)
    assert status == 0, output
    assert check_line(output, "sync trusted keys").endswith("trusted-keys.txt: 1 key(s)")
    assert check_line(output, "sync key_file").startswith("ok    sync key_file: ")
    assert check_line(output, "sync certificate").startswith("ok    sync certificate: ")


def test_sync_off_is_not_checked(tmp_path: Path) -> None:
    """With sync off no sync file is looked for."""
    install_key(tmp_path)
    config = write_config(tmp_path)
    _, output = run_doctor(config)
    assert check_line(output, "sync").startswith("--    sync: disabled")


# --- clock ---------------------------------------------------------------------------------


def test_clock_before_the_floor_fails(tmp_path: Path) -> None:
    """A clock before the configured floor date (no RTC, no NTP yet) fails with the fix."""
    install_key(tmp_path)
    config = write_config(tmp_path, clock_floor=date(2999, 1, 1))
    status, output = run_doctor(config)
    assert status == 1
    line = check_line(output, "clock")
    assert line.startswith("FAIL  clock: ")
    assert "is before the floor 2999-01-01 (clock not set) — enable time sync" in line


@pytest.mark.parametrize(("offset_days", "words"), [
    (1, "is behind the trusted time"), (-60, "is far ahead of the trusted time")])
def test_clock_judged_against_the_trusted_floor(tmp_path: Path, offset_days: int,
                                                words: str) -> None:
    """A clock behind the trusted floor the agent stored (the clock went back), or far
    ahead of it, fails, as the agent itself would judge it at start."""
    install_key(tmp_path)
    store = Store(tmp_path / "data" / "permitgate.db")
    store.set_meta("clock_trusted_ms", str(int(time.time() * 1000) + offset_days * 86_400_000))
    store.set_meta("clock_trusted_source", "office")
    store.close()
    config = write_config(tmp_path)
    status, output = run_doctor(config)
    assert status == 1
    assert words in check_line(output, "clock") and "from office" in check_line(output, "clock")


# --- the command -------------------------------------------------------------------------


def test_exit_status_of_the_real_command(tmp_path: Path, pty_peer: PtyPeer) -> None:
    """Run as a child process, the command exits 0 with a good set-up and 1 with a missing
    port, printing the fix on stdout."""
    install_key(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    good = write_config(tmp_path, reader=serial_reader(pty_peer.path))
    run = subprocess.run([sys.executable, "-m", "agent.cli", "doctor", "-c", str(good)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    install_key(bad_dir)
    bad = write_config(bad_dir, reader=serial_reader("/dev/ttyUSB9"))
    run = subprocess.run([sys.executable, "-m", "agent.cli", "doctor", "-c", str(bad)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
                         check=False)
    assert run.returncode == 1
    assert "/dev/ttyUSB9 does not exist — is the reader plugged in" in run.stdout


def test_invalid_driver_options_are_a_usage_error(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Options the driver refuses stop the doctor before any probe, with status 2 and the
    key named, as for every command."""
    config = write_config(tmp_path, reader=ReaderSpec(
        driver="qr", debounce_s=None, options={"port": "/dev/x", "max_len": 0}))
    status, _ = run_doctor(config)
    assert status == 2
    assert "readers[0].options.max_len" in capsys.readouterr().err
