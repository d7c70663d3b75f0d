"""Where everything the agent uses lives, and the secrets it needs, resolved once.

The agent starts in one order (docs/operations.md, "Start-up"): validate the
configuration → resolve every path and secret here → take the data folder's lock → claim
devices → start. ``permitgate run``, ``doctor`` and the runtime share these functions, so
a path means the same file to all of them. Nothing here writes a file or records an event:
a start that fails at this stage leaves no trace but its message.
"""

from __future__ import annotations

import grp
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.config import Config
from agent.keys import load_site_key, resolve_secret_path
from agent.secrets_check import require_private
from agent.sync import TlsFiles
from protocol.hashing import SecretError
from protocol.sealing import load_public_key
from protocol.signing import load_trusted_keys

CONTROL_SOCKET_NAME = "sim.sock"
"""The control socket (``permitgate sim``, enrollment) in the data folder."""
WEB_SOCKET_NAME = "web.sock"
"""The landlord page's control socket (tenant requests only) in the data folder."""
LOCK_NAME = "agent.lock"
"""The data folder's lock file: held by the one agent that runs on the folder."""


def config_dir(config_path: Path | None) -> Path:
    """The folder relative paths in a configuration are taken from."""
    return config_path.parent.resolve() if config_path is not None else Path.cwd()


def resolve_store_path(config: Config, config_path: Path | None) -> Path:
    """The database path; a relative path is taken from the configuration file's folder
    (or the working directory for the embedded defaults)."""
    path = config.store.path
    if path.is_absolute():
        return path
    return (config_dir(config_path) / path).resolve()


@dataclass(frozen=True, slots=True)
class Paths:
    """Every file the agent reads or writes, as absolute paths."""

    config_dir: Path
    store: Path
    data_dir: Path
    """The folder of the database: the lock and the control socket live here too."""
    control_socket: Path
    lock: Path
    site_key: Path
    trusted_keys: Path | None
    """With sync on: the office's public keys."""
    tls: TlsFiles | None
    """With sync on and ``tls = true``."""
    password_file: Path | None
    seal_key: Path | None
    """With enrollment on: the office's public key permit numbers are sealed to."""
    web_socket: Path
    """The landlord page's control socket (``web.sock``)."""
    signing_key: Path
    """This gateway's own Ed25519 private key (``keys.signing_key``)."""
    gateway_seal: Path
    """This gateway's own X25519 private key (``keys.seal_key``)."""


def resolve_paths(config: Config, config_path: Path | None) -> Paths:
    """Resolve every path of ``config`` (reads no file; looks at
    ``$CREDENTIALS_DIRECTORY`` for bare secret names)."""
    store = resolve_store_path(config, config_path)
    cfg_dir = config_dir(config_path)
    data_dir = store.parent

    def secret(name: str) -> Path:
        return resolve_secret_path(name, data_dir, cfg_dir)

    sync = config.sync
    trusted = tls = password = None
    if sync.enabled:
        trusted = secret(sync.trusted_keys)
        if sync.tls:
            tls = TlsFiles(secret(sync.ca_file), secret(sync.cert_file),
                           secret(sync.key_file))
        if sync.password_file:
            password = secret(sync.password_file)
    return Paths(config_dir=cfg_dir, store=store, data_dir=data_dir,
                 control_socket=data_dir / CONTROL_SOCKET_NAME, lock=data_dir / LOCK_NAME,
                 site_key=secret(config.keys.site_key), trusted_keys=trusted, tls=tls,
                 password_file=password,
                 seal_key=secret(config.enrollment.seal_key) if config.enrollment.enabled
                 else None,
                 web_socket=(cfg_dir / config.enrollment.web_socket
                             if config.enrollment.web_socket else data_dir / WEB_SOCKET_NAME),
                 signing_key=secret(config.keys.signing_key),
                 gateway_seal=secret(config.keys.seal_key))


@dataclass(frozen=True, slots=True)
class Secrets:
    """The secrets read and checked before anything starts."""

    site_key: bytes
    trusted_keys: dict[str, Ed25519PublicKey] | None
    tls: TlsFiles | None
    password: str | None
    seal_key: X25519PublicKey | None
    """None when enrollment is off, or its key is not installed yet (enrollments are then
    refused with a message saying so; ``doctor`` reports it)."""
    web_group: int | None
    """The landlord page's group id, when configured."""
    signing_key: Ed25519PrivateKey | None
    """This gateway's Ed25519 key, which signs its enrollments; None when its file does not
    exist (a gateway installed before ``permitgate provision`` existed)."""
    gateway_seal: X25519PrivateKey | None
    """This gateway's X25519 key, which opens what the office seals to it; None when its
    file does not exist."""


