"""The site PKI of a building's broker: one CA, the broker's server certificate, and one
client certificate per gateway plus one for the central office.

Mosquitto (config/mosquitto/permitgate.conf) requires a client certificate signed by this
CA and takes the certificate's common name as the MQTT username
(``use_identity_as_username``); the ACL (config/mosquitto/acl) keys every topic on that
username. So the CN of a gateway certificate *is* its gateway id, and ``central`` is the
office. Keys are EC P-256: small, fast on a Pi-class CPU, supported by every TLS stack
Mosquitto and paho link against.

Usage::

    python -m provisioning.pki init FOLDER --broker-host HOST [--broker-host HOST2 ...]
    python -m provisioning.pki client FOLDER GATEWAY_ID

    python -m provisioning.pki crl FOLDER

``init`` writes ``ca``, ``server`` (for the broker) and ``central`` (for the office) key
pairs into FOLDER and an empty certificate revocation list ``crl.pem``; ``client`` writes
``GATEWAY_ID.key``/``.crt`` signed by FOLDER's CA; ``crl`` writes ``crl.pem`` again (for a
folder made before it existed), keeping what it revokes. No existing key or certificate is
ever overwritten.

The CRL is the broker's ``crlfile``: ``permitgate-central remove-gateway`` adds a lost
gateway's certificates to it (``revoke``) and the broker, once restarted with it, refuses
their TLS handshake. It is signed by the CA and valid until the CA expires (OpenSSL refuses
every client certificate when the CRL it was given has passed its next update).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey
KeyCert = tuple[Key, x509.Certificate]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CA_DAYS = 3650
CLIENT_DAYS = 730
SERVER_DAYS = 730
CENTRAL = "central"
"""The CN (hence MQTT username) of the central office's certificate."""

BACKDATE = dt.timedelta(days=1)
"""Certificates start this long before they are made. A Pi has no real-time clock: until
NTP answers it runs on fake-hwclock's last saved time, which is behind by however long it
was off; a certificate "not yet valid" on such a clock would stop the TLS handshake."""

GATEWAY_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
"""Same rule as ``agent.wire.Ident``. It also keeps the CN usable in the ACL: Mosquitto
substitutes it for ``%u`` as a whole topic level, so it must not contain ``/``, ``+``, ``#``."""

RESERVED = frozenset({CENTRAL, "ca", "server"})
"""Names a gateway may not take: ``central`` would receive the office's topics through the
ACL patterns, and ``ca``/``server`` are file names in the PKI folder."""


class PkiError(Exception):
    """A refused request (bad argument, missing CA, a file that would be overwritten)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "permitgate"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _check_days(days: int) -> None:
    if days < 1:
        raise PkiError(f"validity must be at least 1 day, not {days}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def make_ca(common_name: str, *, days: int = CA_DAYS) -> KeyCert:
    """A new self-signed CA valid for ``days`` days that may sign leaf certificates only."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = _name(common_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca: KeyCert, common_name: str, days: int, usage: x509.ObjectIdentifier,
          san: x509.SubjectAlternativeName | None) -> KeyCert:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _leaf_cert(ca, key.public_key(), common_name, days, usage, san=san)


def _leaf_cert(ca: KeyCert, public: ec.EllipticCurvePublicKey, common_name: str, days: int,
               usage: x509.ObjectIdentifier, *,
               san: x509.SubjectAlternativeName | None) -> x509.Certificate:
    _check_days(days)
    ca_key, ca_cert = ca
    now = _now()
    # A certificate outliving its CA would never verify after the CA expires; cap it.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_server_cert(ca: KeyCert, hostnames: Sequence[str],
                     ips: Sequence[str | IpAddress] = (), *,
                     days: int = SERVER_DAYS) -> KeyCert:
    """The broker's certificate: serverAuth, with every name and address clients dial."""
    addresses = [ipaddress.ip_address(ip) if isinstance(ip, str) else ip for ip in ips]
    if not hostnames and not addresses:
        raise PkiError("a server certificate needs at least one host name or IP address")
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(a) for a in addresses]
    common_name = hostnames[0] if hostnames else str(addresses[0])
    return _leaf(ca, common_name, days, ExtendedKeyUsageOID.SERVER_AUTH,
                 x509.SubjectAlternativeName(names))


