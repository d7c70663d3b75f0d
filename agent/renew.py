"""Renewing a provisioned gateway's TLS certificate (``permitgate provision --renew``, then
``--accept`` of the office's answer).

``renew`` makes a new TLS key, kept aside as ``credentials/gateway-renewal.key`` (mode
0600) while the old key and certificate stay in use, and writes a renewal request
(``protocol.bundles.RenewalRequest``: the new key's CSR, signed with the gateway's
recorded Ed25519 key ``gateway-signing.key``) for the office. ``accept_renewal`` checks the
office's answer (the certificate is for the new key and this gateway, signed by the CA the
gateway trusts already) and only then installs it: ``gateway.crt`` replaced, the new key
renamed over ``gateway.key``. The agent loads its TLS files once, at start: it connects
with the renewed certificate after its next restart (``systemctl restart permitgate``).
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import provision as prov
from agent.config import ConfigError, load_config
from protocol import bundles

RENEWAL_KEY = "gateway-renewal.key"
"""The new TLS key while its certificate is awaited."""
RENEWAL_NAME = "gateway-renewal.json"


@dataclass(frozen=True, slots=True)
class Renewal:
    """What ``renew`` wrote."""

    request: bundles.RenewalRequest
    bundle: Path
    key: Path
    current_not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class Renewed:
    """What ``accept_renewal`` installed."""

    gateway_id: str
    certificate: Path
    key: Path
    serial: int
    not_after: dt.datetime


def _ids(folder: Path) -> tuple[str, str]:
    try:
        config = load_config(folder / prov.CONFIG_NAME)
    except ConfigError as exc:
        raise prov.ProvisionError(str(exc)) from None
    return config.site.gateway_id, config.site.site_id


def _installed(folder: Path, name: str, what: str) -> x509.Certificate:
    path = prov.credentials(folder) / name
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise prov.ProvisionError(f"{path}: not found: this gateway has no {what} yet; "
                                  "a renewal is for a gateway the office registered and "
                                  "whose response was installed ('provision --accept')"
                                  ) from None
    except (OSError, ValueError) as exc:
        raise prov.ProvisionError(f"{path}: not a PEM certificate: {exc}") from None


def renew(folder: Path, *, bundle: Path | None = None,
          now: dt.datetime | None = None) -> Renewal:
    """Make a new TLS key (kept aside until its certificate is installed) and the signed
    renewal request for it (``folder/gateway-renewal.json`` unless ``bundle`` names another
    file). A renewal made before and not yet accepted is replaced."""
    gateway, site = _ids(folder)
    current = _installed(folder, prov.CERTIFICATE, "certificate")
    _, signing, _ = prov.own_keys(folder)
    if bundle is not None and not bundle.parent.is_dir():
        raise prov.ProvisionError(f"--bundle {bundle}: no folder {bundle.parent}")
    tls = ec.generate_private_key(ec.SECP256R1())
    csr = prov.csr_for(tls, gateway).public_bytes(serialization.Encoding.PEM).decode("ascii")
    made = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
    fingerprint = bundles.renewal_fingerprint(gateway, site,
                                              prov.tls_public_der(tls.public_key()))
    signature = signing.sign(bundles.renewal_payload(gateway, site, csr, made, fingerprint))
    request = bundles.RenewalRequest(
        format=bundles.RENEWAL_FORMAT, gateway_id=gateway, site_id=site, csr=csr, made=made,
        fingerprint=fingerprint, signature=base64.b64encode(signature).decode("ascii"))
    key_path = prov.credentials(folder) / RENEWAL_KEY
    prov.write_file(key_path, tls.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    bundle_path = bundle or folder / RENEWAL_NAME
    prov.write_file(bundle_path, bundles.dump(request), 0o644)
    return Renewal(request, bundle_path, key_path, current.not_valid_after_utc)


def _pending_key(folder: Path) -> ec.EllipticCurvePrivateKey:
    path = prov.credentials(folder) / RENEWAL_KEY
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise prov.ProvisionError(f"{path}: not found: no renewal is waiting on this "
                                  "gateway (make one with 'permitgate provision --renew')"
                                  ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise prov.ProvisionError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise prov.ProvisionError(f"{path}: not an EC key")
    return key


def _check(response: bundles.RenewalResponse, key: ec.EllipticCurvePrivateKey,
           trusted_ca: x509.Certificate, path: Path, now: dt.datetime) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(response.certificate.encode())
        ca = x509.load_pem_x509_certificate(response.ca.encode())
    except ValueError as exc:
        raise prov.ProvisionError(f"{path}: the certificate or CA does not load: {exc}"
                                  ) from None
    if ca != trusted_ca:
        raise prov.ProvisionError(f"{path}: signed by another CA than the one this gateway "
                                  "trusts (ca.crt): a new site CA means provisioning again")
    if prov.tls_public_der(key.public_key()) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise prov.ProvisionError(f"{path}: the certificate is not for this gateway's "
                                  "waiting renewal key (an earlier renewal's answer?)")
    names = [n.value for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [response.gateway_id]:
        raise prov.ProvisionError(f"{path}: the certificate is for {names!r}, not "
                                  f"{response.gateway_id!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise prov.ProvisionError(f"{path}: the certificate was not signed by the CA"
                                  ) from None
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise prov.ProvisionError(
            f"{path}: the certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d} UTC, not now (check the clock)")
    return cert


def accept_renewal(folder: Path, response_path: Path, data: bytes, *,
                   now: dt.datetime | None = None) -> Renewed:
    """Check the office's answer ``data`` (read from ``response_path``) to this gateway's
    waiting renewal, then install the new certificate and key. Nothing is changed unless
    every check passed."""
    gateway, site = _ids(folder)
    try:
        response = bundles.parse_renewed(data)
    except bundles.BundleError as exc:
        raise prov.ProvisionError(f"{response_path}: {exc}") from None
    if (response.gateway_id, response.site_id) != (gateway, site):
        raise prov.ProvisionError(f"{response_path}: for gateway {response.gateway_id} "
                                  f"(site {response.site_id}), but this is {gateway} (site "
                                  f"{site})")
    key = _pending_key(folder)
    ours = bundles.renewal_fingerprint(gateway, site, prov.tls_public_der(key.public_key()))
    if response.renewal_fingerprint != ours:
        raise prov.ProvisionError(f"{response_path}: answers renewal "
                                  f"{response.renewal_fingerprint}, but the waiting renewal "
                                  f"is {ours} (renewed again since?)")
    trusted = _installed(folder, prov.CA, "CA")
    cert = _check(response, key, trusted, response_path, now or dt.datetime.now(dt.UTC))
    creds = prov.credentials(folder)
    # The certificate first, then the key by one rename: the old pair stays whole until the
    # new certificate is written, and the agent reads both only when it starts.
    prov.write_file(creds / prov.CERTIFICATE, response.certificate.encode(), 0o600)
    (creds / RENEWAL_KEY).replace(creds / prov.TLS_KEY)
    return Renewed(gateway, creds / prov.CERTIFICATE, creds / prov.TLS_KEY,
                   cert.serial_number, cert.not_valid_after_utc)
