"""Registering a provisioned gateway at the office (``permitgate-central
register-gateway``): the request checked against the fingerprint the installer tells, its
certificate signed by the site CA, the gateway recorded with its site key and its public
keys, the site key sealed to it, and its broker ACL entry.

In the central folder:

- ``gateways/<gateway>.json``: what the office knows of the gateway's own keys: its Ed25519
  signing key and X25519 key (public halves), the request's fingerprint, the certificate
  (PEM, serial, expiry) and when it was registered;
- ``broker-acl/<gateway>.acl``: the gateway's ``user`` block for the broker's ACL
  (``acl_entry``), to append to ``config/mosquitto/acl``;
- ``site-keys/<gateway>.key``: a new site key, unless ``--site-key`` names the building's
  existing one (``add_gateway``, as ``add-gateway`` stores it).

Every check is made before anything is written: a refused request leaves the office as it
was. The request format is ``protocol.bundles``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocol import PROTOCOL, bundles
from protocol.hashing import SITE_KEY_BYTES, SecretError, read_key
from protocol.topics import Topics
from provisioning import pki
from provisioning.central import Central
from provisioning.errors import CentralUsageError
from provisioning.keys import SEAL_PUBLIC_NAME, TRUSTED_KEYS_NAME
from provisioning.renew import renew_gateway

GATEWAYS_DIR = "gateways"
ACL_DIR = "broker-acl"
PKI_DIR = "pki"


@dataclass(frozen=True, slots=True)
class Registration:
    """What ``register_gateway`` did."""

    gateway_id: str
    site_id: str
    certificate: x509.Certificate
    response: Path
    record: Path
    acl_entry: str
    acl_files: tuple[Path, ...]
    site_key: Path | None
    """The building's existing key file given, or None for a new key."""
    office_fingerprint: str


def acl_entry(gateway_id: str, site_id: str, prefix: str = PROTOCOL) -> str:
    """The gateway's block for Mosquitto's ``acl_file``: exactly the topics the shipped
    ACL's patterns give every gateway, named for this one, so that a broker whose ACL lists
    its gateways one by one lets this one in and removing the block shuts it out."""
    topics = Topics(gateway_id, prefix)
    return (f"# {gateway_id} (site {site_id}), added by permitgate-central register-gateway\n"
            f"user {gateway_id}\n"
            f"topic read {prefix}/gw/{gateway_id}/in/#\n"
            f"topic write {prefix}/gw/{gateway_id}/out/#\n"
            f"topic read {topics.outbound('status')}\n"
            f"topic read {topics.broadcast_revocations}\n")


def _usage(message: str) -> CentralUsageError:
    return CentralUsageError(f"register-gateway: {message}")