def make_client_cert(ca: KeyCert, common_name: str, *, days: int = CLIENT_DAYS) -> KeyCert:
    """A clientAuth certificate whose CN is the MQTT username: a gateway id, or
    ``central`` for the office."""
    if common_name != CENTRAL and not GATEWAY_ID.fullmatch(common_name):
        raise PkiError(f"not a valid gateway id: {common_name!r} "
                       f"(lower-case letters, digits, '-', '_'; at most 63 characters)")
    return _leaf(ca, common_name, days, ExtendedKeyUsageOID.CLIENT_AUTH, None)


def check_ca_current(ca_cert: x509.Certificate, now: dt.datetime | None = None) -> None:
    """``PkiError`` unless ``ca_cert`` is a CA certificate valid at ``now``."""
    when = now or _now()
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        raise PkiError("the CA certificate is not a CA")
    if when >= ca_cert.not_valid_after_utc:
        raise PkiError(f"the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
                       "it can sign nothing a broker would accept; a new site CA means new "
                       "certificates for the broker, the office and every gateway")
    if when < ca_cert.not_valid_before_utc:
        start = ca_cert.not_valid_before_utc
        raise PkiError(f"the CA is not valid before {start:%Y-%m-%d %H:%M} UTC (check this "
                       "machine's clock)")


def sign_client_csr(ca: KeyCert, csr: x509.CertificateSigningRequest, common_name: str, *,
                    days: int = CLIENT_DAYS) -> x509.Certificate:
    """A clientAuth certificate for the key of ``csr``, whose CN must be ``common_name``
    (a gateway id). Only the key is taken from the request: its other names and any
    extensions it asks for are ignored, the certificate is built as ``make_client_cert``
    builds one."""
    if common_name in RESERVED or not GATEWAY_ID.fullmatch(common_name):
        raise PkiError(f"not a valid gateway id: {common_name!r} (lower-case letters, "
                       "digits, '-', '_'; at most 63 characters; not "
                       f"{', '.join(sorted(RESERVED))})")
    if not csr.is_signature_valid:
        raise PkiError("the certificate request's signature does not verify")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [common_name]:
        raise PkiError(f"the certificate request is for {[n.value for n in names]!r}, not "
                       f"for {common_name!r}")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            not isinstance(public.curve, ec.SECP256R1):
        raise PkiError("the certificate request's key is not EC P-256")
    check_ca_current(ca[1])
    return _leaf_cert(ca, public, common_name, days, ExtendedKeyUsageOID.CLIENT_AUTH, san=None)


def pem_paths(folder: Path, name: str) -> tuple[Path, Path]:
    """Where ``write_pem`` puts the key and the certificate called ``name``."""
    return folder / f"{name}.key", folder / f"{name}.crt"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never replace a file, even one that appeared after the caller's check.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pem(folder: Path, name: str, key: Key, cert: x509.Certificate) -> tuple[Path, Path]:
    """Write ``<name>.key`` (PKCS#8, unencrypted, mode 0600) and ``<name>.crt`` into
    ``folder``; raise ``FileExistsError`` rather than overwrite either."""
    key_path, cert_path = pem_paths(folder, name)
    for path in (key_path, cert_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    # Unencrypted: the broker and the agent start unattended, with nobody to type a
    # passphrase; the file mode is the protection.
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_new(key_path, key_pem, 0o600)
    key_path.chmod(0o600)  # exactly 0600 whatever the umask took away
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key_path, cert_path


def load_pem(folder: Path, name: str) -> KeyCert:
    """Read back a key pair written by ``write_pem``."""
    key_path, cert_path = pem_paths(folder, name)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"{exc.filename} not found") from exc
    except ValueError as exc:
        raise PkiError(f"cannot read {name} in {folder}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC private key")
    return key, cert


CRL_NAME = "crl.pem"


def crl_path(folder: Path) -> Path:
    """Where ``revoke`` keeps the CRL."""
    return folder / CRL_NAME


def _crl_entries(folder: Path, ca_cert: x509.Certificate
                 ) -> tuple[list[x509.RevokedCertificate], int]:
    """The entries of the CRL in ``folder`` (checked against the CA) and its number."""
    path = crl_path(folder)
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        return [], 0
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM CRL: {exc}") from exc
    public = ca_cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            not crl.is_signature_valid(public):
        raise PkiError(f"{path}: not signed by the CA in {folder}")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return list(crl), number


