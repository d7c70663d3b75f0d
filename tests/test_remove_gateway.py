"""Removing a lost gateway (``permitgate-central remove-gateway``, provisioning/remove.py):
the office records it removed and refuses its messages, the site CA's CRL lists every
certificate it was issued, its broker ACL entry is deleted; and, end to end, a connected
gateway's events are refused by the office at once and, once the broker was restarted
with the CRL, its TLS handshake too."""

from __future__ import annotations

import io
import json
import re
import shutil
import ssl
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent import provision as prov
from agent.renew import renew
from agent.store import Store
from protocol.messages import Status
from provisioning import central_cli, pki
from provisioning.central import Central
from provisioning.central_cli import local_time
from tests.broker import BrokerPool
from tests.gatewaysite import Site, command, stop_process, wait_for_list
from tests.provisionkit import GW, SITE, make_office, provision_gateway, register
from tests.waiting import wait_for

if TYPE_CHECKING:
    from tests.pg import OfficeDb

pytest_plugins = ("tests.pg",)  # office_db: show is tested on SQLite and on PostgreSQL

pytestmark = pytest.mark.timeout(300)

CARD = "em4100:67003B51C6"


def office_cli(office: Path, *argv: str) -> tuple[int, str]:
    """``permitgate-central --dir OFFICE ARGV``: its exit status and what it printed."""
    out = io.StringIO()
    return central_cli.main(["--dir", str(office), *argv], out=out), out.getvalue()


