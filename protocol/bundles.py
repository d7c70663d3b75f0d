"""Provisioning bundles: what a new gateway hands the office, and what it gets back.

A gateway makes its own keys (``permitgate provision``) and writes a *request*: its id and
site, a certificate signing request for its TLS key (CN = gateway id), the public halves
of its Ed25519 signing key and of its X25519 key, and a fingerprint over all of them. The
installer carries the file to the office and tells the fingerprint (or shows its QR code);
``permitgate-central register-gateway`` recomputes it from the file, so a request changed
on the way is refused. The *response* carries the certificate the office CA signed, that
CA, the office's trusted signing keys and seal key, and the building's site key sealed to
the gateway's X25519 key (HPKE, as permit numbers are sealed to the office:
``protocol.sealing``), bound to the gateway's id and request. No private key is in either.

Fingerprints are 125 bits of a SHA-256, in 25 characters of Crockford's base32 (no I, L,
O, U) in groups of five, to be read aloud; what is typed back is read leniently (lower
case, ``O`` for ``0``, ``I`` and ``L`` for ``1``, spaces and dashes anywhere). The
response's *office fingerprint* covers the CA and the office keys, the same for every
gateway of the office, so an installer can check the response too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Annotated, Final, Literal, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.hashing import SITE_KEY_BYTES
from protocol.ids import B64Hash, Ident
from protocol.messages import first_error
from protocol.sealing import SUITE

REQUEST_FORMAT: Final = "permitgate-gateway-request/1"
RESPONSE_FORMAT: Final = "permitgate-gateway-response/1"
RENEWAL_FORMAT: Final = "permitgate-gateway-renewal/1"
RENEWED_FORMAT: Final = "permitgate-gateway-renewed/1"
MAX_BUNDLE_BYTES = 64 * 1024
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""Crockford's base32."""
FINGERPRINT_CHARS = 25
QR_PREFIX = "permitgate:"
"""The QR code holds ``permitgate:<gateway id>:<fingerprint>``."""
_REQUEST_TAG = b"permitgate-v1 gateway request"
_OFFICE_TAG = b"permitgate-v1 office"
_SITE_KEY_SEAL_TAG = b"permitgate-v1 site key seal"
_ROTATED_SITE_KEY_TAG = b"permitgate-v1 rotated site key"
_RENEWAL_TAG = b"permitgate-v1 gateway renewal"

Pem = Annotated[str, Field(min_length=64, max_length=8192)]
Fingerprint = Annotated[str, Field(pattern=r"^[0-9A-HJKMNP-TV-Z]{5}(-[0-9A-HJKMNP-TV-Z]{5}){4}$")]


class BundleError(ValueError):
    """A bundle that is not one of ours, or whose contents do not hold together."""


class _Bundle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_B = TypeVar("_B", bound=_Bundle)


class GatewayRequest(_Bundle):
    """The request a new gateway writes for the office (public keys only)."""

    format: Literal["permitgate-gateway-request/1"]
    gateway_id: Ident
    site_id: Ident
    csr: Pem
    """PEM certificate signing request for the TLS key; its CN is ``gateway_id``."""
    signing_key: B64Hash
    """The gateway's Ed25519 public key (32 bytes, base64)."""
    seal_key: B64Hash
    """The gateway's X25519 public key (32 bytes, base64): the site key is sealed to it."""
    fingerprint: Fingerprint


class GatewayResponse(_Bundle):
    """What the office gives back for one request."""

    format: Literal["permitgate-gateway-response/1"]
    gateway_id: Ident
    site_id: Ident
    request_fingerprint: Fingerprint
    certificate: Pem
    ca: Pem
    trusted_keys: Annotated[str, Field(min_length=1, max_length=16384)]
    """The office's ``trusted-keys.txt``."""
    office_seal_key: B64Hash | None
    """The office's X25519 public key (``office-seal.pub``), when it has one."""
    sealed_site_key: Annotated[str, Field(min_length=1, max_length=256)]
    office_fingerprint: Fingerprint


class RenewalRequest(_Bundle):
    """A registered gateway's request for a certificate for its new TLS key, signed with
    its recorded Ed25519 key (public keys and a signature only)."""

    format: Literal["permitgate-gateway-renewal/1"]
    gateway_id: Ident
    site_id: Ident
    csr: Pem
    """PEM certificate signing request for the new TLS key; its CN is ``gateway_id``."""
    made: Annotated[str, Field(min_length=10, max_length=40)]
    """When the gateway made it (ISO 8601, UTC)."""
    fingerprint: Fingerprint
    """``renewal_fingerprint`` of the ids and the new TLS key: the answer names it."""
    signature: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{86}==$")]
    """Ed25519 over ``renewal_payload`` (base64)."""


