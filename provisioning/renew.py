"""Renewing a registered gateway's certificate (``permitgate-central register-gateway
--renew REQUEST``): the request ``permitgate provision --renew`` made on the gateway is
checked against the Ed25519 public key recorded when the gateway was registered
(``DIR/gateways/<gateway>.json``), so no fingerprint is read out again; the new key's
certificate is signed with the site CA and the answer written for ``permitgate provision
--accept``. The record keeps the serial and expiry of every certificate it replaced, for
``remove-gateway`` to revoke them all.

Refused with a clear message (exit status 2), before anything is written: a request that
is not a renewal or not signed by the recorded key, a gateway the office has no record of,
a removed gateway, a request for another site, an expired CA.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import bundles
from provisioning import pki
from provisioning.central import Central
from provisioning.errors import CentralUsageError

GATEWAYS_DIR = "gateways"
"""The records ``register-gateway`` writes (``provisioning.register.GATEWAYS_DIR``)."""


@dataclass(frozen=True, slots=True)
class Renewed:
    """What ``renew_gateway`` did."""

    gateway_id: str
    site_id: str
    certificate: x509.Certificate
    replaced_serial: str
    response: Path
    record: Path


def record_path(folder: Path, gateway: str) -> Path:
    """Where the office keeps what it knows of ``gateway``'s keys."""
    return folder / GATEWAYS_DIR / f"{gateway}.json"


def read_record(folder: Path, gateway: str, command: str) -> dict[str, Any]:
    """The gateway's record; ``CentralUsageError`` naming ``command`` when there is none."""
    path = record_path(folder, gateway)
    try:
        record = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CentralUsageError(f"{command}: gateway {gateway!r} is unknown here: no record "
                                f"of its keys ({path}); only a gateway registered with "
                                "'register-gateway' has one") from None
    except (OSError, ValueError) as exc:
        raise CentralUsageError(f"{command}: {path}: cannot read it: {exc}") from None
    if not isinstance(record, dict):
        raise CentralUsageError(f"{command}: {path}: not a gateway record")
    return record


def write_record(folder: Path, gateway: str, record: dict[str, Any]) -> Path:
    """Replace the gateway's record in one rename."""
    path = record_path(folder, gateway)
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def _usage(message: str) -> CentralUsageError:
    return CentralUsageError(f"register-gateway --renew: {message}")


def read_renewal(path: Path) -> bundles.RenewalRequest:
    """The renewal request in ``path``; ``CentralUsageError`` when it is not one."""
    try:
        return bundles.parse_renewal(path.read_bytes())
    except OSError as exc:
        raise _usage(f"{path}: cannot read it: {exc.strerror}") from None
    except bundles.BundleError as exc:
        raise _usage(f"{path}: {exc}") from None


def check_signature(request: bundles.RenewalRequest, record: dict[str, Any],
                    path: Path) -> x509.CertificateSigningRequest:
    """The request's CSR once its signature holds under the recorded signing key and its
    fingerprint under its key."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bundles.raw_key(record["signing_key"]))
        signature = base64.b64decode(request.signature, validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise _usage(f"the record of {request.gateway_id} has no usable signing key"
                     ) from None
    try:
        public.verify(signature, bundles.renewal_payload(
            request.gateway_id, request.site_id, request.csr, request.made,
            request.fingerprint))
    except InvalidSignature:
        raise _usage(f"{path}: not signed by the signing key recorded for "
                     f"{request.gateway_id} at its registration: it was not made by that "
                     "gateway (or was changed since); do not renew it") from None
    try:
        csr = x509.load_pem_x509_csr(request.csr.encode())
        der = csr.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    except ValueError as exc:
        raise _usage(f"{path}: the certificate request does not load: {exc}") from None
    if bundles.renewal_fingerprint(request.gateway_id, request.site_id, der) != \
            request.fingerprint:
        raise _usage(f"{path}: its fingerprint does not match its key")
    return csr


def renew_gateway(central: Central, bundle: Path, *, site: str | None = None,
                  pki_dir: Path | None = None, out: Path | None = None,
                  days: int = pki.CLIENT_DAYS) -> Renewed:
    """Check the renewal in ``bundle``, sign its certificate with the CA in ``pki_dir``
    (default ``<folder>/pki``), update the gateway's record and write the answer (default
    ``<gateway>.renewed.json`` beside the request). ``CentralUsageError`` before anything
    is written when a check fails."""
    folder = central.folder
    request = read_renewal(bundle)
    gateway = request.gateway_id
    record = read_record(folder, gateway, "register-gateway --renew")
    if gateway not in central.gateways():
        raise _usage(f"gateway {gateway!r} is not registered in this office's database")
    removed = central.removed(gateway)
    if removed is not None or "removed" in record:
        when = (removed or record["removed"]).get("at", "?")
        raise _usage(f"gateway {gateway!r} was removed ({when}): its certificates are "
                     "revoked; provision the replacement under a new id")
    if site is not None and site != request.site_id:
        raise _usage(f"--site {site}: the renewal is for site {request.site_id}")
    if record.get("site_id") != request.site_id:
        raise _usage(f"{bundle}: for site {request.site_id}, but {gateway} was registered "
                     f"for site {record.get('site_id')}")
    csr = check_signature(request, record, bundle)
    pki_folder = pki_dir or folder / "pki"
    try:
        certificate = pki.sign_client_csr(pki.load_pem(pki_folder, "ca"), csr, gateway,
                                          days=days)
        ca_cert = pki.load_pem(pki_folder, "ca")[1]
    except pki.PkiError as exc:
        raise _usage(f"--pki {pki_folder}: {exc}") from None
    response = bundles.RenewalResponse(
        format=bundles.RENEWED_FORMAT, gateway_id=gateway, site_id=request.site_id,
        renewal_fingerprint=request.fingerprint,
        certificate=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        ca=ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    response_path = out or bundle.with_name(f"{gateway}.renewed.json")
    try:
        fd = os.open(response_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise _usage(f"{response_path}: exists already; give --out FILE") from None
    except OSError as exc:
        raise _usage(f"{response_path}: cannot write the answer there: {exc.strerror}"
                     ) from None
    with os.fdopen(fd, "wb") as answer:
        answer.write(bundles.dump(response))
    replaced = str(record.get("certificate_serial", "?"))
    history = list(record.get("previous_certificates") or [])
    history.append({"serial": replaced, "not_after": record.get("certificate_not_after")})
    record.update({
        "certificate_serial": format(certificate.serial_number, "x"),
        "certificate_not_after": certificate.not_valid_after_utc.isoformat(),
        "certificate": response.certificate, "previous_certificates": history,
        "renewed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "renewal_fingerprint": request.fingerprint})
    path = write_record(folder, gateway, record)
    return Renewed(gateway, request.site_id, certificate, replaced, response_path, path)
