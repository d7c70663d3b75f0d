"""``permitgate-central register-gateway`` (provisioning/register.py): a provisioned
gateway's request checked against its fingerprint, its certificate signed by the site CA,
the gateway recorded with its public keys and site key, the site key sealed to it, its
broker ACL entry; and every refusal, each with exit 2 and nothing written."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import provision as prov
from protocol import bundles
from protocol.hashing import read_key
from provisioning import pki
from provisioning.central import Central
from provisioning.register import acl_entry
from tests.provisionkit import (
    GW,
    SITE,
    edit_json,
    hand_made_request,
    make_office,
    provision_gateway,
    register,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_ACL = REPO / "config" / "mosquitto" / "acl"


@pytest.fixture
def office(tmp_path: Path) -> Path:
    """An office folder with its keys and site PKI."""
    return make_office(tmp_path / "office")


@pytest.fixture
def gateway(tmp_path: Path) -> prov.Provisioned:
    """A gateway provisioned as gw-0001 of bldg-0001."""
    return provision_gateway(tmp_path / "gw")


def gateways(office: Path) -> list[str]:
    """The gateways the office's database holds."""
    with Central(office) as central:
        return central.gateways()


def assert_nothing_written(office: Path, gateway: str, response: Path) -> None:
    """The office holds nothing of ``gateway`` and no response was written."""
    assert gateway not in gateways(office)
    assert not (office / "gateways" / f"{gateway}.json").exists()
    assert not (office / "broker-acl" / f"{gateway}.acl").exists()
    assert not (office / "site-keys" / f"{gateway}.key").exists()
    assert not response.exists()