def read_request(path: Path, fingerprint: str) -> bundles.GatewayRequest:
    """The request in ``path`` if it is one and its keys have the fingerprint the
    installer gave (``CentralUsageError`` otherwise)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _usage(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        request = bundles.parse_request(data)
    except bundles.BundleError as exc:
        raise _usage(f"{path}: {exc}") from None
    try:
        named, given = bundles.read_fingerprint(fingerprint)
    except bundles.BundleError as exc:
        raise _usage(f"--fingerprint: {exc}") from None
    if named is not None and named != request.gateway_id:
        raise _usage(f"--fingerprint names gateway {named}, but {path} is the request of "
                     f"{request.gateway_id}")
    try:
        csr = x509.load_pem_x509_csr(request.csr.encode())
        public = csr.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        computed = bundles.request_fingerprint(
            request.gateway_id, request.site_id, public, bundles.raw_key(request.signing_key),
            bundles.raw_key(request.seal_key))
    except ValueError as exc:
        raise _usage(f"{path}: the certificate request does not load: {exc}") from None
    if computed != request.fingerprint:
        raise _usage(f"{path}: its keys do not match the fingerprint written in it: the "
                     "file was changed after the gateway made it; do not register it")
    if computed != given:
        raise _usage(f"{path}: its keys do not have the fingerprint {given}: it is not the "
                     "request the gateway made (or the fingerprint was mistyped); do not "
                     "register it")
    return request


@dataclass(frozen=True, slots=True)
class _Checked:
    """Everything gathered before the first write."""

    request: bundles.GatewayRequest
    ca: pki.KeyCert
    certificate: x509.Certificate
    site_key: bytes
    site_key_file: Path | None
    trusted_keys: str
    office_seal: str | None


def _check(central: Central, request: bundles.GatewayRequest, *, site: str | None,
           pki_dir: Path, site_key: Path | None, acl_file: Path | None,
           days: int) -> _Checked:
    folder = central.folder
    gateway = request.gateway_id
    if site is not None and site != request.site_id:
        raise _usage(f"--site {site}: the gateway was provisioned for site "
                     f"{request.site_id}")
    if gateway in central.gateways() or (folder / GATEWAYS_DIR / f"{gateway}.json").exists():
        raise _usage(f"gateway {gateway!r} is registered already: a gateway id is given "
                     "once; provision the new gateway under another id")
    if acl_file is not None:
        try:
            users = [line.split() for line in acl_file.read_text("utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise _usage(f"--acl-file {acl_file}: cannot read it: {exc}") from None
        if ["user", gateway] in users:
            raise _usage(f"--acl-file {acl_file}: has a 'user {gateway}' block already")
    trusted = folder / TRUSTED_KEYS_NAME
    if not trusted.is_file():
        raise _usage(f"{trusted}: missing (create the office's keys with "
                     f"'permitgate-central keygen {folder}')")
    seal_public = folder / SEAL_PUBLIC_NAME
    office_seal = seal_public.read_text("ascii").strip() if seal_public.is_file() else None
    try:
        ca = pki.load_pem(pki_dir, "ca")
        csr = x509.load_pem_x509_csr(request.csr.encode())
        certificate = pki.sign_client_csr(ca, csr, gateway, days=days)
    except pki.PkiError as exc:
        raise _usage(f"--pki {pki_dir}: {exc}") from None
    if site_key is None:
        key = secrets.token_bytes(SITE_KEY_BYTES)
    else:
        try:
            key = read_key(site_key)
        except SecretError as exc:
            raise _usage(f"--site-key: {exc}") from None
    return _Checked(request, ca, certificate, key, site_key, trusted.read_text("utf-8"),
                    office_seal)


def _write_new(path: Path, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _response(checked: _Checked) -> bundles.GatewayResponse:
    request = checked.request
    ca_cert = checked.ca[1]
    seal_raw = None if checked.office_seal is None else bundles.raw_key(checked.office_seal)
    office = bundles.office_fingerprint(ca_cert.public_bytes(serialization.Encoding.DER),
                                        checked.trusted_keys, seal_raw)
    gateway_seal = X25519PublicKey.from_public_bytes(bundles.raw_key(request.seal_key))
    return bundles.GatewayResponse(
        format=bundles.RESPONSE_FORMAT, gateway_id=request.gateway_id,
        site_id=request.site_id, request_fingerprint=request.fingerprint,
        certificate=checked.certificate.public_bytes(serialization.Encoding.PEM).decode(),
        ca=ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
        trusted_keys=checked.trusted_keys, office_seal_key=checked.office_seal,
        sealed_site_key=bundles.seal_site_key(gateway_seal, checked.site_key,
                                              gateway_id=request.gateway_id,
                                              request=request.fingerprint),
        office_fingerprint=office)


def register_gateway(central: Central, bundle: Path, fingerprint: str, *,
                     site: str | None = None, pki_dir: Path | None = None,
                     site_key: Path | None = None, out: Path | None = None,
                     acl_file: Path | None = None, days: int = pki.CLIENT_DAYS
                     ) -> Registration:
    """Check the request in ``bundle`` against ``fingerprint``, sign its certificate with
    the CA in ``pki_dir`` (default ``<folder>/pki``), record the gateway (``add_gateway``,
    with ``site_key`` or a new key), and write the response (default beside the request,
    ``<gateway>.response.json``) and the ACL entry (appended to ``acl_file`` too when
    given). ``CentralUsageError`` before anything is written when a check fails."""
    folder = central.folder
    request = read_request(bundle, fingerprint)
    checked = _check(central, request, site=site, pki_dir=pki_dir or folder / PKI_DIR,
                     site_key=site_key, acl_file=acl_file, days=days)
    gateway = request.gateway_id
    response = _response(checked)
    response_path = out or bundle.with_name(f"{gateway}.response.json")
    try:
        # Made empty now, so that a place it cannot go stops the registration unmade.
        _write_new(response_path, "")
    except FileExistsError:
        raise _usage(f"{response_path}: exists already; give --out FILE") from None
    except OSError as exc:
        raise _usage(f"{response_path}: cannot write the response there: "
                     f"{exc.strerror}") from None
    try:
        central.add_gateway(gateway, request.site_id,
                            checked.site_key_file.resolve() if checked.site_key_file
                            else checked.site_key)
    except BaseException:
        response_path.unlink(missing_ok=True)
        raise
    records = folder / GATEWAYS_DIR
    records.mkdir(mode=0o700, exist_ok=True)
    cert = checked.certificate
    when = dt.datetime.now(dt.UTC)
    record = records / f"{gateway}.json"
    _write_new(record, json.dumps({
        "gateway_id": gateway, "site_id": request.site_id,
        "signing_key": request.signing_key, "seal_key": request.seal_key,
        "request_fingerprint": request.fingerprint,
        "certificate_serial": format(cert.serial_number, "x"),
        "certificate_not_after": cert.not_valid_after_utc.isoformat(),
        "certificate": response.certificate,
        "registered": when.isoformat(timespec="seconds")}, indent=2) + "\n")
    entry = acl_entry(gateway, request.site_id)
    acl_dir = folder / ACL_DIR
    acl_dir.mkdir(mode=0o700, exist_ok=True)
    own_acl = acl_dir / f"{gateway}.acl"
    own_acl.write_text(entry, "utf-8")
    written = [own_acl]
    if acl_file is not None:
        with acl_file.open("a", encoding="utf-8") as acl:
            acl.write("\n" + entry)
        written.append(acl_file)
    response_path.write_bytes(bundles.dump(response))
    return Registration(gateway, request.site_id, cert, response_path, record, entry,
                        tuple(written), checked.site_key_file, response.office_fingerprint)


# -- the command ---------------------------------------------------------------------------


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of days, at least 1")
    return int(text)


def add_register_command(sub: Any, common: argparse.ArgumentParser,
                         central: Callable[[argparse.Namespace], Central]) -> None:
    """Register ``register-gateway`` on ``permitgate-central``'s subparsers."""
    p = sub.add_parser("register-gateway", parents=[common], help="register a gateway from "
                       "the request 'permitgate provision' made on it")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="the gateway's request file")
    p.add_argument("--fingerprint", metavar="FP", help="the fingerprint the gateway showed "
                   "(as read out, or its QR code's text); required unless --renew")
    p.add_argument("--renew", action="store_true", help="BUNDLE is a renewal ('permitgate "
                   "provision --renew'): check it against the signing key recorded at "
                   "registration and sign the new certificate")
    p.add_argument("--site", help="refuse a request for any other site")
    p.add_argument("--pki", type=Path, metavar="FOLDER", help="the site PKI folder with "
                   f"ca.key and ca.crt (default DIR/{PKI_DIR})")
    p.add_argument("--site-key", type=Path, metavar="FILE", help="the building's existing "
                   "site key (default: a new one)")
    p.add_argument("--out", type=Path, metavar="FILE", help="the response (default "
                   "GATEWAY.response.json beside BUNDLE)")
    p.add_argument("--acl-file", type=Path, metavar="FILE", help="also append the "
                   "gateway's entry to this broker ACL file")
    p.add_argument("--days", type=_positive, default=pki.CLIENT_DAYS,
                   help=f"certificate validity (default {pki.CLIENT_DAYS})")
    p.set_defaults(func=lambda args, out: cmd_register_gateway(args, out, central))