@pytest.fixture
def registered(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An office, a gateway registered with ``--acl-file`` and accepted, and that ACL
    file (the shipped one with the gateway's entry appended)."""
    office = make_office(tmp_path / "office")
    acl = tmp_path / "acl"
    shutil.copy(Path(__file__).resolve().parent.parent / "config" / "mosquitto" / "acl", acl)
    gw = tmp_path / "gw"
    done = provision_gateway(gw)
    status, out = register(office, done.bundle, done.request.fingerprint, "--acl-file",
                           str(acl))
    assert status == 0, out
    prov.accept(gw, gw / f"{GW}.response.json")
    return office, gw, acl


def test_remove_gateway_revokes_every_certificate_and_drops_the_acl_entry(
        registered: tuple[Path, Path, Path]) -> None:
    """remove-gateway puts the gateway's current certificate and the one a renewal
    replaced in the CA-signed crl.pem, deletes its ACL entry (its own file and its block
    in --acl-file, the rest of the file kept), marks its record and the office's database,
    and tells the operator to restart the broker."""
    office, gw, acl = registered
    original = json.loads((office / "gateways" / f"{GW}.json").read_text())
    assert office_cli(office, "register-gateway", "--renew", str(renew(gw).bundle))[0] == 0
    renewed = json.loads((office / "gateways" / f"{GW}.json").read_text())
    shipped = (Path(__file__).resolve().parent.parent / "config" / "mosquitto" / "acl"
               ).read_text()
    assert f"user {GW}\n" in acl.read_text()

    status, out = office_cli(office, "remove-gateway", GW, "--reason", "stolen from the "
                             "basement", "--acl-file", str(acl))
    assert status == 0, out
    revoked = pki.revoked_serials(office / "pki")
    assert revoked == {int(original["certificate_serial"], 16),
                       int(renewed["certificate_serial"], 16)}
    assert acl.read_text() == shipped
    assert not (office / "broker-acl" / f"{GW}.acl").exists()
    record = json.loads((office / "gateways" / f"{GW}.json").read_text())
    assert record["removed"]["reason"] == "stolen from the basement"
    with Central(office) as central:
        removed = central.removed(GW)
        assert removed is not None
        assert removed["reason"] == "stolen from the basement"
        assert GW in central.gateways()  # its events stay
    assert "restart the broker" in out


def test_remove_gateway_refuses_an_unknown_or_removed_gateway_and_an_empty_reason(
        registered: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown gateway, a second removal and a blank --reason exit 2 and leave the CRL
    as it was."""
    office, _, _ = registered
    crl = (office / "pki" / "crl.pem").read_bytes()
    assert office_cli(office, "remove-gateway", "gw-9999", "--reason", "lost")[0] == 2
    assert "gateway 'gw-9999' is unknown here" in capsys.readouterr().err
    assert office_cli(office, "remove-gateway", GW, "--reason", "  ")[0] == 2
    assert "--reason: say why" in capsys.readouterr().err
    assert (office / "pki" / "crl.pem").read_bytes() == crl

    assert office_cli(office, "remove-gateway", GW, "--reason", "lost")[0] == 0
    crl = (office / "pki" / "crl.pem").read_bytes()
    capsys.readouterr()
    assert office_cli(office, "remove-gateway", GW, "--reason", "lost again")[0] == 2
    assert "was removed already" in capsys.readouterr().err
    assert (office / "pki" / "crl.pem").read_bytes() == crl


def test_a_removed_gateway_id_is_not_registered_again(
        registered: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A new request under a removed gateway's id exits 2: the replacement takes a new
    id."""
    office, _, _ = registered
    assert office_cli(office, "remove-gateway", GW, "--reason", "lost")[0] == 0
    again = provision_gateway(tmp_path / "replacement")
    capsys.readouterr()
    status, _ = register(office, again.bundle, again.request.fingerprint)
    assert status == 2
    assert "is registered already" in capsys.readouterr().err


OTHER = "gw-0002"
"""A gateway that stays, beside the one removed."""


def _show(office: Path) -> tuple[dict[str, Any], list[str]]:
    """``show --json`` and ``show``'s lines."""
    status, out = office_cli(office, "show", "--json")
    assert status == 0, out
    report = json.loads(out)
    status, out = office_cli(office, "show")
    assert status == 0, out
    return report, out.splitlines()


def test_show_marks_a_removed_gateway_and_expects_no_report_from_it(
        tmp_path: Path, office_db: OfficeDb) -> None:
    """show, text and --json, on SQLite and PostgreSQL, gives a removed gateway the state
    "removed" with the date and reason instead of the online its last status said, and
    leaves it out of the version groups of the gateways expected to report, listing it as
    removed; the gateway beside it stays online in its version group."""
    office = make_office(tmp_path / "office")
    office_db.use(office)
    done = provision_gateway(tmp_path / "gw")
    assert register(office, done.bundle, done.request.fingerprint)[0] == 0
    with Central(office) as central:
        central.add_gateway(OTHER, SITE, bytes(range(32)))
    db = office_db.open(office)
    try:
        for gateway in (GW, OTHER):
            db.record_status(gateway, Status(type="status", gateway=gateway, state="online",
                                             version="1.2.3").model_dump_json(), None,
                             int(time.time() * 1000))
    finally:
        db.close()

    report, _ = _show(office)
    assert [(gw["gateway"], gw["state"], gw["online"], gw["removed"])
            for gw in report["gateways"]] == [(GW, "online", True, None),
                                              (OTHER, "online", True, None)]
    assert report["removed"] == []

    assert office_cli(office, "remove-gateway", GW, "--reason", "stolen from the "
                      "basement")[0] == 0
    report, lines = _show(office)
    gateways = {gw["gateway"]: gw for gw in report["gateways"]}
    removed = gateways[GW]
    assert (removed["state"], removed["online"]) == ("removed", None)
    assert removed["removed"]["reason"] == "stolen from the basement"
    assert removed["status"]["state"] == "online"  # its last status is kept, not believed
    assert (gateways[OTHER]["state"], gateways[OTHER]["online"]) == ("online", True)
    assert report["by_version"] == [{"version": "1.2.3", "gateways": [OTHER]}]
    assert report["removed"] == [GW]

    when = local_time(int(datetime.fromisoformat(removed["removed"]["at"]).timestamp()
                          * 1000))
    header = next(line for line in lines if line.startswith(f"{GW}  site "))
    assert header.startswith(f"{GW}  site {SITE}  removed {when} (stolen from the "
                             "basement), last status ")
    assert "online" not in header
    assert next(line for line in lines if line.startswith(f"{OTHER}  site ")).startswith(
        f"{OTHER}  site {SITE}  online (status ")
    assert "version 1.2.3: gw-0002" in lines
    assert f"removed (messages refused): {GW}" in lines


def _deliveries(log: str, offset: int, kind: str = r"\w+") -> int:
    """How many messages of the gateway the broker delivered to the office after
    ``offset`` in its log."""
    pattern = rf"Sending PUBLISH to central \(.*'pg/v1/gw/{GW}/out/{kind}'"
    return len(re.findall(pattern, log[offset:]))


def test_a_removed_gateway_is_refused_by_the_office_then_by_the_broker(
        tmp_path: Path, brokers: BrokerPool) -> None:
    """A connected gateway's events are stored until remove-gateway; from then on the
    office refuses them (not stored, counted with unknown gateways' messages), and once
    the broker is restarted with the new crl.pem the same agent's TLS handshake is
    refused."""
    site = Site(tmp_path, brokers)
    site.broker.start()
    with site.office() as central:
        with site.agent("agent-1.log"):
            wait_for_list(site, 1, "the first list", "agent-1.log")
            assert site.tap(CARD) == "DENIED unknown_card"
            wait_for(lambda: _acked(site), "the denial to be stored by the office")
            stored = [e["seq"] for e in central.events(GW)]
            unknown = central.report()["unknown_gateway_messages"]
            refused = central.malformed

            out = command("provisioning.central_cli", "--dir", str(site.office_dir),
                          "remove-gateway", GW, "--reason", "stolen", "--acl-file",
                          str(site.acl)).stdout
            assert "restart the broker" in out
            offset = len(site.broker.log())
            assert site.tap(CARD) == "DENIED unknown_card"  # the gateway still decides

            # Every message the broker hands the office from now on is refused, in order.
            wait_for(lambda: _deliveries(site.broker.log(), offset, "events") >= 1
                     and central.malformed - refused >= _deliveries(site.broker.log(), offset),
                     lambda: f"the office to refuse the gateway's events; broker log:\n"
                             f"{site.broker.log()[offset:][-3000:]}")
            assert [e["seq"] for e in central.events(GW)] == stored
            assert central.report()["unknown_gateway_messages"] > unknown
            assert not _acked(site)

        shutil.copy(site.pki / "crl.pem", site.crl)
        site.write_broker_acl()
        site.broker.restart()
        offset = len(site.broker.log())
        with site.agent("agent-2.log") as agent:
            # Mosquitto 2.0 logs a refused client certificate as "certificate verify
            # failed"; the office, on its own certificate, is connected meanwhile.
            wait_for(lambda: "certificate verify failed" in site.broker.log()[offset:],
                     lambda: f"the broker to refuse the agent's certificate; broker log:\n"
                             f"{site.broker.log()[offset:][-3000:]}", 120)
            assert agent.poll() is None  # it keeps deciding locally, and keeps trying
            with pytest.raises(ssl.SSLError, match="revoked"):
                site.handshake()
            assert stop_process(agent) == 0
    assert f"user {GW}" not in site.broker_acl.read_text()


def _acked(site: Site) -> bool:
    store = Store(site.db)
    try:
        return store.first_unacked() is None
    finally:
        store.close()
