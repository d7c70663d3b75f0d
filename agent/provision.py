"""Provisioning a gateway on site: its own keys, its configuration, the request for the
office, and installing the office's response (``permitgate provision``).

In the configuration folder (``/etc/permitgate`` on an installed gateway):

- ``permitgate.toml``: the shipped example with the site's values (``agent.provision_config``);
- ``credentials/`` (mode 0700) holding, each mode 0600: ``gateway.key`` (the TLS key, EC
  P-256), ``gateway-signing.key`` (Ed25519: what the gateway signs), ``gateway-seal.key``
  (X25519: the office seals the site key to it); after ``--accept``: ``gateway.crt``,
  ``ca.crt``, ``trusted-keys.txt``, ``office-seal.pub`` (when the office has one) and
  ``site.key``;
- ``gateway-request.json``: the request bundle (``protocol.bundles``), public keys only.

The configuration names the credentials by their bare names, which the agent looks up in
systemd's ``$CREDENTIALS_DIRECTORY`` (the unit's ``LoadCredential=`` lines) first. The
private keys are made here and never written anywhere else.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from agent import provision_config
from agent.config import ConfigError, load_config
from protocol import bundles
from protocol.hashing import SITE_KEY_BYTES
from protocol.ids import check_ident
from protocol.signing import b64, load_trusted_keys

CONFIG_NAME = "permitgate.toml"
CREDENTIALS = "credentials"
TLS_KEY = "gateway.key"
SIGNING_KEY = "gateway-signing.key"
SEAL_KEY = "gateway-seal.key"
PRIVATE_KEYS = (TLS_KEY, SIGNING_KEY, SEAL_KEY)
CERTIFICATE = "gateway.crt"
CA = "ca.crt"
TRUSTED_KEYS = "trusted-keys.txt"
OFFICE_SEAL = "office-seal.pub"
SITE_KEY = "site.key"
REQUEST_NAME = "gateway-request.json"
RESERVED_IDS = frozenset({"central", "ca", "server"})
"""Ids the office's PKI keeps for itself (``provisioning.pki.RESERVED``)."""


class ProvisionError(Exception):
    """Unusable input (exit status 2): a bad id, a file that would be overwritten, a
    response that does not belong to this gateway. The message says which."""


@dataclass(frozen=True, slots=True)
class Site:
    """The site's values an installer gives ``provision``."""

    gateway_id: str
    site_id: str
    broker_host: str
    broker_port: int = 8883
    timezone: str | None = None
    store: str | None = None


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What ``provision`` wrote."""

    request: bundles.GatewayRequest
    bundle: Path
    config: Path
    keys: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ``accept`` installed."""

    gateway_id: str
    installed: tuple[Path, ...]
    config: Path
    not_after: dt.datetime
    office_fingerprint: str


# -- files ------------------------------------------------------------------------------


def credentials(folder: Path) -> Path:
    """The private folder beside the configuration."""
    return folder / CREDENTIALS


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Put ``data`` at ``path`` with exactly ``mode``, replacing what was there in one
    rename (a crash leaves the old file or the new one, never half of either)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _private_folder(folder: Path) -> Path:
    creds = credentials(folder)
    creds.mkdir(mode=0o700, parents=True, exist_ok=True)
    creds.chmod(0o700)
    return creds


def _pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# -- provision ----------------------------------------------------------------------------


def _check_site(site: Site) -> None:
    try:
        check_ident(site.gateway_id, "--gateway-id")
        check_ident(site.site_id, "--site-id")
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    if site.gateway_id in RESERVED_IDS:
        raise ProvisionError(f"--gateway-id {site.gateway_id!r} is reserved by the office's "
                             "PKI; choose another")
    if not 1 <= site.broker_port <= 65535:
        raise ProvisionError(f"--broker-port {site.broker_port}: use 1 to 65535")


def _shipped_example() -> bytes | None:
    try:
        return provision_config.EXAMPLE.read_bytes()
    except OSError:
        return None


def _refuse_overwrite(folder: Path, example: bytes, force: bool) -> None:
    if force:
        return
    existing = [credentials(folder) / name for name in PRIVATE_KEYS
                if (credentials(folder) / name).exists()]
    if existing:
        raise ProvisionError(f"{', '.join(map(str, existing))}: this gateway has keys "
                             "already; give --force to replace them (the office must then "
                             "register the new request)")
    config = folder / CONFIG_NAME
    if config.exists() and config.read_bytes() not in (example, _shipped_example()):
        raise ProvisionError(f"{config}: exists and is not the shipped example; give --force "
                             "to replace it")


