"""``permitgate provision`` on the gateway (agent/provision.py): its keys, modes,
configuration, request and QR code; refusing to overwrite; installing the office's
response with ``--accept``, and refusing a response that is not for this gateway."""

from __future__ import annotations

import base64
import io
import json
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from agent import cli
from agent import provision as prov
from agent.config import load_config
from agent.provision_config import EXAMPLE, set_keys
from agent.resolve import load_secrets, resolve_paths
from protocol import bundles
from protocol.hashing import read_key
from tests.provisionkit import GW, SITE, edit_json, make_office, provision_gateway, register
from tests.qrscan import decode, matrix_from_text

SITE_ARGS = ["--gateway-id", GW, "--site-id", SITE, "--broker-host", "mqtt.office.example",
             "--broker-port", "8884", "--store", "data/permitgate.db"]


def run(argv: list[str]) -> tuple[int, str]:
    """``permitgate ARGV`` in this process: exit status and standard output."""
    out = io.StringIO()
    return cli.main(argv, out=out), out.getvalue()


def provision(folder: Path, *extra: str) -> tuple[int, str]:
    """``permitgate provision --dir FOLDER`` with this site's values."""
    return run(["provision", "--dir", str(folder), *SITE_ARGS, *extra])


def mode(path: Path) -> int:
    """The permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


def private_encodings(folder: Path) -> list[str]:
    """Every private key of the gateway in the forms a leak would take: its PEM body, and
    its raw secret bytes as base64 and hex."""
    found = []
    tls, signing, seal = prov.own_keys(folder)
    for name in prov.PRIVATE_KEYS:
        pem = (prov.credentials(folder) / name).read_text()
        found.append("".join(pem.splitlines()[1:-1]))
    secret = tls.private_numbers().private_value.to_bytes(32, "big")
    for raw in (secret, signing.private_bytes_raw(), seal.private_bytes_raw()):
        found += [base64.b64encode(raw).decode(), raw.hex(), raw.hex().upper()]
    return found


def test_provision_makes_private_keys_a_configuration_and_a_request(tmp_path: Path) -> None:
    """The keys are made in a 0700 credentials folder with mode 0600, the configuration
    is the example with the site's ids, store and broker, and the request holds a CSR for
    the gateway id and the fingerprint printed, which its keys recompute."""
    folder = tmp_path / "etc"
    status, out = provision(folder)
    assert status == 0
    creds = folder / "credentials"
    assert mode(creds) == 0o700
    for name in prov.PRIVATE_KEYS:
        assert mode(creds / name) == 0o600, name
    assert sorted(p.name for p in creds.iterdir()) == sorted(prov.PRIVATE_KEYS)
    config = load_config(folder / "permitgate.toml")
    assert (config.site.gateway_id, config.site.site_id) == (GW, SITE)
    assert (config.sync.enabled, config.sync.tls) == (True, True)
    assert (config.sync.host, config.sync.port) == ("mqtt.office.example", 8884)
    assert config.store.path == Path("data/permitgate.db")
    assert "# Every key is described in docs/configuration.md" in \
        (folder / "permitgate.toml").read_text()  # the example's comments stay
    request = bundles.parse_request((folder / prov.REQUEST_NAME).read_bytes())
    assert f"fingerprint  {request.fingerprint}\n" in out
    csr = x509.load_pem_x509_csr(request.csr.encode())
    assert csr.is_signature_valid
    assert [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [GW]
    tls, signing, seal = prov.own_keys(folder)
    assert request.fingerprint == bundles.request_fingerprint(
        GW, SITE, prov.tls_public_der(tls.public_key()),
        signing.public_key().public_bytes_raw(), seal.public_key().public_bytes_raw())


def test_the_request_holds_no_private_key(tmp_path: Path) -> None:
    """No private key, in any encoding, is in the request bundle or the configuration:
    only in the credentials folder."""
    folder = tmp_path / "etc"
    (tmp_path / "usb").mkdir()
    status, _ = provision(folder, "--bundle", str(tmp_path / "usb" / "request.json"))
    assert status == 0
    leaks = private_encodings(folder)
    for path in (tmp_path / "usb" / "request.json", folder / "permitgate.toml"):
        text = path.read_text()
        assert "PRIVATE" not in text, path
        assert not [leak for leak in leaks if leak in text], path
    assert not (folder / prov.REQUEST_NAME).exists()


def test_the_printed_qr_code_holds_the_gateway_and_its_fingerprint(tmp_path: Path) -> None:
    """The QR code printed under the fingerprint reads as permitgate:<gateway>:<fingerprint>,
    the text register-gateway takes as --fingerprint; --no-qr leaves it out."""
    status, out = provision(tmp_path / "etc")
    assert status == 0
    fingerprint = re.search(r"^fingerprint  (\S+)$", out, re.M)
    assert fingerprint is not None
    assert decode(matrix_from_text(out), tmp_path, quiet=0) == \
        f"permitgate:{GW}:{fingerprint.group(1)}"
    status, out = provision(tmp_path / "other", "--no-qr")
    assert status == 0
    assert "\u2588" not in out


def test_existing_keys_are_replaced_only_with_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second provision is refused with exit 2 naming --force and changes no key;
    with --force the keys are new."""
    folder = tmp_path / "etc"
    assert provision(folder)[0] == 0
    keys = {name: (folder / "credentials" / name).read_bytes() for name in prov.PRIVATE_KEYS}
    capsys.readouterr()
    assert provision(folder)[0] == 2
    assert "--force" in capsys.readouterr().err
    assert keys == {n: (folder / "credentials" / n).read_bytes() for n in prov.PRIVATE_KEYS}
    assert provision(folder, "--force")[0] == 0
    assert all(keys[n] != (folder / "credentials" / n).read_bytes() for n in prov.PRIVATE_KEYS)


