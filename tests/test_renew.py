"""Renewing a gateway's TLS certificate before it expires: ``permitgate status`` and
``doctor`` warn from 30 days before the expiry and alarm after it; ``permitgate provision
--renew`` makes a new key and a request signed with the gateway's recorded signing key;
``permitgate-central register-gateway --renew`` checks that signature and signs the new
certificate; ``--accept`` installs it, and the agent connects with it after a restart.
Refusals exit 2 and change nothing."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import shutil
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import cli
from agent import provision as prov
from agent.config import load_config
from agent.doctor import check_sync
from agent.store import Store
from protocol import bundles
from provisioning import central_cli, pki
from tests.broker import BrokerPool
from tests.gatewaysite import Site, command, found, wait_for_list
from tests.provisionkit import GW, make_office, provision_gateway, register

pytestmark = pytest.mark.timeout(300)

CARD = "em4100:67003B51C6"


def office_cli(office: Path, *argv: str) -> tuple[int, str]:
    """``permitgate-central --dir OFFICE ARGV``: its exit status and what it printed."""
    out = io.StringIO()
    return central_cli.main(["--dir", str(office), *argv], out=out), out.getvalue()


def gateway_cli(*argv: str) -> tuple[int, str]:
    """``permitgate ARGV``: its exit status and what it printed."""
    out = io.StringIO()
    return cli.main(list(argv), out=out), out.getvalue()


@pytest.fixture
def registered(tmp_path: Path) -> tuple[Path, Path]:
    """An office and a gateway provisioned, registered and accepted (in process)."""
    office = make_office(tmp_path / "office")
    gw = tmp_path / "gw"
    done = provision_gateway(gw)
    status, out = register(office, done.bundle, done.request.fingerprint)
    assert status == 0, out
    prov.accept(gw, gw / f"{GW}.response.json")
    return office, gw


def renew(gw: Path) -> Path:
    """``permitgate provision --renew``; the renewal request it wrote."""
    status, out = gateway_cli("provision", "--dir", str(gw), "--renew")
    assert status == 0, out
    return gw / "gateway-renewal.json"


def serial(cert_pem: bytes) -> int:
    """A PEM certificate's serial number."""
    return x509.load_pem_x509_certificate(cert_pem).serial_number


# -- renewal, office and gateway ------------------------------------------------------------


def test_renewal_keeps_the_old_certificate_until_the_answer_is_installed(
        registered: tuple[Path, Path]) -> None:
    """A renewal keeps the old key and certificate in use, the office signs the new key's
    certificate without a fingerprint and records the replaced one, and --accept installs
    the new certificate with the new key."""
    office, gw = registered
    creds = prov.credentials(gw)
    old_cert, old_key = (creds / "gateway.crt").read_bytes(), (creds / "gateway.key").read_bytes()
    request = renew(gw)
    assert (creds / "gateway-renewal.key").stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE" not in request.read_bytes()

    status, out = office_cli(office, "register-gateway", "--renew", str(request))
    assert status == 0, out
    answer = gw / f"{GW}.renewed.json"
    assert f"replaces serial {serial(old_cert):x}" in out
    assert (creds / "gateway.crt").read_bytes() == old_cert
    assert (creds / "gateway.key").read_bytes() == old_key
    record = json.loads((office / "gateways" / f"{GW}.json").read_text())
    assert record["previous_certificates"][-1]["serial"] == format(serial(old_cert), "x")

    status, out = gateway_cli("provision", "--dir", str(gw), "--accept", str(answer))
    assert status == 0, out
    new_cert = (creds / "gateway.crt").read_bytes()
    assert serial(new_cert) == int(record["certificate_serial"], 16) != serial(old_cert)
    assert (creds / "gateway.key").read_bytes() != old_key
    assert not (creds / "gateway-renewal.key").exists()
    assert "restart" in out