class RenewalResponse(_Bundle):
    """The office's answer to a renewal: the new certificate and the CA that signed it."""

    format: Literal["permitgate-gateway-renewed/1"]
    gateway_id: Ident
    site_id: Ident
    renewal_fingerprint: Fingerprint
    certificate: Pem
    ca: Pem


# -- fingerprints -------------------------------------------------------------------------


def short_fingerprint(digest: bytes) -> str:
    """The first 125 bits of ``digest`` as five groups of five base32 characters."""
    value = int.from_bytes(digest[:16], "big") >> 3
    chars = "".join(ALPHABET[(value >> (5 * i)) & 31]
                    for i in range(FINGERPRINT_CHARS - 1, -1, -1))
    return "-".join(chars[i:i + 5] for i in range(0, FINGERPRINT_CHARS, 5))


def read_fingerprint(text: str) -> tuple[str | None, str]:
    """``(gateway id or None, fingerprint)`` from what was typed or scanned: a bare
    fingerprint, or the QR code's ``permitgate:<gateway>:<fingerprint>``. ``BundleError``
    when it is neither."""
    gateway = None
    body = text.strip()
    if body.lower().startswith(QR_PREFIX):
        gateway, _, body = body[len(QR_PREFIX):].partition(":")
    chars = body.upper().translate(str.maketrans("OIL", "011", " -\t"))
    if len(chars) != FINGERPRINT_CHARS or any(c not in ALPHABET for c in chars):
        raise BundleError(f"{text!r} is not a fingerprint ({FINGERPRINT_CHARS} characters "
                          "of 0-9 and A-Z without I, L, O, U, in groups of five)")
    return gateway, "-".join(chars[i:i + 5] for i in range(0, FINGERPRINT_CHARS, 5))


def request_fingerprint(gateway_id: str, site_id: str, tls_public_der: bytes,
                        signing_key: bytes, seal_key: bytes) -> str:
    """The fingerprint of a request: the ids, the TLS public key (SubjectPublicKeyInfo,
    DER) and the two raw 32-byte public keys."""
    digest = hashlib.sha256(b"\n".join((_REQUEST_TAG, gateway_id.encode(), site_id.encode(),
                                        tls_public_der)) + signing_key + seal_key).digest()
    return short_fingerprint(digest)


def office_fingerprint(ca_der: bytes, trusted_keys: str, seal_key: bytes | None) -> str:
    """The fingerprint of what a response makes the gateway trust: the CA (DER), the
    trusted keys (their ``<kid> <key>`` lines, comments and spacing dropped) and the
    office's seal key."""
    lines = [" ".join(line.split("#", 1)[0].split()) for line in trusted_keys.splitlines()]
    listed = "\n".join(line for line in lines if line).encode()
    digest = hashlib.sha256(b"\n".join((_OFFICE_TAG, ca_der, listed))
                            + (seal_key or b"")).digest()
    return short_fingerprint(digest)


def renewal_fingerprint(gateway_id: str, site_id: str, tls_public_der: bytes) -> str:
    """The fingerprint of a renewal: the ids and the new TLS public key (DER)."""
    digest = hashlib.sha256(b"\n".join((_RENEWAL_TAG, gateway_id.encode(), site_id.encode(),
                                        tls_public_der))).digest()
    return short_fingerprint(digest)


def renewal_payload(gateway_id: str, site_id: str, csr: str, made: str,
                    fingerprint: str) -> bytes:
    """What a renewal's signature covers: every other field, in order."""
    return b"\n".join((_RENEWAL_TAG, gateway_id.encode(), site_id.encode(), csr.encode(),
                       made.encode(), fingerprint.encode()))


def qr_text(gateway_id: str, fingerprint: str) -> str:
    """What the gateway's QR code holds."""
    return f"{QR_PREFIX}{gateway_id}:{fingerprint}"


def raw_key(text: str) -> bytes:
    """The 32 bytes of a base64 public key field."""
    return base64.b64decode(text, validate=True)


# -- reading bundles -----------------------------------------------------------------------


