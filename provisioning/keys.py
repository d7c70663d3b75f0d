"""The office's keys: signing keys (and their rotation), the permit key, site keys.

In the central folder:

- ``signing/<kid>.pem``: Ed25519 private keys (mode 0600); the first key listed in
  ``trusted-keys.txt`` whose private key is here signs (rotation: ``rotate-key``, which
  announces the new key to every gateway, then ``rotate-key --retire OLD``:
  ``provisioning.rotation``);
- ``trusted-keys.txt``: ``<kid> <base64 public key>`` lines, installed on every gateway;
- ``permit.key``: 32 random bytes (hex, mode 0600) under which permit numbers are hashed
  for every building, so one broadcast revocation covers them all;
- ``seal.key``: the X25519 private key (PKCS#8 PEM, mode 0600) that opens the permit
  numbers gateways seal to the office (``protocol.sealing``), and ``office-seal.pub``, its
  public key as gateways install it (``[enrollment] seal_key``): standard base64 of the 32
  raw bytes. Made once, like the permit key: replacing it means installing the new
  public key on every gateway, and enrollments sealed to the old one no longer open;
- ``site-keys/<gateway>.key``: a building's site key handed to ``add_gateway`` as bytes
  (mode 0600); a key given as a path stays in its own file, read when needed.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel

from protocol import ids
from protocol.hashing import SITE_KEY_BYTES, CredentialHasher, SecretError, parse_key, read_key
from protocol.sealing import public_key_text
from protocol.signing import sign
from provisioning.errors import CentralUsageError

TRUSTED_KEYS_NAME = "trusted-keys.txt"
PERMIT_KEY_NAME = "permit.key"
SEAL_KEY_NAME = "seal.key"
SEAL_PUBLIC_NAME = "office-seal.pub"
SIGNING_DIR = "signing"
SITE_KEYS_DIR = "site-keys"
DEFAULT_KID = "central-1"


@dataclass(frozen=True, slots=True)
class KeygenResult:
    """What ``keygen`` wrote."""

    kid: str
    private_key: Path
    trusted_keys: Path
    public_key_b64: str
    permit_key: Path
    permit_key_created: bool
    seal_key: Path
    seal_public: Path
    """``office-seal.pub``: what every gateway that enrolls tenants installs."""
    seal_key_created: bool
    signing_key_created: bool = True
    """False when ``kid`` was listed already and only the seal key pair was missing (a
    folder made before enrollments existed)."""


def create_secret(path: Path, text: str) -> None:
    """Write ``text`` to a new file of mode 0600; never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def listed_kids(path: Path) -> list[str]:
    """The key ids listed in a ``trusted-keys.txt``, in order (none if it is missing)."""
    if not path.exists():
        return []
    kids = []
    for line in path.read_text("utf-8").splitlines():
        parts = line.split("#", 1)[0].split()
        if parts:
            kids.append(parts[0])
    return kids


def _listed_key(path: Path, kid: str) -> str:
    """The base64 public key listed for ``kid`` in a ``trusted-keys.txt``."""
    for line in path.read_text("utf-8").splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 2 and parts[0] == kid:
            return parts[1]
    raise CentralUsageError(f"{path}: key id {kid!r} is not listed")


def seal_keygen(folder: Path) -> bool:
    """Create the seal key pair in ``folder`` unless it exists; whether it was created.

    ``office-seal.pub`` is written again from ``seal.key`` when only it is missing; a
    public key without its private key is refused (whatever was sealed to it is lost).
    """
    private, public = folder / SEAL_KEY_NAME, folder / SEAL_PUBLIC_NAME
    if private.exists():
        if not public.exists():
            public.write_text(public_key_text(OfficeKeys(folder).seal_key().public_key())
                              + "\n", "ascii")
        return False
    if public.exists():
        raise CentralUsageError(f"{public}: exists without {private.name}, whose private key "
                                "is lost; move it away to make a new pair (then install the "
                                "new one on every gateway)")
    key = X25519PrivateKey.generate()
    create_secret(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode("ascii"))
    # Public: a gateway installs it; 0644 inside the 0700 folder.
    fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(public_key_text(key.public_key()) + "\n")
    return True