def cmd_register_gateway(args: argparse.Namespace, out: TextIO,
                         central: Callable[[argparse.Namespace], Central]) -> int:
    """Register a provisioned gateway; print what was done and its ACL entry."""
    if args.renew:
        return cmd_renew_gateway(args, out, central)
    if args.fingerprint is None:
        raise _usage("--fingerprint: give the fingerprint the gateway showed (or --renew "
                     "for a renewal)")
    with central(args) as office:
        done = register_gateway(office, args.bundle, args.fingerprint, site=args.site,
                                pki_dir=args.pki, site_key=args.site_key, out=args.out,
                                acl_file=args.acl_file, days=args.days)
        folder = office.folder
    cert = done.certificate
    key = (f"the building's key from {done.site_key}" if done.site_key
           else f"a new one, kept in {folder / 'site-keys' / (done.gateway_id + '.key')}")
    out.write(f"registered gateway {done.gateway_id} (site {done.site_id})\n"
              f"  certificate  serial {cert.serial_number:x}, valid until "
              f"{cert.not_valid_after_utc:%Y-%m-%d} UTC\n"
              f"  site key     {key}; sealed to the gateway\n"
              f"  public keys  {done.record}\n"
              f"  response     {done.response}: give it to the installer ('permitgate "
              f"provision --accept {done.response.name}')\n"
              f"office fingerprint  {done.office_fingerprint} (the installer may check it: "
              "--office-fingerprint)\n\n"
              f"broker ACL entry, in {', '.join(map(str, done.acl_files))}; reload the broker "
              "once it is in its ACL file:\n" + done.acl_entry)
    return 0


def cmd_renew_gateway(args: argparse.Namespace, out: TextIO,
                      central: Callable[[argparse.Namespace], Central]) -> int:
    """Renew a registered gateway's certificate (``provisioning.renew``)."""
    given = [option for option, value in (("--fingerprint", args.fingerprint),
                                          ("--site-key", args.site_key),
                                          ("--acl-file", args.acl_file)) if value is not None]
    if given:
        raise _usage(f"--renew takes none of {', '.join(given)}: the gateway's keys, site key "
                     "and ACL entry stay as registered")
    with central(args) as office:
        done = renew_gateway(office, args.bundle, site=args.site, pki_dir=args.pki,
                             out=args.out, days=args.days)
    cert = done.certificate
    out.write(f"renewed the certificate of gateway {done.gateway_id} (site {done.site_id})\n"
              f"  certificate  serial {cert.serial_number:x}, valid until "
              f"{cert.not_valid_after_utc:%Y-%m-%d} UTC (replaces serial "
              f"{done.replaced_serial}, which stays valid until it expires)\n"
              f"  record       {done.record}\n"
              f"  response     {done.response}: give it to the installer ('permitgate "
              f"provision --accept {done.response.name}')\n")
    return 0