def test_only_the_shipped_example_is_replaced_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The example as install.sh leaves it is replaced; an edited configuration is kept,
    with exit 2, unless --force."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "permitgate.toml").write_bytes(EXAMPLE.read_bytes())
    assert provision(folder)[0] == 0
    other = tmp_path / "edited"
    other.mkdir()
    (other / "permitgate.toml").write_text("# mine\n")
    capsys.readouterr()
    assert provision(other)[0] == 2
    assert "not the shipped example" in capsys.readouterr().err
    assert (other / "permitgate.toml").read_text() == "# mine\n"
    assert not (other / "credentials").exists()
    assert provision(other, "--force")[0] == 0


def test_an_existing_credentials_folder_is_made_private(tmp_path: Path) -> None:
    """A credentials folder that others could read is set to 0700."""
    folder = tmp_path / "etc"
    (folder / "credentials").mkdir(parents=True)
    (folder / "credentials").chmod(0o755)
    assert provision(folder)[0] == 0
    assert mode(folder / "credentials") == 0o700


@pytest.mark.parametrize(("argv", "message"), [
    (["--gateway-id", "GW 1", "--site-id", SITE, "--broker-host", "h"], "--gateway-id"),
    (["--gateway-id", "central", "--site-id", SITE, "--broker-host", "h"], "reserved"),
    (["--gateway-id", GW, "--site-id", "Site!", "--broker-host", "h"], "--site-id"),
    (["--gateway-id", GW, "--site-id", SITE], "--broker-host"),
    (["--gateway-id", GW, "--site-id", SITE, "--broker-host", "h", "--timezone", "Mars/Base"],
     "time zone"),
    (["--gateway-id", GW, "--site-id", SITE, "--broker-host", "h", "--bundle",
      "/nonexistent/request.json"], "--bundle"),
    (["--accept", "r.json", "--gateway-id", GW], "--accept takes none of --gateway-id"),
    (["--gateway-id", GW, "--site-id", SITE, "--broker-host", "h", "--office-fingerprint",
      "X"], "goes with --accept"),
], ids=["bad-id", "reserved-id", "bad-site", "no-broker", "bad-zone", "bundle-folder",
        "accept-mixed", "office-fp-alone"])