def keygen(folder: Path, kid: str = DEFAULT_KID) -> KeygenResult:
    """Create a signing key ``kid`` (and, once, the permit key and the seal key pair) in
    ``folder``.

    Refuses to overwrite an existing key or to list a key id twice, except that on a
    folder made before the seal key existed, ``kid`` listed already, it creates only the
    seal key pair. The permit key and the seal key are created only when missing:
    replacing the one would change every permit hash, the other every gateway's
    ``office-seal.pub``.
    """
    if not ids.KEY_ID_RE.match(kid):
        raise CentralUsageError(f"--kid {kid!r}: use 1-64 letters, digits, '.', '_', '-'")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (folder / SIGNING_DIR).mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise CentralUsageError(f"{folder}: cannot create the folder: {exc.strerror}") from None
    trusted = folder / TRUSTED_KEYS_NAME
    private = folder / SIGNING_DIR / f"{kid}.pem"
    permit = folder / PERMIT_KEY_NAME
    listed = kid in listed_kids(trusted)
    if listed and (folder / SEAL_KEY_NAME).exists():
        raise CentralUsageError(f"{trusted}: key id {kid!r} is listed already; choose "
                                "another --kid")
    sealed = seal_keygen(folder)
    if listed:
        return KeygenResult(kid, private, trusted, _listed_key(trusted, kid), permit, False,
                            folder / SEAL_KEY_NAME, folder / SEAL_PUBLIC_NAME, sealed,
                            signing_key_created=False)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode("ascii")
    try:
        create_secret(private, pem)
    except FileExistsError:
        raise CentralUsageError(f"{private}: exists already; refusing to overwrite a key "
                                "(choose another --kid)") from None
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    public = base64.b64encode(raw).decode("ascii")
    with trusted.open("a", encoding="utf-8") as out:
        out.write(f"{kid} {public}\n")
    created = False
    try:
        create_secret(permit, secrets.token_bytes(SITE_KEY_BYTES).hex() + "\n")
        created = True
    except FileExistsError:
        pass
    return KeygenResult(kid, private, trusted, public, permit, created,
                        folder / SEAL_KEY_NAME, folder / SEAL_PUBLIC_NAME, sealed)


def permit_hash(permit_key: bytes, permit_number: str) -> bytes:
    """HMAC-SHA256(permit key, ``"permit\\0"`` + the trimmed, upper-cased permit number).

    The same construction as ``CredentialHasher.permit``, under the office-wide permit key
    instead of a site key, so a permit hashes the same in every building.
    """
    return CredentialHasher(permit_key).permit(permit_number)


