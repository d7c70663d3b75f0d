"""provisioning.pki: the site CA, the broker's and the clients' certificates, the CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning import pki

REPO = Path(__file__).resolve().parent.parent


def common_name(cert: x509.Certificate) -> str:
    """The certificate's CN."""
    [attribute] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


def test_client_certificate_names_the_gateway_and_is_signed_by_the_ca() -> None:
    """A gateway certificate has the gateway id as CN, clientAuth only, no CA rights, an
    EC P-256 key, and a signature the site CA verifies."""
    ca = pki.make_ca("site CA")
    key, cert = pki.make_client_cert(ca, "gw-a")

    assert common_name(cert) == "gw-a"
    cert.verify_directly_issued_by(ca[1])
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=729) < lifetime <= dt.timedelta(days=730)


def test_certificate_from_another_ca_does_not_verify() -> None:
    """A certificate is not accepted as issued by a CA that merely has the same name."""
    ca, impostor = pki.make_ca("site CA"), pki.make_ca("site CA")
    _, cert = pki.make_client_cert(impostor, "gw-a")
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(ca[1])


def test_ca_is_a_ten_year_ca_that_signs_only_leaves() -> None:
    """The CA certificate is self-signed, critical basicConstraints CA with path length 0,
    and valid ten years by default."""
    _, cert = pki.make_ca("site CA")
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=3649) < lifetime <= dt.timedelta(days=3650)


def test_server_certificate_lists_every_name_and_address() -> None:
    """The broker certificate carries serverAuth and a SAN with each host name and IP."""
    ca = pki.make_ca("site CA")
    _, cert = pki.make_server_cert(ca, ["broker.example", "localhost"], ["127.0.0.1"])

    cert.verify_directly_issued_by(ca[1])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_leaf_never_outlives_its_ca() -> None:
    """A client certificate asked for longer than the CA's remaining life ends with it."""
    ca = pki.make_ca("site CA", days=30)
    _, cert = pki.make_client_cert(ca, "gw-a", days=365)
    assert cert.not_valid_after_utc == ca[1].not_valid_after_utc


def test_bad_names_and_validities_are_refused() -> None:
    """Gateway ids that could not be one MQTT topic level, and validities under a day,
    are refused."""
    ca = pki.make_ca("site CA")
    for bad in ("GW-A", "gw/a", "gw+a", "#", "", "-gw", "g" * 64):
        with pytest.raises(pki.PkiError):
            pki.make_client_cert(ca, bad)
    with pytest.raises(pki.PkiError):
        pki.make_client_cert(ca, "gw-a", days=0)


def test_key_file_is_private_and_nothing_is_overwritten(tmp_path: Path) -> None:
    """The key is written with mode 0600, and a second write under the same name raises
    without touching the existing files."""
    ca = pki.make_ca("site CA")
    key_path, cert_path = pki.write_pem(tmp_path, "gw-a", *pki.make_client_cert(ca, "gw-a"))

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    before = key_path.read_bytes(), cert_path.read_bytes()
    with pytest.raises(FileExistsError):
        pki.write_pem(tmp_path, "gw-a", *pki.make_client_cert(ca, "gw-a"))
    assert (key_path.read_bytes(), cert_path.read_bytes()) == before


def test_cli_init_and_client_write_a_working_chain(tmp_path: Path) -> None:
    """``init`` writes the CA, server and central pairs; ``client`` a gateway pair signed
    by that CA."""
    folder = tmp_path / "site"
    assert pki.main(["init", str(folder), "--broker-host", "broker.example",
                     "--broker-host", "10.0.0.5"]) == 0
    assert pki.main(["client", str(folder), "gw-a"]) == 0

    _, ca = pki.load_pem(folder, "ca")
    for name in ("server", "central", "gw-a"):
        _, cert = pki.load_pem(folder, name)
        cert.verify_directly_issued_by(ca)
        assert stat.S_IMODE((folder / f"{name}.key").stat().st_mode) == 0o600
    _, central = pki.load_pem(folder, "central")
    assert common_name(central) == "central"
    _, server = pki.load_pem(folder, "server")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]


def test_cli_refuses_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-running ``init``, re-issuing a gateway, a reserved or malformed gateway id and a
    folder without a CA all exit 2 with a message, and no key changes."""
    folder = tmp_path / "site"
    assert pki.main(["client", str(folder), "gw-a"]) == 2  # no CA yet
    assert "ca.key not found" in capsys.readouterr().err
    assert pki.main(["init", str(folder), "--broker-host", "localhost"]) == 0
    assert pki.main(["client", str(folder), "gw-a"]) == 0
    keys = {path.name: path.read_bytes() for path in folder.iterdir()}
    capsys.readouterr()

    assert pki.main(["init", str(folder), "--broker-host", "localhost"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert pki.main(["client", str(folder), "gw-a"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    for reserved in ("central", "ca", "server"):
        assert pki.main(["client", str(folder), reserved]) == 2
        assert "reserved" in capsys.readouterr().err
    assert pki.main(["client", str(folder), "Gw/A"]) == 2
    assert "not a valid gateway id" in capsys.readouterr().err
    assert pki.main(["init", str(tmp_path / "other"), "--broker-host", "bad host"]) == 2
    assert "not a host name" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == keys


def test_module_entry_point_reports_usage_errors_with_status_2(tmp_path: Path) -> None:
    """``python -m provisioning.pki`` without its required option exits 2 with usage."""
    result = subprocess.run(
        [sys.executable, "-m", "provisioning.pki", "init", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "--broker-host" in result.stderr
    assert not (tmp_path / "site").exists()