def _read_own_key(path: Path, setting: str, role: str) -> PrivateKeyTypes | None:
    """A private key of this gateway's (PEM, as ``permitgate provision`` writes it), or
    None when ``path`` does not exist; ``SecretError`` naming ``setting`` and the file when
    it is readable by others, cannot be read, or holds no unencrypted private key."""
    try:
        require_private(path, what=f"gateway {role} key")
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        # Not there: its folder is missing, or a file (the store folder's own error
        # names that, once the secrets are read).
        return None
    except SecretError as exc:
        raise SecretError(f"{setting}: {exc}") from None
    except OSError as exc:
        raise SecretError(f"{setting}: {path}: cannot read it: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SecretError(f"{setting}: {path}: not a PEM private key (an unencrypted key, "
                          "as 'permitgate provision' writes it)") from None


def _wrong_type(setting: str, path: Path, key: PrivateKeyTypes, wanted: str) -> SecretError:
    return SecretError(f"{setting}: {path}: holds another type of key "
                       f"({type(key).__name__}), not an {wanted} private key")


def load_signing_key(path: Path) -> Ed25519PrivateKey | None:
    """The gateway's Ed25519 key (``keys.signing_key``); None when its file does not
    exist, ``SecretError`` naming the setting and file when it is not usable."""
    key = _read_own_key(path, "keys.signing_key", "signing")
    if key is None or isinstance(key, Ed25519PrivateKey):
        return key
    raise _wrong_type("keys.signing_key", path, key, "Ed25519")


def load_gateway_seal(path: Path) -> X25519PrivateKey | None:
    """The gateway's X25519 key (``keys.seal_key``); None when its file does not exist,
    ``SecretError`` naming the setting and file when it is not usable."""
    key = _read_own_key(path, "keys.seal_key", "seal")
    if key is None or isinstance(key, X25519PrivateKey):
        return key
    raise _wrong_type("keys.seal_key", path, key, "X25519")


def load_secrets(config: Config, paths: Paths) -> Secrets:
    """Read and check every secret; ``SecretError`` naming the key and file otherwise.

    The site key and the gateway's own private keys must be private to the agent's user
    (``require_private``); TLS files are loaded into a TLS context here, so a certificate
    that does not parse or a key that does not match it stops the start before anything is
    recorded.
    """
    require_private(paths.site_key)
    site_key = load_site_key(paths.site_key, generate_missing=config.keys.generate_missing)
    trusted = None
    if paths.trusted_keys is not None:
        try:
            trusted = load_trusted_keys(paths.trusted_keys)
        except (OSError, ValueError) as exc:
            raise SecretError(f"sync.trusted_keys: {exc}") from exc
    if paths.tls is not None:
        check_tls(paths.tls)
    password = None
    if paths.password_file is not None:
        try:
            password = paths.password_file.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretError(f"sync.password_file: {paths.password_file}: {exc}") from exc
    seal_key = None
    if paths.seal_key is not None and paths.seal_key.exists():
        try:
            seal_key = load_public_key(paths.seal_key)
        except ValueError as exc:
            raise SecretError(f"enrollment.seal_key: {exc}") from exc
    web_group = None
    if config.enrollment.web_group is not None:
        try:
            web_group = grp.getgrnam(config.enrollment.web_group).gr_gid
        except KeyError:
            raise SecretError(f"enrollment.web_group: no group named "
                              f"{config.enrollment.web_group!r} on this system (create it "
                              "with provisioning/install.sh --web, or unset the key)") from None
    return Secrets(site_key, trusted, paths.tls, password, seal_key, web_group,
                   signing_key=load_signing_key(paths.signing_key),
                   gateway_seal=load_gateway_seal(paths.gateway_seal))


def check_tls(tls: TlsFiles) -> None:
    """Load the TLS files as the MQTT client will; ``SecretError`` naming the key."""
    for key, path in (("ca_file", tls.ca), ("cert_file", tls.cert), ("key_file", tls.key)):
        if not path.is_file():
            raise SecretError(f"sync.{key}: {path}: file not found")
    try:
        context = ssl.create_default_context(cafile=str(tls.ca))
    except (ssl.SSLError, OSError) as exc:
        raise SecretError(f"sync.ca_file: {tls.ca}: not a usable CA certificate: "
                          f"{exc}") from exc
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except (ssl.SSLError, OSError) as exc:
        raise SecretError(f"sync.cert_file / sync.key_file: {tls.cert}, {tls.key}: the "
                          f"certificate and key do not load as a pair: {exc}") from exc