def csr_for(key: ec.EllipticCurvePrivateKey, gateway_id: str) -> x509.CertificateSigningRequest:
    """The certificate signing request of the TLS key: CN = the gateway id."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "permitgate"),
                      x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def tls_public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    """A TLS public key as the request fingerprint covers it (SubjectPublicKeyInfo)."""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def provision(folder: Path, site: Site, *, example: Path = provision_config.EXAMPLE,
              bundle: Path | None = None, force: bool = False) -> Provisioned:
    """Make this gateway's keys in ``folder/credentials``, its configuration from
    ``example`` and the request bundle (``folder/gateway-request.json`` unless ``bundle``
    names another file). Refuses to replace keys, or a configuration other than the
    example, without ``force``."""
    _check_site(site)
    try:
        example_bytes = example.read_bytes()
        example_text = example_bytes.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProvisionError(f"--example {example}: cannot read it: {exc}") from None
    _refuse_overwrite(folder, example_bytes, force)
    if bundle is not None and not bundle.parent.is_dir():
        raise ProvisionError(f"--bundle {bundle}: no folder {bundle.parent}")
    config_path = folder / CONFIG_NAME
    try:
        text = provision_config.gateway_config(
            example_text, gateway_id=site.gateway_id, site_id=site.site_id,
            broker_host=site.broker_host, broker_port=site.broker_port,
            timezone=site.timezone, store=site.store, source=str(config_path))
    except ConfigError as exc:
        raise ProvisionError(str(exc)) from None

    tls = ec.generate_private_key(ec.SECP256R1())
    signing = Ed25519PrivateKey.generate()
    seal = X25519PrivateKey.generate()
    csr = csr_for(tls, site.gateway_id)
    signing_raw = signing.public_key().public_bytes_raw()
    seal_raw = seal.public_key().public_bytes_raw()
    fingerprint = bundles.request_fingerprint(site.gateway_id, site.site_id,
                                              tls_public_der(tls.public_key()),
                                              signing_raw, seal_raw)
    request = bundles.GatewayRequest(
        format=bundles.REQUEST_FORMAT, gateway_id=site.gateway_id, site_id=site.site_id,
        csr=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        signing_key=b64(signing_raw), seal_key=b64(seal_raw), fingerprint=fingerprint)

    folder.mkdir(parents=True, exist_ok=True)
    creds = _private_folder(folder)
    keys = []
    for name, key in ((TLS_KEY, tls), (SIGNING_KEY, signing), (SEAL_KEY, seal)):
        write_file(creds / name, _pem(key), 0o600)
        keys.append(creds / name)
    write_file(config_path, text.encode("utf-8"), 0o644)
    bundle_path = bundle or folder / REQUEST_NAME
    write_file(bundle_path, bundles.dump(request), 0o644)
    return Provisioned(request, bundle_path, config_path, tuple(keys))


# -- accept ---------------------------------------------------------------------------------


def _load_private(path: Path) -> object:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ProvisionError(f"{path}: not found: run 'permitgate provision' first") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ProvisionError(f"{path}: not a PEM private key: {exc}") from None


def own_keys(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, Ed25519PrivateKey,
                                    X25519PrivateKey]:
    """This gateway's TLS, signing and seal keys."""
    creds = credentials(folder)
    tls, signing, seal = (_load_private(creds / name) for name in PRIVATE_KEYS)
    if not isinstance(tls, ec.EllipticCurvePrivateKey) or \
            not isinstance(signing, Ed25519PrivateKey) or \
            not isinstance(seal, X25519PrivateKey):
        raise ProvisionError(f"{creds}: the keys are not the EC, Ed25519 and X25519 keys "
                             "'permitgate provision' makes")
    return tls, signing, seal