def test_unusable_options_exit_2_and_write_nothing(
        tmp_path: Path, argv: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Bad ids, a reserved id, a missing option, an unknown time zone, a request file in a
    folder that is not there, or options of the other mode are refused with exit 2 and a
    message naming them; nothing is written."""
    status, _ = run(["provision", "--dir", str(tmp_path / "etc"), *argv])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "etc").exists()


def test_set_keys_keeps_comments_and_adds_what_is_missing() -> None:
    """Setting a key keeps its line's comment; a missing key goes at the end of its table
    and a missing table at the end of the file."""
    text = '[site]\nsite_id = "a"   # the id\n\n[store]\npath = "x"\n'
    edited = set_keys(set_keys(text, "site", {"site_id": "b", "timezone": "UTC"}),
                      "sync", {"enabled": True, "port": 8883})
    assert edited == ('[site]\nsite_id = "b"   # the id\ntimezone = "UTC"\n\n[store]\n'
                      'path = "x"\n\n[sync]\nenabled = true\nport = 8883\n')


# -- accepting the office's response -----------------------------------------------------------


@pytest.fixture
def registered(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A gateway provisioned in ``etc`` and registered at an office: (gateway folder,
    office folder, response file)."""
    office = make_office(tmp_path / "office")
    folder = tmp_path / "etc"
    done = provision_gateway(folder)
    status, out = register(office, done.bundle, done.request.fingerprint)
    assert status == 0, out
    return folder, office, folder / f"{GW}.response.json"


def test_accept_installs_the_office_files_and_names_them_in_the_config(
        registered: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """--accept installs the certificate, CA, office keys and the unsealed site key (mode
    0600), names them in [sync] and [keys], and the agent loads them as credentials: the
    certificate pairs with the TLS key and the site key is the office's."""
    folder, office, response = registered
    status, out = run(["provision", "--dir", str(folder), "--accept", str(response)])
    assert status == 0, out
    creds = folder / "credentials"
    for name in (prov.CERTIFICATE, prov.CA, prov.TRUSTED_KEYS, prov.OFFICE_SEAL,
                 prov.SITE_KEY):
        assert mode(creds / name) == 0o600, name
    config_path = folder / "permitgate.toml"
    assert mode(config_path) == 0o644
    config = load_config(config_path)
    assert (config.sync.ca_file, config.sync.cert_file, config.sync.key_file,
            config.sync.trusted_keys, config.keys.site_key) == (
        "ca.crt", "gateway.crt", "gateway.key", "trusted-keys.txt", "site.key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    secrets = load_secrets(config, resolve_paths(config, config_path))
    assert secrets.site_key == read_key(office / "site-keys" / f"{GW}.key")
    assert secrets.trusted_keys is not None and list(secrets.trusted_keys) == ["central-1"]
    assert (creds / prov.TRUSTED_KEYS).read_bytes() == \
        (office / "trusted-keys.txt").read_bytes()
    office_fp = json.loads(response.read_text())["office_fingerprint"]
    assert f"office fingerprint  {office_fp}" in out
    assert f"LoadCredential=gateway.key:{creds.resolve()}/gateway.key" in out


def installed(folder: Path) -> list[str]:
    """What --accept would install that is in the credentials folder."""
    return [name for name in (prov.CERTIFICATE, prov.CA, prov.TRUSTED_KEYS, prov.SITE_KEY,
                              prov.OFFICE_SEAL) if (folder / "credentials" / name).exists()]


def _other_certificate(response: Path, tmp_path: Path) -> None:
    other = make_office(tmp_path / "other-office")
    done = provision_gateway(tmp_path / "other-gw")
    assert register(other, done.bundle, done.request.fingerprint)[0] == 0
    stranger = json.loads((tmp_path / "other-gw" / f"{GW}.response.json").read_text())
    edit_json(response, certificate=stranger["certificate"])


def _other_sealed_key(response: Path, tmp_path: Path) -> None:
    other = make_office(tmp_path / "other-office")
    done = provision_gateway(tmp_path / "other-gw")
    assert register(other, done.bundle, done.request.fingerprint)[0] == 0
    stranger = json.loads((tmp_path / "other-gw" / f"{GW}.response.json").read_text())
    edit_json(response, sealed_site_key=stranger["sealed_site_key"])


def _extra_trusted_key(response: Path, _tmp_path: Path) -> None:
    data = json.loads(response.read_text())
    edit_json(response, trusted_keys=data["trusted_keys"] + "mallory " + "A" * 43 + "=\n")


def _not_a_response(response: Path, _tmp_path: Path) -> None:
    edit_json(response, format=bundles.REQUEST_FORMAT)


@pytest.mark.parametrize(("tamper", "message"), [
    (_other_certificate, "not for this gateway's TLS key"),
    (_other_sealed_key, "does not open"),
    (_extra_trusted_key, "office fingerprint does not match"),
    (_not_a_response, "not a gateway response"),
], ids=["certificate", "sealed-key", "trusted-keys", "format"])
def test_accept_refuses_a_changed_response_and_installs_nothing(
        registered: tuple[Path, Path, Path], tmp_path: Path, tamper: object, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A response whose certificate is for another key, whose site key was sealed for
    another request, whose office keys were added to, or that is no response, is refused
    with exit 2; nothing is installed and the configuration is unchanged."""
    folder, _, response = registered
    assert callable(tamper)
    tamper(response, tmp_path)
    before = (folder / "permitgate.toml").read_bytes()
    status, _ = run(["provision", "--dir", str(folder), "--accept", str(response)])
    assert status == 2
    assert message in capsys.readouterr().err
    assert installed(folder) == []
    assert (folder / "permitgate.toml").read_bytes() == before


def test_accept_refuses_the_answer_to_an_earlier_request(
        registered: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """After provisioning again (new keys), the response to the old request is refused."""
    folder, _, response = registered
    provision_gateway(folder, force=True)
    status, _ = run(["provision", "--dir", str(folder), "--accept", str(response)])
    assert status == 2
    assert "provisioned again" in capsys.readouterr().err
    assert installed(folder) == []


def test_accept_checks_the_office_fingerprint_when_given(
        registered: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """--office-fingerprint other than the response's refuses it; the right one, typed in
    lower case, is accepted."""
    folder, _, response = registered
    right = json.loads(response.read_text())["office_fingerprint"]
    wrong = "00000-00000-00000-00000-00000"
    status, _ = run(["provision", "--dir", str(folder), "--accept", str(response),
                     "--office-fingerprint", wrong])
    assert status == 2
    assert "do not install it" in capsys.readouterr().err
    assert installed(folder) == []
    status, out = run(["provision", "--dir", str(folder), "--accept", str(response),
                       "--office-fingerprint", right.lower()])
    assert status == 0, out
    assert "(as given)" in out


def test_the_certificate_is_the_offices_for_this_key(
        registered: tuple[Path, Path, Path]) -> None:
    """The installed certificate carries the gateway's TLS public key and is signed by the
    installed CA."""
    folder, _, response = registered
    assert run(["provision", "--dir", str(folder), "--accept", str(response)])[0] == 0
    creds = folder / "credentials"
    cert = x509.load_pem_x509_certificate((creds / prov.CERTIFICATE).read_bytes())
    ca = x509.load_pem_x509_certificate((creds / prov.CA).read_bytes())
    cert.verify_directly_issued_by(ca)
    tls, _, _ = prov.own_keys(folder)
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == prov.tls_public_der(tls.public_key())