def _parse(data: bytes, model: type[_B], what: str, expected: str) -> _B:
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"not a {what}: {len(data)} bytes (at most {MAX_BUNDLE_BYTES})")
    try:
        shape = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BundleError(f"not a {what}: not JSON") from None
    found = shape.get("format") if isinstance(shape, dict) else None
    if found != expected:
        raise BundleError(f"not a {what}: format {found!r}, expected {expected!r}")
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise BundleError(f"not a {what} ({expected}): {first_error(exc)}") from None


def parse_request(data: bytes) -> GatewayRequest:
    """A request bundle from its file's bytes; ``BundleError`` naming what is wrong."""
    return _parse(data, GatewayRequest, "gateway request", REQUEST_FORMAT)


def parse_response(data: bytes) -> GatewayResponse:
    """A response bundle from its file's bytes; ``BundleError`` naming what is wrong."""
    return _parse(data, GatewayResponse, "gateway response", RESPONSE_FORMAT)


def parse_renewal(data: bytes) -> RenewalRequest:
    """A renewal request from its file's bytes; ``BundleError`` naming what is wrong."""
    return _parse(data, RenewalRequest, "gateway renewal", RENEWAL_FORMAT)


def parse_renewed(data: bytes) -> RenewalResponse:
    """A renewal's answer from its file's bytes; ``BundleError`` naming what is wrong."""
    return _parse(data, RenewalResponse, "renewal response", RENEWED_FORMAT)


def bundle_format(data: bytes) -> str | None:
    """The ``format`` a bundle file names, or None when it is not a JSON object."""
    try:
        shape = json.loads(data[:MAX_BUNDLE_BYTES + 1])
    except (ValueError, UnicodeDecodeError):
        return None
    found = shape.get("format") if isinstance(shape, dict) else None
    return found if isinstance(found, str) else None


def dump(bundle: _Bundle) -> bytes:
    """A bundle as its file holds it: indented JSON, fields in their order."""
    return (json.dumps(bundle.model_dump(), indent=2) + "\n").encode()


# -- the site key in transit -------------------------------------------------------------


def _seal_info(gateway_id: str, request: str) -> bytes:
    return b"\n".join((_SITE_KEY_SEAL_TAG, gateway_id.encode(), request.encode()))


def seal_site_key(public_key: X25519PublicKey, site_key: bytes, *, gateway_id: str,
                  request: str) -> str:
    """``site_key`` sealed to a gateway's X25519 key, bound to its id and the request's
    fingerprint (base64)."""
    sealed = SUITE.encrypt(site_key, public_key, info=_seal_info(gateway_id, request))
    return base64.b64encode(sealed).decode()


def unseal_site_key(private_key: X25519PrivateKey, sealed: str, *, gateway_id: str,
                    request: str) -> bytes:
    """The site key inside ``sealed``; ``BundleError`` when it does not open for this
    gateway's key, id and request."""
    try:
        return SUITE.decrypt(base64.b64decode(sealed, validate=True), private_key,
                             info=_seal_info(gateway_id, request))
    except (binascii.Error, InvalidTag, ValueError) as exc:
        raise BundleError("the sealed site key does not open with this gateway's key for "
                          "this request") from exc


# -- a rotated site key, on the gateway's ``site`` topic ------------------------------------


def _rotation_info(gateway_id: str, generation: int) -> bytes:
    return b"\n".join((_ROTATED_SITE_KEY_TAG, gateway_id.encode(), str(generation).encode()))


def seal_rotated_site_key(public_key: X25519PublicKey, site_key: bytes, *, gateway_id: str,
                          generation: int) -> str:
    """A rotated ``site_key`` sealed to a gateway's X25519 key, bound to its id and the
    key's generation (base64): only that gateway opens it, and only as that generation."""
    sealed = SUITE.encrypt(site_key, public_key, info=_rotation_info(gateway_id, generation))
    return base64.b64encode(sealed).decode()


def unseal_rotated_site_key(private_key: X25519PrivateKey, sealed: str, *, gateway_id: str,
                            generation: int) -> bytes:
    """The rotated site key inside ``sealed``; ``BundleError`` when it does not open with
    this gateway's key for this id and generation, or is not 32 bytes."""
    try:
        key = SUITE.decrypt(base64.b64decode(sealed, validate=True), private_key,
                            info=_rotation_info(gateway_id, generation))
    except (binascii.Error, InvalidTag, ValueError) as exc:
        raise BundleError(f"the sealed site key of generation {generation} does not open "
                          "with this gateway's seal key") from exc
    if len(key) != SITE_KEY_BYTES:
        raise BundleError(f"the sealed site key of generation {generation} is {len(key)} "
                          f"bytes, not {SITE_KEY_BYTES}")
    return key