def test_register_signs_records_seals_and_emits_the_acl_entry(
        office: Path, gateway: prov.Provisioned, tmp_path: Path) -> None:
    """A request whose fingerprint matches is registered: a clientAuth certificate for the
    gateway's key with CN = gateway id from the site CA, the gateway in the database with a
    new site key, its public keys recorded, the site key sealed so that only the gateway's
    seal key opens it, and its ACL entry printed, written and appended to --acl-file."""
    acl = tmp_path / "acl"
    shutil.copy(SHIPPED_ACL, acl)
    status, out = register(office, gateway.bundle, gateway.request.fingerprint,
                           "--site", SITE, "--acl-file", str(acl))
    assert status == 0, out
    response = bundles.parse_response((gateway.bundle.parent / f"{GW}.response.json"
                                       ).read_bytes())
    cert = x509.load_pem_x509_certificate(response.certificate.encode())
    ca = x509.load_pem_x509_certificate((office / "pki" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert response.ca.encode() == (office / "pki" / "ca.crt").read_bytes()
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [GW]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    csr = x509.load_pem_x509_csr(gateway.request.csr.encode())
    assert cert.public_key() == csr.public_key()

    assert gateways(office) == [GW]
    record = json.loads((office / "gateways" / f"{GW}.json").read_text())
    assert (record["signing_key"], record["seal_key"]) == (gateway.request.signing_key,
                                                           gateway.request.seal_key)
    assert record["certificate_serial"] == format(cert.serial_number, "x")
    _, _, seal = prov.own_keys(tmp_path / "gw")
    site_key = bundles.unseal_site_key(seal, response.sealed_site_key, gateway_id=GW,
                                       request=gateway.request.fingerprint)
    assert site_key == read_key(office / "site-keys" / f"{GW}.key")
    assert response.trusted_keys == (office / "trusted-keys.txt").read_text()

    entry = acl_entry(GW, SITE)
    assert entry in out
    assert "user gw-0001\ntopic read pg/v1/gw/gw-0001/in/#\n" in entry
    assert (office / "broker-acl" / f"{GW}.acl").read_text() == entry
    assert acl.read_text() == SHIPPED_ACL.read_text() + "\n" + entry
    assert f"office fingerprint  {response.office_fingerprint}" in out


def test_the_fingerprint_is_taken_as_read_aloud_or_as_scanned() -> None:
    """Lower case, spaces, O for 0 and I or L for 1 are read as the fingerprint; the QR
    code's text also names the gateway; anything else is refused."""
    fingerprint = "0A1B2-C3D4E-F5G6H-J7K8M-N9PQR"
    assert bundles.read_fingerprint("oa1b2 c3d4e f5g6h j7k8m n9pqr") == (None, fingerprint)
    assert bundles.read_fingerprint("0AIB2C3D4EF5G6HJ7K8MN9PQR") == (None, fingerprint)
    assert bundles.read_fingerprint(f"permitgate:{GW}:{fingerprint}") == (GW, fingerprint)
    for bad in ("0A1B2-C3D4E", "0A1B2-C3D4E-F5G6H-J7K8M-N9PQU", ""):
        with pytest.raises(bundles.BundleError):
            bundles.read_fingerprint(bad)


def test_a_scanned_qr_text_registers(office: Path, gateway: prov.Provisioned) -> None:
    """The QR code's text, as a scanner types it, is a valid --fingerprint."""
    scanned = bundles.qr_text(GW, gateway.request.fingerprint)
    status, out = register(office, gateway.bundle, scanned)
    assert status == 0, out


def test_an_existing_site_key_can_be_issued(office: Path, gateway: prov.Provisioned,
                                            tmp_path: Path) -> None:
    """--site-key issues the building's existing key instead of a new one."""
    key_file = tmp_path / "bldg.key"
    key_file.write_text(bytes(range(32)).hex())
    status, out = register(office, gateway.bundle, gateway.request.fingerprint,
                           "--site-key", str(key_file))
    assert status == 0, out
    response = bundles.parse_response((gateway.bundle.parent / f"{GW}.response.json"
                                       ).read_bytes())
    _, _, seal = prov.own_keys(tmp_path / "gw")
    assert bundles.unseal_site_key(seal, response.sealed_site_key, gateway_id=GW,
                                   request=gateway.request.fingerprint) == bytes(range(32))


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.write_text("not json"), "not JSON"),
    (lambda p: edit_json(p, format="permitgate-gateway-request/2"), "format"),
    (lambda p: edit_json(p, format=bundles.RESPONSE_FORMAT), "format"),
    (lambda p: edit_json(p, private_key="x"), "private_key"),
    (lambda p: edit_json(p, seal_key="AAAA"), "seal_key"),
    (lambda p: p.write_text("[]"), "format None"),
], ids=["not-json", "other-version", "a-response", "extra-field", "short-key", "array"])
def test_an_unknown_format_is_refused(
        office: Path, gateway: prov.Provisioned, change: object, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not a request of this format (not JSON, another format or version,
    a field too many, a malformed key) is refused with exit 2 naming it; nothing is
    written."""
    assert callable(change)
    change(gateway.bundle)
    status, _ = register(office, gateway.bundle, gateway.request.fingerprint)
    assert status == 2
    err = capsys.readouterr().err
    assert "not a gateway request" in err and message in err
    assert_nothing_written(office, GW, gateway.bundle.parent / f"{GW}.response.json")


def test_a_duplicate_gateway_id_is_refused(
        office: Path, gateway: prov.Provisioned, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A second gateway provisioned under a registered id is refused with exit 2, and so is
    an id added with add-gateway; the first registration stays as it was."""
    assert register(office, gateway.bundle, gateway.request.fingerprint)[0] == 0
    record = (office / "gateways" / f"{GW}.json").read_bytes()
    second = provision_gateway(tmp_path / "gw2")
    capsys.readouterr()
    status, _ = register(office, second.bundle, second.request.fingerprint)
    assert status == 2
    assert "registered already" in capsys.readouterr().err
    assert (office / "gateways" / f"{GW}.json").read_bytes() == record
    assert not (tmp_path / "gw2" / f"{GW}.response.json").exists()

    with Central(office) as central:
        central.add_gateway("gw-0002", SITE, bytes(32))
    third = provision_gateway(tmp_path / "gw3", "gw-0002")
    status, _ = register(office, third.bundle, third.request.fingerprint)
    assert status == 2
    assert "registered already" in capsys.readouterr().err
    assert not (office / "gateways" / "gw-0002.json").exists()


def _swap_signing_key(path: Path) -> None:
    other = provision_gateway(path.parent.parent / "other")
    edit_json(path, signing_key=other.request.signing_key)


@pytest.mark.parametrize(("case", "message"), [
    ("another-gateways-fingerprint", "do not have the fingerprint"),
    ("edited-bundle", "the file was changed"),
    ("qr-of-another-gateway", "names gateway gw-0009"),
    ("not-a-fingerprint", "--fingerprint"),
])
def test_a_fingerprint_that_does_not_match_is_refused(  # noqa: PLR0917 - fixtures and parameters
        office: Path, gateway: prov.Provisioned, tmp_path: Path, case: str, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The fingerprint of another request, a request whose keys were changed after it was
    made, a QR text naming another gateway or a malformed fingerprint is refused with exit
    2; the mismatch message does not show the request's own fingerprint."""
    fingerprint = gateway.request.fingerprint
    if case == "another-gateways-fingerprint":
        fingerprint = provision_gateway(tmp_path / "other").request.fingerprint
    elif case == "edited-bundle":
        _swap_signing_key(gateway.bundle)
    elif case == "qr-of-another-gateway":
        fingerprint = bundles.qr_text("gw-0009", fingerprint)
    else:
        fingerprint = "12345"
    status, _ = register(office, gateway.bundle, fingerprint)
    assert status == 2
    err = capsys.readouterr().err
    assert message in err
    if case == "another-gateways-fingerprint":
        assert gateway.request.fingerprint not in err
    assert_nothing_written(office, GW, gateway.bundle.parent / f"{GW}.response.json")


def _expired_ca(folder: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old site CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=3650))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    for suffix in ("key", "crt"):
        (folder / f"ca.{suffix}").unlink()
    pki.write_pem(folder, "ca", key, cert)


def test_an_expired_ca_is_refused(office: Path, gateway: prov.Provisioned,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A site CA past its end signs nothing: exit 2 naming the date, nothing written."""
    _expired_ca(office / "pki")
    status, _ = register(office, gateway.bundle, gateway.request.fingerprint)
    assert status == 2
    assert "the CA expired on" in capsys.readouterr().err
    assert_nothing_written(office, GW, gateway.bundle.parent / f"{GW}.response.json")


def test_a_missing_ca_is_refused(office: Path, gateway: prov.Provisioned, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A --pki folder without a CA is refused with exit 2 naming the file."""
    status, _ = register(office, gateway.bundle, gateway.request.fingerprint,
                         "--pki", str(tmp_path / "nowhere"))
    assert status == 2
    assert "ca.key not found" in capsys.readouterr().err
    assert_nothing_written(office, GW, gateway.bundle.parent / f"{GW}.response.json")


def test_a_request_for_another_site_is_refused(
        office: Path, gateway: prov.Provisioned, capsys: pytest.CaptureFixture[str]) -> None:
    """--site other than the request's is refused with exit 2."""
    status, _ = register(office, gateway.bundle, gateway.request.fingerprint,
                         "--site", "bldg-0002")
    assert status == 2
    assert "provisioned for site bldg-0001" in capsys.readouterr().err
    assert_nothing_written(office, GW, gateway.bundle.parent / f"{GW}.response.json")


@pytest.mark.parametrize(("gateway_id", "common_name", "message"), [
    ("gw-0002", "gw-0001", "is for ['gw-0001'], not for 'gw-0002'"),
    ("central", None, "not a valid gateway id: 'central'"),
], ids=["csr-for-another-id", "reserved-id"])
def test_a_request_the_gateway_tool_never_makes_is_refused(  # noqa: PLR0917 - fixtures, parameters
        office: Path, tmp_path: Path, gateway_id: str, common_name: str | None, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A request whose certificate request names another gateway, or that asks for the
    office's own name, is refused with exit 2 though its fingerprint holds."""
    path, fingerprint = hand_made_request(tmp_path / "made", gateway_id,
                                          common_name=common_name)
    status, _ = register(office, path, fingerprint)
    assert status == 2
    assert message in capsys.readouterr().err
    assert_nothing_written(office, gateway_id, path.parent / f"{gateway_id}.response.json")


def test_an_acl_file_with_the_gateway_already_is_refused(
        office: Path, gateway: prov.Provisioned, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An --acl-file that has a block for the gateway already is refused with exit 2 and
    left as it was."""
    acl = tmp_path / "acl"
    acl.write_text(SHIPPED_ACL.read_text() + "\nuser gw-0001\ntopic read #\n")
    before = acl.read_text()
    status, _ = register(office, gateway.bundle, gateway.request.fingerprint,
                         "--acl-file", str(acl))
    assert status == 2
    assert "has a 'user gw-0001' block already" in capsys.readouterr().err
    assert acl.read_text() == before
    assert_nothing_written(office, GW, gateway.bundle.parent / f"{GW}.response.json")


@pytest.mark.parametrize("where", ["missing-folder", "existing-file"])
def test_a_response_that_cannot_be_written_registers_nothing(
        office: Path, gateway: prov.Provisioned, tmp_path: Path, where: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A response file in a folder that is not there, or over an existing file, is refused
    with exit 2 before the gateway is recorded."""
    out = tmp_path / "nowhere" / "r.json"
    if where == "existing-file":
        out = tmp_path / "r.json"
        out.write_text("earlier")
    status, _ = register(office, gateway.bundle, gateway.request.fingerprint,
                         "--out", str(out))
    assert status == 2
    assert str(out) in capsys.readouterr().err
    assert GW not in gateways(office)
    assert not (office / "gateways" / f"{GW}.json").exists()
    assert not out.exists() or out.read_text() == "earlier"