class OfficeKeys:
    """The keys of one central folder, each read once when first needed."""

    def __init__(self, folder: Path, signing_kid: str | None = None) -> None:
        self.folder = folder
        self._signing_kid = signing_kid
        self._signer: tuple[str, Ed25519PrivateKey] | None = None
        self._permit_key: bytes | None = None
        self._seal_key: X25519PrivateKey | None = None

    def signing(self) -> tuple[str, Ed25519PrivateKey]:
        """The key id and private key that sign (``--signing-kid``, else by rotation)."""
        if self._signer is not None:
            return self._signer
        trusted = self.folder / TRUSTED_KEYS_NAME
        kids = listed_kids(trusted)
        if self._signing_kid is not None:
            if not ids.KEY_ID_RE.match(self._signing_kid):
                raise CentralUsageError(f"--signing-kid {self._signing_kid!r}: not a key id")
            candidates = [self._signing_kid]
        else:
            # The OLDEST listed key that has its private key here signs, so a key added by
            # 'keygen --kid NEW' is not used before gateways have a trusted-keys.txt that
            # lists it; the switch happens when the old private key is moved away.
            candidates = [k for k in kids if (self.folder / SIGNING_DIR / f"{k}.pem").exists()]
        if not candidates:
            raise CentralUsageError(f"{self.folder}: no signing key (create one with "
                                    f"'permitgate-central keygen {self.folder}')")
        kid = candidates[0]
        path = self.folder / SIGNING_DIR / f"{kid}.pem"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise CentralUsageError(f"{path}: signing key {kid!r} not found") from None
        except (OSError, ValueError, TypeError) as exc:
            raise CentralUsageError(f"{path}: not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise CentralUsageError(f"{path}: not an Ed25519 key")
        if kid not in kids:
            raise CentralUsageError(f"{trusted}: signing key {kid!r} is not listed, so no "
                                    "gateway would trust it")
        self._signer = (kid, key)
        return self._signer

    def reload(self) -> None:
        """Forget the signing key read: the next message is signed by the key the folder
        names now (after a retirement, ``provisioning.rotation``)."""
        self._signer = None

    def sign(self, topic: str, body: BaseModel) -> bytes:
        """``body`` in a signed envelope bound to ``topic`` (``protocol.signing``)."""
        kid, key = self.signing()
        return sign(key, kid, topic, body)

    def permit_key(self) -> bytes:
        """The office-wide permit key."""
        if self._permit_key is None:
            path = self.folder / PERMIT_KEY_NAME
            try:
                self._permit_key = parse_key(path.read_bytes(), path)
            except FileNotFoundError:
                raise CentralUsageError(f"{path}: permit key not found (create it with "
                                        f"'permitgate-central keygen {self.folder}')"
                                        ) from None
            except SecretError as exc:
                raise CentralUsageError(str(exc)) from None
        return self._permit_key

    def seal_key(self) -> X25519PrivateKey:
        """The private key that opens permit numbers sealed to the office."""
        if self._seal_key is None:
            path = self.folder / SEAL_KEY_NAME
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except FileNotFoundError:
                raise CentralUsageError(f"{path}: seal key not found (create it with "
                                        f"'permitgate-central keygen {self.folder}')"
                                        ) from None
            except (OSError, ValueError, TypeError) as exc:
                raise CentralUsageError(f"{path}: not a PEM private key: {exc}") from None
            if not isinstance(key, X25519PrivateKey):
                raise CentralUsageError(f"{path}: not an X25519 key")
            self._seal_key = key
        return self._seal_key

    def permit_hash(self, permit_number: str) -> bytes:
        """``permit_hash`` under this office's permit key."""
        return permit_hash(self.permit_key(), permit_number)

    def site_hasher(self, gateway: str, site_key_path: str) -> CredentialHasher:
        """The credential hasher of ``gateway``'s building, from its site-key file."""
        try:
            return CredentialHasher(read_key(Path(site_key_path)))
        except SecretError as exc:
            raise CentralUsageError(f"gateway {gateway}: {exc}") from None

    def site_key_file(self, gateway: str, site_key: bytes | Path) -> Path:
        """Where ``gateway``'s site key is kept: ``site_key`` itself when it is a path (it
        must hold a key), else ``site-keys/<gateway>.key``, written now (or found holding
        the same key)."""
        if isinstance(site_key, bytes):
            if len(site_key) != SITE_KEY_BYTES:
                raise CentralUsageError(f"site key: must be {SITE_KEY_BYTES} bytes")
            folder = self.folder / SITE_KEYS_DIR
            folder.mkdir(mode=0o700, exist_ok=True)
            path = folder / f"{gateway}.key"
            if path.exists():
                if read_key(path) != site_key:
                    raise CentralUsageError(f"{path}: holds a different site key")
            else:
                create_secret(path, site_key.hex() + "\n")
            return path
        path = site_key.resolve()
        try:
            read_key(path)
        except SecretError as exc:
            raise CentralUsageError(f"--site-key: {exc}") from None
        return path