def revoke(folder: Path, serials: Sequence[int] = ()) -> Path:
    """Write ``crl.pem`` in ``folder``: what it revoked before and ``serials`` (each once),
    signed by the folder's CA, valid until the CA expires. With no serials it writes the
    same list again (an empty one for a new folder)."""
    ca_key, ca_cert = load_pem(folder, "ca")
    entries, number = _crl_entries(folder, ca_cert)
    now = _now()
    known = {entry.serial_number for entry in entries}
    for serial in dict.fromkeys(serials):
        if serial not in known:
            entries.append(x509.RevokedCertificateBuilder().serial_number(serial)
                           .revocation_date(now).build())
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - BACKDATE)
               .next_update(ca_cert.not_valid_after_utc)
               .add_extension(x509.CRLNumber(number + 1), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    path = crl_path(folder)
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    _write_new(tmp, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    tmp.replace(path)
    return path


def revoked_serials(folder: Path) -> set[int]:
    """The serial numbers the CRL in ``folder`` revokes (none without one)."""
    return {entry.serial_number for entry in _crl_entries(folder, load_pem(folder, "ca")[1])[0]}


def _refuse_existing(folder: Path, names: Sequence[str]) -> None:
    for name in names:
        for path in pem_paths(folder, name):
            if path.exists():
                raise PkiError(f"{path} already exists; refusing to overwrite it")


def _init(folder: Path, hosts: Sequence[str], ca_name: str, days: int) -> None:
    hostnames: list[str] = []
    ips: list[IpAddress] = []
    for host in hosts:
        try:
            ips.append(ipaddress.ip_address(host))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
                raise PkiError(f"not a host name or IP address: {host!r}") from None
            hostnames.append(host)
    _check_days(days)
    _refuse_existing(folder, ("ca", "server", CENTRAL))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = make_ca(ca_name)
    write_pem(folder, "ca", *ca)
    write_pem(folder, "server", *make_server_cert(ca, hostnames, ips, days=days))
    write_pem(folder, CENTRAL, *make_client_cert(ca, CENTRAL, days=days))
    revoke(folder)


def _client(folder: Path, gateway: str, days: int) -> None:
    if gateway in RESERVED:
        raise PkiError(f"{gateway!r} is reserved and cannot be a gateway id")
    if not GATEWAY_ID.fullmatch(gateway):
        raise PkiError(f"not a valid gateway id: {gateway!r} "
                       f"(lower-case letters, digits, '-', '_'; at most 63 characters)")
    _check_days(days)
    _refuse_existing(folder, (gateway,))
    ca = load_pem(folder, "ca")
    write_pem(folder, gateway, *make_client_cert(ca, gateway, days=days))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m provisioning.pki",
                                     description="Site PKI for the permitgate broker.")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser(
        "init", help="create the CA, the broker's server certificate and central's")
    init.add_argument("folder", type=Path)
    init.add_argument("--broker-host", action="append", required=True, metavar="HOST",
                      help="a DNS name or IP address gateways dial (repeatable)")
    init.add_argument("--ca-name", default="permitgate site CA")
    init.add_argument("--days", type=int, default=SERVER_DAYS,
                      help="validity of the server and central certificates")
    client = commands.add_parser("client", help="create a gateway's client certificate")
    client.add_argument("folder", type=Path)
    client.add_argument("gateway_id")
    client.add_argument("--days", type=int, default=CLIENT_DAYS)
    crl = commands.add_parser("crl", help=f"write {CRL_NAME} again (the broker's crlfile)")
    crl.add_argument("folder", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 for a refused request)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            _init(args.folder, args.broker_host, args.ca_name, args.days)
            print(f"wrote ca, server and {CENTRAL} keys and certificates and an empty "
                  f"{CRL_NAME} in {args.folder}")
        elif args.command == "crl":
            path = revoke(args.folder)
            print(f"wrote {path} ({len(revoked_serials(args.folder))} revoked); copy it to "
                  "the broker's crlfile and restart the broker")
        else:
            _client(args.folder, args.gateway_id, args.days)
            print(f"wrote {args.gateway_id}.key and {args.gateway_id}.crt in {args.folder}")
    except (PkiError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