def _check_certificate(response: bundles.GatewayResponse, tls: ec.EllipticCurvePrivateKey,
                       now: dt.datetime) -> tuple[x509.Certificate, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate(response.certificate.encode())
        ca = x509.load_pem_x509_certificate(response.ca.encode())
    except ValueError as exc:
        raise ProvisionError(f"the response's certificate or CA does not load: {exc}") from None
    if tls_public_der(tls.public_key()) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ProvisionError("the response's certificate is not for this gateway's TLS key")
    names = [n.value for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [response.gateway_id]:
        raise ProvisionError(f"the certificate is for {names!r}, not {response.gateway_id!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ProvisionError("the certificate was not signed by the response's CA") from None
    for what, item in (("certificate", cert), ("CA", ca)):
        if not item.not_valid_before_utc <= now < item.not_valid_after_utc:
            raise ProvisionError(
                f"the {what} is valid from {item.not_valid_before_utc:%Y-%m-%d} to "
                f"{item.not_valid_after_utc:%Y-%m-%d} UTC, not now (check the clock)")
    return cert, ca


def _check_trusted_keys(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TRUSTED_KEYS
        path.write_text(text, "utf-8")
        try:
            load_trusted_keys(path)
        except ValueError as exc:
            raise ProvisionError(f"the response's trusted keys: "
                                 f"{str(exc).replace(str(path), TRUSTED_KEYS)}") from None


def _read_response(path: Path, gateway: str, site: str) -> bundles.GatewayResponse:
    try:
        response = bundles.parse_response(path.read_bytes())
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read it: {exc.strerror}") from None
    except bundles.BundleError as exc:
        raise ProvisionError(f"{path}: {exc}") from None
    if (response.gateway_id, response.site_id) != (gateway, site):
        raise ProvisionError(f"{path}: for gateway {response.gateway_id} (site "
                             f"{response.site_id}), but this is {gateway} (site {site})")
    return response


def _check_office(response: bundles.GatewayResponse, ca: x509.Certificate, path: Path,
                  given: str | None) -> str:
    """The response's office fingerprint, recomputed and checked against ``given``."""
    seal_raw = None if response.office_seal_key is None else \
        bundles.raw_key(response.office_seal_key)
    office = bundles.office_fingerprint(ca.public_bytes(serialization.Encoding.DER),
                                        response.trusted_keys, seal_raw)
    if office != response.office_fingerprint:
        raise ProvisionError(f"{path}: its office fingerprint does not match its CA and "
                             "keys (the file was changed)")
    if given is not None:
        try:
            _, expected = bundles.read_fingerprint(given)
        except bundles.BundleError as exc:
            raise ProvisionError(f"--office-fingerprint: {exc}") from None
        if expected != office:
            raise ProvisionError(f"{path}: the office's fingerprint is {office}, not "
                                 f"{expected}: do not install it")
    _check_trusted_keys(response.trusted_keys)
    return office


def _accepted_config(config_path: Path) -> str:
    text = provision_config.set_keys(config_path.read_text("utf-8"), "keys",
                                     {"site_key": SITE_KEY})
    text = provision_config.set_keys(text, "sync", {
        "tls": True, "ca_file": CA, "cert_file": CERTIFICATE, "key_file": TLS_KEY,
        "trusted_keys": TRUSTED_KEYS})
    try:
        provision_config.check(text, str(config_path))
    except ConfigError as exc:
        raise ProvisionError(str(exc)) from None
    return text


def accept(folder: Path, response_path: Path, *, office_fingerprint: str | None = None,
           now: dt.datetime | None = None) -> Accepted:
    """Check the office's response against this gateway's keys and configuration, then
    install the certificate, the CA, the office's keys and the unsealed site key in
    ``folder/credentials`` and name them in the configuration's ``[sync]``. Nothing is
    written unless every check passed."""
    config_path = folder / CONFIG_NAME
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise ProvisionError(str(exc)) from None
    gateway, site = config.site.gateway_id, config.site.site_id
    response = _read_response(response_path, gateway, site)
    tls, signing, seal = own_keys(folder)
    ours = bundles.request_fingerprint(gateway, site, tls_public_der(tls.public_key()),
                                       signing.public_key().public_bytes_raw(),
                                       seal.public_key().public_bytes_raw())
    if response.request_fingerprint != ours:
        raise ProvisionError(f"{response_path}: answers request {response.request_fingerprint}"
                             f", but this gateway's keys are those of request {ours} "
                             "(provisioned again since?)")
    cert, ca = _check_certificate(response, tls, now or dt.datetime.now(dt.UTC))
    office = _check_office(response, ca, response_path, office_fingerprint)
    try:
        site_key = bundles.unseal_site_key(seal, response.sealed_site_key,
                                           gateway_id=gateway, request=ours)
    except bundles.BundleError as exc:
        raise ProvisionError(f"{response_path}: {exc}") from None
    if len(site_key) != SITE_KEY_BYTES:
        raise ProvisionError(f"{response_path}: the site key has {len(site_key)} bytes, "
                             f"not {SITE_KEY_BYTES}")
    text = _accepted_config(config_path)

    creds = _private_folder(folder)
    files = {CERTIFICATE: response.certificate.encode(), CA: response.ca.encode(),
             TRUSTED_KEYS: response.trusted_keys.encode(),
             SITE_KEY: (site_key.hex() + "\n").encode()}
    if response.office_seal_key is not None:
        files[OFFICE_SEAL] = (response.office_seal_key + "\n").encode()
    for name, data in files.items():
        write_file(creds / name, data, 0o600)
    write_file(config_path, text.encode("utf-8"), 0o644)
    return Accepted(gateway, tuple(creds / name for name in files), config_path,
                    cert.not_valid_after_utc, office)