def test_a_renewal_not_signed_by_the_recorded_key_is_refused(
        registered: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A renewal signed by any key but the one recorded at registration exits 2, and the
    office writes no answer and keeps its record."""
    office, gw = registered
    request = renew(gw)
    data = json.loads(request.read_text())
    payload = bundles.renewal_payload(data["gateway_id"], data["site_id"], data["csr"],
                                      data["made"], data["fingerprint"])
    data["signature"] = base64.b64encode(Ed25519PrivateKey.generate().sign(payload)).decode()
    request.write_text(json.dumps(data))
    record = (office / "gateways" / f"{GW}.json").read_bytes()
    capsys.readouterr()

    status, _ = office_cli(office, "register-gateway", "--renew", str(request))
    assert status == 2
    assert "not signed by the signing key recorded for gw-0001" in capsys.readouterr().err
    assert not (gw / f"{GW}.renewed.json").exists()
    assert (office / "gateways" / f"{GW}.json").read_bytes() == record


def test_a_renewal_for_a_gateway_the_office_does_not_know_is_refused(
        registered: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A renewal taken to an office that never registered the gateway exits 2, naming the
    missing record."""
    _, gw = registered
    other = make_office(tmp_path / "other-office")
    request = renew(gw)
    capsys.readouterr()
    status, _ = office_cli(other, "register-gateway", "--renew", str(request))
    assert status == 2
    assert "gateway 'gw-0001' is unknown here" in capsys.readouterr().err
    assert not (gw / f"{GW}.renewed.json").exists()


def test_a_renewal_of_a_removed_gateway_is_refused(
        registered: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Once a gateway is removed its renewals exit 2: a removed id gets no certificate."""
    office, gw = registered
    request = renew(gw)
    status, out = office_cli(office, "remove-gateway", GW, "--reason", "stolen")
    assert status == 0, out
    capsys.readouterr()
    status, _ = office_cli(office, "register-gateway", "--renew", str(request))
    assert status == 2
    assert "gateway 'gw-0001' was removed" in capsys.readouterr().err
    assert not (gw / f"{GW}.renewed.json").exists()


def test_a_renewal_takes_no_fingerprint_or_site_key(
        registered: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """--renew with --fingerprint, --site-key or --acl-file exits 2 (the gateway's keys,
    site key and ACL entry stay as registered); a registration without --fingerprint exits
    2 too."""
    office, gw = registered
    request = renew(gw)
    capsys.readouterr()
    assert office_cli(office, "register-gateway", "--renew", str(request), "--fingerprint",
                      "AAAAA-AAAAA-AAAAA-AAAAA-AAAAA")[0] == 2
    assert "--renew takes none of --fingerprint" in capsys.readouterr().err
    assert office_cli(office, "register-gateway", str(request))[0] == 2
    assert "--fingerprint: give the fingerprint" in capsys.readouterr().err


def test_the_answer_to_an_earlier_renewal_is_refused_and_installs_nothing(
        registered: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """After a second --renew, the office's answer to the first exits 2 and the current
    certificate, key and waiting key stay as they were."""
    office, gw = registered
    first = renew(gw)
    assert office_cli(office, "register-gateway", "--renew", str(first))[0] == 0
    renew(gw)
    creds = prov.credentials(gw)
    before = {name: (creds / name).read_bytes()
              for name in ("gateway.crt", "gateway.key", "gateway-renewal.key")}
    capsys.readouterr()
    status, _ = gateway_cli("provision", "--dir", str(gw), "--accept",
                            str(gw / f"{GW}.renewed.json"))
    assert status == 2
    assert "renewed again since?" in capsys.readouterr().err
    assert {name: (creds / name).read_bytes() for name in before} == before


# -- the expiry warning ------------------------------------------------------------------


def install_certificate(office: Path, gw: Path, *, expires_in: dt.timedelta) -> str:
    """Replace the gateway's certificate by one for the same key, signed by the site CA,
    that expires ``expires_in`` from now; its expiry date as status prints it."""
    ca_key, ca_cert = pki.load_pem(office / "pki", "ca")
    current = x509.load_pem_x509_certificate((prov.credentials(gw) / "gateway.crt").read_bytes())
    now = dt.datetime.now(dt.UTC)
    not_after = now + expires_in
    cert = (x509.CertificateBuilder().subject_name(current.subject)
            .issuer_name(ca_cert.subject).public_key(current.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(min(now, not_after) - dt.timedelta(days=400))
            .not_valid_after(not_after).sign(ca_key, hashes.SHA256()))
    (prov.credentials(gw) / "gateway.crt").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM))
    return f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


EXPIRIES = {
    "far": (dt.timedelta(days=400), "", "ok", "ok"),
    "within-30-days": (dt.timedelta(days=29, hours=12), "WARNING ", "expiring", "warn"),
    "expired": (dt.timedelta(days=-2), "ALARM ", "expired", "fail"),
}
"""Expiry from now → status label, ``status --json`` state, doctor status."""


@pytest.mark.parametrize("case", sorted(EXPIRIES))
def test_status_and_doctor_judge_the_certificate_expiry(
        registered: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """status names the certificate file and its expiry date, with a warning within 30 days
    of it and an alarm once passed (status --json carries the state), and doctor warns or
    fails the same way, pointing at --renew."""
    expires_in, label, state, doctor = EXPIRIES[case]
    office, gw = registered
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(prov.credentials(gw)))
    date = install_certificate(office, gw, expires_in=expires_in)
    config_path = gw / "permitgate.toml"
    config = load_config(config_path)
    db = gw / "data" / "permitgate.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    Store(db).close()
    cert_path = prov.credentials(gw) / "gateway.crt"

    status, out = gateway_cli("status", "-c", str(config_path))
    assert status == 0, out
    line = next(line for line in out.splitlines() if line.startswith("tls cert   "))
    assert line.startswith(f"tls cert   {label}{cert_path}")
    assert date in line
    assert ("provision --renew" in line) == (state != "ok")
    status, out = gateway_cli("status", "-c", str(config_path), "--json")
    assert json.loads(out)["certificate"]["state"] == state

    check = next(c for c in check_sync(config, config_path) if c.subject == "sync certificate")
    assert check.status == doctor
    assert date in check.detail
    assert ("provision --renew" in check.fix) == (doctor != "ok")


# -- end to end ------------------------------------------------------------------------------


def test_the_agent_connects_over_tls_with_its_renewed_certificate_after_a_restart(
        tmp_path: Path, brokers: BrokerPool) -> None:
    """A connected gateway renews (provision --renew → register-gateway --renew →
    --accept, the old certificate in use until then); restarted, the agent connects with
    the renewed certificate to a broker whose CRL now lists the old one (so only the new
    one gets in), applies a new list and grants a tap."""
    site = Site(tmp_path, brokers)
    site.broker.start()
    with site.office() as central:
        with site.agent("agent-1.log"):
            wait_for_list(site, 1, "the first list", "agent-1.log")
            old_cert, old_key = site.credential("gateway.crt"), site.credential("gateway.key")

            out = command("agent.cli", "provision", "--dir", str(site.gw), "--renew").stdout
            request = Path(found(r"^  request      (\S+):", out))
            command("provisioning.central_cli", "--dir", str(site.office_dir),
                    "register-gateway", "--renew", str(request))
            assert site.credential("gateway.crt") == old_cert
            command("agent.cli", "provision", "--dir", str(site.gw), "--accept",
                    str(site.gw / f"{GW}.renewed.json"))
        assert site.credential("gateway.crt") != old_cert
        assert site.credential("gateway.key") != old_key

        # Only the renewed certificate may get in from now on.
        pki.revoke(site.pki, [serial(old_cert)])
        shutil.copy(site.pki / "crl.pem", site.crl)
        site.broker.restart()
        site.handshake()
        old = tmp_path / "old"
        old.mkdir()
        (old / "gateway.crt").write_bytes(old_cert)
        (old / "gateway.key").write_bytes(old_key)
        with pytest.raises(ssl.SSLError, match="revoked"):
            site.handshake(old)

        with site.agent("agent-2.log"):
            central.enroll(GW, CARD, "P301")
            version = central.publish_snapshot(GW)
            wait_for_list(site, version, "the list published after the renewal", "agent-2.log")
            assert site.tap(CARD) == "OPEN   granted"
    record = json.loads((site.office_dir / "gateways" / f"{GW}.json").read_text())
    assert serial(site.credential("gateway.crt")) == int(record["certificate_serial"], 16)
