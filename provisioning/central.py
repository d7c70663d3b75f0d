"""The central office: allowlists, revocations and commands out; events, status in.

``Central`` is the reference peer of the gateway's sync (``protocol`` is the
contract) and a working tool for a small office (``permitgate-central``). It keeps its
state in one folder:

- ``central.db``: SQLite (WAL, ``synchronous=FULL``): gateways and the sequence number of
  every stream sent to them, enrolled entries (keyed hashes only), revocations, the events
  received and the chain problems found in them, what each gateway reported;
- ``signing/<kid>.pem``: Ed25519 private keys (mode 0600); the first key listed in
  ``trusted-keys.txt`` whose private key is here signs (rotation: ``keygen --kid NEW``,
  install the new ``trusted-keys.txt`` on every gateway, move the old private key away,
  later drop its line);
- ``trusted-keys.txt``: ``<kid> <base64 public key>`` lines, installed on every gateway;
- ``permit.key``: 32 random bytes (hex, mode 0600) under which permit numbers are hashed
  for every building, so one broadcast revocation covers them all.

Every sequence number and list version is committed before the message carrying it is
handed to the broker, so a number is never used twice, even across a crash; a message
lost on the way is recovered by the protocol (a gateway that sees a gap, or a heartbeat
ahead of it, asks for a snapshot), not by paho's in-memory queue, which a restart loses.

Threads: ``run()`` turns the calling thread into the one worker that does all database
work and all publishing; paho's network thread only hands messages to its queue. While
``run()`` is active, the public methods called from other threads are queued to that
worker and wait for its answer. Without ``run()`` (the one-shot CLI commands) they work
in the caller's thread on a short-lived connection and wait for the broker's PUBACK.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast, get_args

import sqlite_utils
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ValidationError

from common.sqlite import SqliteFile, StoreError, rollback
from protocol import ids
from protocol.chain import GENESIS, contents_match
from protocol.hashing import SITE_KEY_BYTES, CredentialHasher, SecretError, parse_key, read_key
from protocol.messages import (
    GATEWAY_MESSAGES,
    Applied,
    Chunk,
    Command,
    Delta,
    Entry,
    EventAck,
    EventBatch,
    Heartbeat,
    ResyncRequest,
    Revocation,
    Revoked,
    Snapshot,
    Status,
    chunk_digest,
)
from protocol.signing import b64, sign, unb64
from protocol.topics import Topics, office_subscription, parse_outbound

log = structlog.get_logger()

T = TypeVar("T")

DB_NAME = "central.db"
TRUSTED_KEYS_NAME = "trusted-keys.txt"
PERMIT_KEY_NAME = "permit.key"
SIGNING_DIR = "signing"
DEFAULT_KID = "central-1"
DEFAULT_CLIENT_ID = "permitgate-central"
LOCK_NAME = "serve.lock"
"""Held exclusively by ``serve`` (one per folder) and shared by a one-shot publisher."""
REQUEST_TIMEOUT_S = 30.0
"""How long a one-shot command waits for the running ``serve`` to take its request."""

DEFAULT_TTL_S = 86_400
"""Snapshots, deltas, revocations, commands and acks expire after a day: long enough for
a gateway that was offline overnight, short enough that an old message cannot be
replayed weeks later."""
DEFAULT_HEARTBEAT_TTL_S = 3_600
"""A heartbeat says 'your lists are current'; an hour bounds how long a gateway cut off
from the office keeps believing it."""
DEFAULT_HEARTBEAT_EVERY_S = 900.0
"""``serve`` sends heartbeats every 15 min: four chances within one heartbeat's TTL."""
RESYNC_INTERVAL_S = 10.0
"""At most one snapshot per gateway per 10 s in answer to resync requests: a gateway in a
request loop cannot make the office flood the broker with whole lists."""
SESSION_EXPIRY_S = 7 * 86_400
"""The broker keeps the serving client's subscription and queues gateway messages for a
week while it is down (mosquitto queues at most 1000 per client by default: B5)."""
MAX_GATEWAY_PAYLOAD = 8 * 1024 * 1024
"""Gateway messages larger than this are refused unread (an event batch is far smaller)."""
MAX_CHUNK_ENTRIES = 10_000

COMMAND_ACTIONS: tuple[str, ...] = get_args(Command.model_fields["action"].annotation)

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE streams (name TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO streams VALUES ('all', 0);
    CREATE TABLE gateways (
        id TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        site_key_path TEXT NOT NULL,     -- the key itself stays in its file
        list_version INTEGER NOT NULL DEFAULT 0,
        list_published_ms INTEGER,
        rev_seq INTEGER NOT NULL DEFAULT 0,
        cmd_seq INTEGER NOT NULL DEFAULT 0,
        hb_seq INTEGER NOT NULL DEFAULT 0,
        ack_seq INTEGER NOT NULL DEFAULT 0,
        acked_upto INTEGER NOT NULL DEFAULT 0,   -- highest contiguous event seq stored
        status TEXT,                     -- the last retained Status, JSON
        status_ms INTEGER,               -- when it was received
        applied_list_version INTEGER,    -- as last reported (applied message or status)
        applied_ms INTEGER,
        resync_requested_ms INTEGER,
        resync_reason TEXT,
        resync_answered_ms INTEGER,
        malformed INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE entries (
        gateway TEXT NOT NULL REFERENCES gateways(id),
        cred BLOB NOT NULL,              -- HMAC-SHA256(site key, "cred\\0" + card id)
        permit BLOB,                     -- HMAC-SHA256(permit key, "permit\\0" + number)
        valid_from INTEGER,
        valid_until INTEGER,             -- exclusive
        doors TEXT,                      -- JSON list of door ids; NULL = every door
        schedule TEXT,                   -- NULL = always
        confirmed_at INTEGER,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, cred)
    ) WITHOUT ROWID;
    CREATE TABLE revocations (
        gateway TEXT NOT NULL,           -- a gateway id, or '*' for every gateway
        kind TEXT NOT NULL CHECK (kind IN ('credential', 'permit')),
        hash BLOB NOT NULL,
        seq INTEGER NOT NULL,            -- the rev (or all) stream seq that carried it
        revoked_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, kind, hash)
    ) WITHOUT ROWID;
    CREATE TABLE applied (
        gateway TEXT NOT NULL,
        stream TEXT NOT NULL,
        seq INTEGER,
        status TEXT NOT NULL,
        reason TEXT,
        list_version INTEGER NOT NULL,
        ts_ms INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, stream)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        gateway TEXT NOT NULL,
        seq INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        door TEXT,
        reader TEXT,
        direction TEXT,
        reason TEXT,
        cred TEXT,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, seq)
    ) WITHOUT ROWID;
    CREATE TABLE requests (              -- one-shot commands handed to the running serve
        id INTEGER PRIMARY KEY,
        op TEXT NOT NULL,
        args TEXT NOT NULL,              -- JSON; hashes only, never a card or permit number
        requested_ms INTEGER NOT NULL,
        taken_ms INTEGER,                -- serve claimed it; the command waits for done_ms
        done_ms INTEGER,
        result TEXT,
        error_kind TEXT,                 -- NULL (ok), usage, failure, expired
        error TEXT
    );
    CREATE INDEX requests_open ON requests(id) WHERE done_ms IS NULL;
    CREATE TABLE chain_problems (
        gateway TEXT NOT NULL,
        seq INTEGER NOT NULL,
        problem TEXT NOT NULL,
        found_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, seq, problem)
    ) WITHOUT ROWID;
    """,
)


class CentralError(Exception):
    """A runtime failure (database, broker); the message says which."""


class PublishError(CentralError):
    """The broker could not be reached or did not acknowledge a message."""


class CentralUsageError(ValueError):
    """An argument or a key file is unusable; the message names it."""


# -- keys and hashing -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeygenResult:
    """What ``keygen`` wrote."""

    kid: str
    private_key: Path
    trusted_keys: Path
    public_key_b64: str
    permit_key: Path
    permit_key_created: bool


def _create_secret(path: Path, text: str) -> None:
    """Write ``text`` to a new file of mode 0600; never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _listed_kids(path: Path) -> list[str]:
    if not path.exists():
        return []
    kids = []
    for line in path.read_text("utf-8").splitlines():
        parts = line.split("#", 1)[0].split()
        if parts:
            kids.append(parts[0])
    return kids


def keygen(folder: Path, kid: str = DEFAULT_KID) -> KeygenResult:
    """Create a signing key ``kid`` (and the permit key, once) in ``folder``.

    Refuses to overwrite an existing key or to list a key id twice. The permit key is
    created only when missing: replacing it would change every permit hash.
    """
    if not ids.KEY_ID_RE.match(kid):
        raise CentralUsageError(f"--kid {kid!r}: use 1-64 letters, digits, '.', '_', '-'")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (folder / SIGNING_DIR).mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise CentralUsageError(f"{folder}: cannot create the folder: {exc.strerror}") from None
    trusted = folder / TRUSTED_KEYS_NAME
    if kid in _listed_kids(trusted):
        raise CentralUsageError(f"{trusted}: key id {kid!r} is listed already; choose "
                                "another --kid")
    private = folder / SIGNING_DIR / f"{kid}.pem"
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode("ascii")
    try:
        _create_secret(private, pem)
    except FileExistsError:
        raise CentralUsageError(f"{private}: exists already; refusing to overwrite a key "
                                "(choose another --kid)") from None
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    public = base64.b64encode(raw).decode("ascii")
    with trusted.open("a", encoding="utf-8") as out:
        out.write(f"{kid} {public}\n")
    permit = folder / PERMIT_KEY_NAME
    created = False
    try:
        _create_secret(permit, secrets.token_bytes(SITE_KEY_BYTES).hex() + "\n")
        created = True
    except FileExistsError:
        pass
    return KeygenResult(kid, private, trusted, public, permit, created)


def permit_hash(permit_key: bytes, permit_number: str) -> bytes:
    """HMAC-SHA256(permit key, ``"permit\\0"`` + the trimmed, upper-cased permit number).

    The same construction as ``CredentialHasher.permit``, under the office-wide permit key
    instead of a site key, so a permit hashes the same in every building.
    """
    return CredentialHasher(permit_key).permit(permit_number)


def normalise_card_id(text: str) -> str:
    """A card id as the gateway's reader reports it (``protocol.ids.normalise_card_id``);
    raises ``CentralUsageError`` naming ``--card``."""
    try:
        return ids.normalise_card_id(text)
    except ValueError as exc:
        raise CentralUsageError(f"--card: {exc}") from None


def check_ident(value: str, what: str) -> str:
    """``value`` if it is a protocol identifier (lower-case letters, digits, '_', '-')."""
    try:
        return ids.check_ident(value, what)
    except ValueError as exc:
        raise CentralUsageError(str(exc)) from None


# -- database -----------------------------------------------------------------------


class _Database(SqliteFile):
    """The central database (``common.sqlite.SqliteFile``: WAL, ``synchronous=FULL`` so an
    event is on disk before the ack that lets the gateway forget it, and a seq before the
    message that carries it leaves), with errors as ``CentralError``."""

    def __init__(self, path: Path) -> None:
        try:
            super().__init__(path, MIGRATIONS, autocheckpoint=True, busy_timeout_s=10.0)
        except StoreError as exc:
            raise CentralError(str(exc)) from exc

    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        try:
            return super().conn()
        except StoreError as exc:
            raise CentralError(str(exc)) from exc

    def db(self) -> sqlite_utils.Database:
        """A sqlite-utils view on this thread's connection (for reads)."""
        return sqlite_utils.Database(self.conn())

    def close(self) -> None:
        """Close every connection; a later use opens fresh ones."""
        super().close()
        self._local = threading.local()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE); rolled back on any error."""
        conn = self.conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(conn)
            raise CentralError(f"{self.path}: {exc}") from exc
        except BaseException:
            rollback(conn)
            raise


# -- the central office -------------------------------------------------------------------


@dataclass(slots=True)
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int
    """Which connection delivered it: a packet id means nothing on the next one."""


@dataclass(slots=True)
class _Job:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What storing one event batch did."""

    received: int
    new: int
    acked_upto: int
    problems: tuple[str, ...]


def _wall_ms() -> int:
    """Real time (requests cross processes, whose test clocks may differ)."""
    return time.time_ns() // 1_000_000


def _no_delay(_client: Client, _userdata: Any, sock: Any) -> None:
    """Turn off Nagle's algorithm on a new broker connection (paho leaves it on).

    With it on, a message published right after a small unacknowledged packet (the
    manual PUBACK of the last gateway message) waits for the broker's delayed TCP ACK,
    about 40 ms on Linux: bench/revocation.py measured a p50 of 49 ms from revoke to the
    gateway's ``applied``, almost all of it this wait."""
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else b64(data)


class Central:
    """The central office's state and its MQTT peer (see the module docstring)."""

    def __init__(self, folder: Path, host: str = "localhost", port: int = 1883, *,
                 tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, client_id: str = DEFAULT_CLIENT_ID,
                 signing_kid: str | None = None, ttl_s: int = DEFAULT_TTL_S,
                 heartbeat_ttl_s: int = DEFAULT_HEARTBEAT_TTL_S,
                 resync_interval_s: float = RESYNC_INTERVAL_S,
                 clock: Callable[[], float] = time.time, connect_timeout_s: float = 10.0,
                 publish_timeout_s: float = 10.0,
                 session_expiry_s: int = SESSION_EXPIRY_S,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        if ttl_s < 1 or heartbeat_ttl_s < 1:
            raise CentralUsageError("ttl: must be at least 1 s")
        if (tls_cert is None) != (tls_key is None):
            raise CentralUsageError("--tls-cert and --tls-key go together")
        for option, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert),
                             ("--tls-key", tls_key)):
            if path is not None and not path.is_file():
                raise CentralUsageError(f"{option} {path}: no such file")
        self.folder = folder
        self.host, self.port = host, port
        self._tls = (tls_ca, tls_cert, tls_key)
        self.client_id = client_id
        self._signing_kid = signing_kid
        self.ttl_s, self.heartbeat_ttl_s = ttl_s, heartbeat_ttl_s
        self.resync_interval_s = resync_interval_s
        self._clock = clock
        self._connect_timeout_s = connect_timeout_s
        self._publish_timeout_s = publish_timeout_s
        self._session_expiry_s = session_expiry_s
        self._request_timeout_s = request_timeout_s
        self._lock_fd: int | None = None
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CentralUsageError(f"--dir {folder}: cannot create it: {exc.strerror}"
                                    ) from None
        self._db = _Database(folder / DB_NAME)
        self._signer: tuple[str, Ed25519PrivateKey] | None = None
        self._permit_key: bytes | None = None
        # one-shot publishing
        self._tool_client: Client | None = None
        self._tool_connected = threading.Event()
        self._tool_connect_rc: ReasonCode | None = None
        self._pending: list[MQTTMessageInfo] = []
        # run(): the worker
        self._queue: queue.Queue[_Incoming | _Job] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._run_client: Client | None = None
        self._resync_due: dict[str, float] = {}
        self._connection = 0
        self.subscribed = threading.Event()
        """Set once the serving client's subscription is acknowledged (tests wait on it)."""
        self.malformed = 0
        """Malformed or unexpected gateway messages seen by this process."""

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Central:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect (one-shot mode), release the folder, close the database."""
        try:
            if self._tool_client is not None:
                client, self._tool_client = self._tool_client, None
                try:
                    client.disconnect()
                finally:
                    client.loop_stop()
        finally:
            self._release_folder()
            self._db.close()

    # -- keys --------------------------------------------------------------------------

    def _signing(self) -> tuple[str, Ed25519PrivateKey]:
        if self._signer is not None:
            return self._signer
        trusted = self.folder / TRUSTED_KEYS_NAME
        kids = _listed_kids(trusted)
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

    def _hasher(self, gateway: str) -> CredentialHasher:
        row = self._gateway_row(gateway)
        try:
            return CredentialHasher(read_key(Path(row["site_key_path"])))
        except SecretError as exc:
            raise CentralUsageError(f"gateway {gateway}: {exc}") from None

    def _gateway_row(self, gateway: str) -> dict[str, Any]:
        rows = list(self._db.db().query("SELECT * FROM gateways WHERE id = ?", [gateway]))
        if not rows:
            raise CentralUsageError(f"gateway {gateway!r}: unknown (add it with "
                                    "'permitgate-central add-gateway')")
        return rows[0]

    def _now(self) -> int:
        return int(self._clock())

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- dispatch: one thread publishes -------------------------------------------------

    def _op(self, fn: Callable[[], T]) -> T:
        """Run database work ``fn`` on the worker while ``run()`` is active, else here."""
        worker = self._worker
        if worker is None or threading.current_thread() is worker:
            return fn()
        job = _Job(fn)
        self._queue.put(job)
        try:
            return cast(T, job.future.result(timeout=self._request_timeout_s))
        except FutureTimeout:
            raise CentralError(f"the central worker did not answer within "
                               f"{self._request_timeout_s:g} s") from None

    def _publish_op(self, op: str, args: dict[str, Any]) -> Any:
        """Run the publishing operation ``op`` (see ``_perform``) through the one
        publisher of this folder.

        - ``run()`` active in this process: on its worker thread.
        - ``serve`` running elsewhere on this folder (it holds the folder lock): handed to
          it through the ``requests`` table. With the shipped broker configuration
          (``use_username_as_clientid``) a second connection with the office certificate
          would take over serve's session, so a one-shot command must not connect then.
        - nobody serving: here, on a connection that resumes serve's persistent session
          without consuming it (see ``_tool_connect``); the connection is made before any
          sequence number is spent, and every message is acknowledged by the broker
          before this returns (else ``PublishError``).
        """
        if self._worker is not None:
            return self._op(lambda: self._perform(op, args))
        if self._tool_client is None and not self._hold_folder(exclusive=False):
            return self._request_via_serve(op, args)
        self._tool_connect()
        result = self._perform(op, args)
        self._flush()
        return result

    def _perform(self, op: str, args: dict[str, Any]) -> Any:
        if op == "snapshot":
            return self._do_snapshot(args["gateway"], int(args["chunk_entries"]))
        if op == "delta":
            return self._do_delta(args["gateway"], [unb64(c) for c in args["upsert"]],
                                  list(args["remove"]))
        if op == "revoke":
            return self._do_revoke(args["target"],
                                   [Revoked(**item) for item in args["items"]])
        if op == "command":
            return self._do_command(args["gateway"], args["action"])
        if op == "heartbeat":
            return self._do_heartbeat(args["gateway"])
        if op == "heartbeat_all":
            return {gw: self._do_heartbeat(gw) for gw in self.gateways()}
        raise CentralError(f"unknown operation {op!r}")

    def _hold_folder(self, *, exclusive: bool) -> bool:
        """Take the folder lock (``serve``: exclusive; a one-shot publisher: shared) for
        the life of this object; False when someone else holds it the other way."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _release_folder(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def _request_via_serve(self, op: str, args: dict[str, Any]) -> Any:
        """Queue ``op`` for the running ``serve`` and wait for its outcome."""
        with self._db.tx() as conn:
            request = conn.execute(
                "INSERT INTO requests (op, args, requested_ms) VALUES (?,?,?) RETURNING id",
                (op, json.dumps(args), _wall_ms())).fetchone()[0]
        log.debug("request_queued", op=op, request=request)
        deadline = time.monotonic() + self._request_timeout_s
        while True:
            row = self._db.conn().execute(
                "SELECT done_ms, result, error_kind, error FROM requests WHERE id = ?",
                (request,)).fetchone()
            if row[0] is not None:
                break
            if time.monotonic() > deadline:
                # Withdrawn only if serve has not claimed it; once claimed, its outcome
                # (sent or not) is worth waiting for.
                with self._db.tx() as conn:
                    cancelled = conn.execute(
                        "UPDATE requests SET done_ms = ?, error_kind = 'expired' "
                        "WHERE id = ? AND taken_ms IS NULL", (_wall_ms(), request)).rowcount
                if cancelled:
                    raise PublishError(f"the running 'serve' did not take the request within "
                                       f"{self._request_timeout_s:g} s; nothing was sent")
                deadline = time.monotonic() + self._request_timeout_s
            time.sleep(0.05)
        _done, result, kind, error = row
        if kind == "usage":
            raise CentralUsageError(error)
        if kind is not None:
            raise PublishError(f"serve: {error or kind}")
        return json.loads(result)

    def _serve_requests(self) -> None:
        """Perform what one-shot commands queued for this ``serve`` (worker thread)."""
        rows = self._db.conn().execute(
            "SELECT id, op, args, requested_ms FROM requests WHERE done_ms IS NULL "
            "AND taken_ms IS NULL ORDER BY id").fetchall()
        for request, op, args, requested_ms in rows:
            result, kind, error = None, None, None
            with self._db.tx() as conn:
                taken = conn.execute("UPDATE requests SET taken_ms = ? WHERE id = ? AND "
                                     "taken_ms IS NULL AND done_ms IS NULL",
                                     (_wall_ms(), request)).rowcount
            if not taken:
                continue  # withdrawn by its command meanwhile
            if _wall_ms() - requested_ms > self._request_timeout_s * 1000:
                # Its command is about to give up; doing it now would surprise whoever ran
                # it (a request left over from before a restart, say).
                kind, error = "expired", "not taken in time"
            else:
                try:
                    result = json.dumps(self._perform(op, json.loads(args)))
                except CentralUsageError as exc:
                    kind, error = "usage", str(exc)
                except Exception as exc:  # noqa: BLE001 - reported to the waiting command
                    kind, error = "failure", f"{type(exc).__name__}: {exc}"
            with self._db.tx() as conn:
                conn.execute("UPDATE requests SET done_ms = ?, result = ?, error_kind = ?, "
                             "error = ? WHERE id = ? AND done_ms IS NULL",
                             (_wall_ms(), result, kind, error, request))
            log.info("request_served", op=op, request=request, outcome=kind or "ok")

    def _tool_connect(self) -> None:
        if self._tool_client is not None:
            return
        # The serving client's id and session, resumed (clean start off, same expiry) and
        # never acknowledging anything: gateway messages queued for the office while serve
        # is down stay queued for it (the broker redelivers unacknowledged ones), and the
        # session is neither wiped (clean start) nor shortened (expiry 0) by a tool. With
        # the shipped broker (use_username_as_clientid) the id is the certificate's CN
        # anyway, so a distinct id would not help.
        client = self._new_client(self.client_id, manual_ack=True)

        def on_connect(_c: Client, _u: Any, _f: ConnectFlags, rc: ReasonCode,
                       _p: Properties | None) -> None:
            self._tool_connect_rc = rc
            self._tool_connected.set()

        client.on_connect = on_connect
        self._tool_connected.clear()
        try:
            client.connect(self.host, self.port, keepalive=30, clean_start=False,
                           properties=self._connect_properties())
        except (OSError, ValueError) as exc:
            raise PublishError(f"broker {self.host}:{self.port}: cannot connect: "
                               f"{exc}") from None
        client.loop_start()
        ok = self._tool_connected.wait(self._connect_timeout_s)
        rc = self._tool_connect_rc
        if not ok or rc is None or rc.is_failure:
            client.loop_stop()
            with contextlib.suppress(OSError):
                client.disconnect()
            why = "no answer" if not ok or rc is None else str(rc)
            raise PublishError(f"broker {self.host}:{self.port}: connection refused or not "
                               f"confirmed ({why})")
        self._tool_client = client

    def _new_client(self, client_id: str, *, manual_ack: bool) -> Client:
        client = Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5,
                        manual_ack=manual_ack)
        client.connect_timeout = self._connect_timeout_s
        # Reconnect back-off capped at 60 s (B6: the default cap is 120 s).
        client.reconnect_delay_set(1, 60)
        ca, cert, key = self._tls
        if ca is not None or cert is not None:
            client.tls_set(ca_certs=str(ca) if ca else None,
                           certfile=str(cert) if cert else None,
                           keyfile=str(key) if key else None)
        client.on_socket_open = _no_delay
        return client

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        deadline = time.monotonic() + self._publish_timeout_s
        for info in pending:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                raise PublishError(f"broker {self.host}:{self.port}: publish failed: "
                                   f"{exc}") from None
            if not info.is_published():
                raise PublishError(f"broker {self.host}:{self.port}: no acknowledgement "
                                   f"within {self._publish_timeout_s:g} s (the sequence "
                                   "numbers are spent; gateways recover by resync)")

    def _send(self, topic: str, payload: bytes) -> None:
        """Hand one QoS 1 message to paho (worker thread or one-shot caller only)."""
        client = self._run_client if self._worker is not None else self._tool_client
        if client is None:
            raise PublishError("not connected to a broker")
        info = client.publish(topic, payload, qos=1)
        if self._worker is None:
            self._pending.append(info)
        elif info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # NO_CONN: paho keeps it and sends it on reconnect; anything lost is recovered
            # by the protocol (gap → resync, missing ack → the gateway resends events).
            log.warning("publish_not_sent", topic=topic, rc=int(info.rc))

    def _signed(self, topic: str, body: BaseModel) -> None:
        kid, key = self._signing()
        self._send(topic, sign(key, kid, topic, body))

    def _times(self, ttl: int) -> tuple[int, int]:
        now = self._now()
        return now, now + ttl

    # -- gateways and enrollment -------------------------------------------------------

    def add_gateway(self, gateway_id: str, site_id: str, site_key: bytes | Path, *,
                    events_from: int = 1) -> None:
        """Register a gateway.

        ``site_key`` is the path of the building's site-key file (kept there, read when
        needed), or the key itself, which is then written to ``site-keys/<gateway>.key``
        in the central folder (mode 0600). ``events_from`` is the first event seq the
        office expects (for a gateway whose older events were pruned before it was added).
        """
        check_ident(gateway_id, "gateway")
        check_ident(site_id, "--site")
        if events_from < 1:
            raise CentralUsageError("--events-from: must be at least 1")
        if isinstance(site_key, bytes):
            if len(site_key) != SITE_KEY_BYTES:
                raise CentralUsageError(f"site key: must be {SITE_KEY_BYTES} bytes")
            folder = self.folder / "site-keys"
            folder.mkdir(mode=0o700, exist_ok=True)
            path = folder / f"{gateway_id}.key"
            if path.exists():
                if read_key(path) != site_key:
                    raise CentralUsageError(f"{path}: holds a different site key")
            else:
                _create_secret(path, site_key.hex() + "\n")
        else:
            path = site_key.resolve()
            try:
                read_key(path)
            except SecretError as exc:
                raise CentralUsageError(f"--site-key: {exc}") from None

        def do() -> None:
            with self._db.tx() as conn:
                if conn.execute("SELECT 1 FROM gateways WHERE id = ?", (gateway_id,)
                                ).fetchone():
                    raise CentralUsageError(f"gateway {gateway_id!r}: exists already")
                conn.execute("INSERT INTO gateways (id, site, site_key_path, acked_upto, "
                             "created_ms) VALUES (?,?,?,?,?)",
                             (gateway_id, site_id, str(path), events_from - 1,
                              self._now_ms()))
        self._op(do)

    def gateways(self) -> list[str]:
        """Every registered gateway id."""
        return [r["id"] for r in self._db.db().query("SELECT id FROM gateways ORDER BY id")]

    def enroll(self, gateway: str, card_id: str, permit_number: str, *,
               valid_from: int | None = None, valid_until: int | None = None,
               doors: Sequence[str] | None = None, schedule: str | None = None) -> bytes:
        """Store (or replace) a card's entry for ``gateway``: hashes only. Returns the
        credential hash. Nothing is sent; ``publish_snapshot`` or ``publish_delta`` does."""
        card = normalise_card_id(card_id)
        if not permit_number.strip():
            raise CentralUsageError("--permit: empty permit number")
        if valid_from is not None and valid_until is not None and valid_until <= valid_from:
            raise CentralUsageError("--until: must be after --from")
        door_list = None if doors is None else [check_ident(d, "--doors: door") for d in doors]
        if door_list is not None and not door_list:
            raise CentralUsageError("--doors: give at least one door (omit it for every door)")
        if schedule is not None:
            check_ident(schedule, "--schedule")
        cred = self._hasher(gateway).credential(card)
        permit = permit_hash(self.permit_key(), permit_number)

        def do() -> None:
            with self._db.tx() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?)",
                    (gateway, cred, permit, valid_from, valid_until,
                     None if door_list is None else json.dumps(door_list), schedule,
                     self._now(), self._now_ms()))
        self._op(do)
        return cred

    def enroll_many(self, gateway: str, cards: Iterable[tuple[str, str]], *,
                    valid_from: int | None = None, valid_until: int | None = None
                    ) -> int:
        """Store (or replace) the entries of many ``(card id, permit number)`` pairs for
        ``gateway`` in one transaction (an import, a building's first enrollment): one
        commit instead of one per card. Every pair is checked before anything is
        written. Returns how many were stored."""
        if valid_from is not None and valid_until is not None and valid_until <= valid_from:
            raise CentralUsageError("--until: must be after --from")
        hasher = self._hasher(gateway)
        permit_key = self.permit_key()
        now, now_ms = self._now(), self._now_ms()
        rows = []
        for card_id, permit_number in cards:
            if not permit_number.strip():
                raise CentralUsageError("--permit: empty permit number")
            rows.append((gateway, hasher.credential(normalise_card_id(card_id)),
                         permit_hash(permit_key, permit_number), valid_from, valid_until,
                         None, None, now, now_ms))

        def do() -> None:
            with self._db.tx() as conn:
                conn.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?)",
                                 rows)
        self._op(do)
        return len(rows)

    def remove(self, gateway: str, card_id: str) -> bytes:
        """Delete a card's entry for ``gateway``; returns its credential hash."""
        cred = self._hasher(gateway).credential(normalise_card_id(card_id))

        def do() -> None:
            with self._db.tx() as conn:
                gone = conn.execute("DELETE FROM entries WHERE gateway = ? AND cred = ?",
                                    (gateway, cred)).rowcount
                if not gone:
                    raise CentralUsageError(f"--card: not enrolled at gateway {gateway}")
        self._op(do)
        return cred

    def entries(self, gateway: str) -> list[Entry]:
        """The stored allowlist of ``gateway`` as wire entries, by credential hash."""
        return [self._entry(r) for r in self._db.db().query(
            "SELECT * FROM entries WHERE gateway = ? ORDER BY cred", [gateway])]

    @staticmethod
    def _entry(row: dict[str, Any]) -> Entry:
        return Entry(cred=b64(row["cred"]), permit=_b64(row["permit"]),
                     valid_from=row["valid_from"], valid_until=row["valid_until"],
                     doors=None if row["doors"] is None else tuple(json.loads(row["doors"])),
                     schedule=row["schedule"], confirmed_at=row["confirmed_at"])

    def revocations(self, gateway: str) -> list[Revoked]:
        """What a snapshot for ``gateway`` revokes: its own and the global revocations."""
        return [Revoked(kind=r["kind"], hash=b64(r["hash"]))
                for r in self._db.db().query(
                    "SELECT kind, hash FROM revocations WHERE gateway IN (?, '*') "
                    "GROUP BY kind, hash ORDER BY kind, hash", [gateway])]

    # -- publishing -------------------------------------------------------------------

    def publish_snapshot(self, gateway: str, chunk_entries: int = MAX_CHUNK_ENTRIES) -> int:
        """Send the whole allowlist of ``gateway`` as a new version; returns it."""
        if not 1 <= chunk_entries <= MAX_CHUNK_ENTRIES:
            raise CentralUsageError(f"--chunk-entries: 1 to {MAX_CHUNK_ENTRIES}")
        self._gateway_row(gateway)
        return int(self._publish_op("snapshot", {"gateway": gateway,
                                                 "chunk_entries": chunk_entries}))

    def _do_snapshot(self, gateway: str, chunk_entries: int, *, resync: bool = False) -> int:
        now_ms = self._now_ms()
        with self._db.tx() as conn:
            version, rev_seq = conn.execute(
                "UPDATE gateways SET list_version = list_version + 1, list_published_ms = ?, "
                "resync_answered_ms = CASE WHEN ? THEN ? ELSE resync_answered_ms END "
                "WHERE id = ? RETURNING list_version, rev_seq",
                (now_ms, resync, now_ms, gateway)).fetchone()
            all_seq = conn.execute("SELECT seq FROM streams WHERE name = 'all'").fetchone()[0]
            db = sqlite_utils.Database(conn)
            entries = [self._entry(r) for r in db.query(
                "SELECT * FROM entries WHERE gateway = ? ORDER BY cred", [gateway])]
            revoked = [Revoked(kind=r["kind"], hash=b64(r["hash"]))
                       for r in db.query(
                           "SELECT kind, hash FROM revocations WHERE gateway IN (?, '*') "
                           "GROUP BY kind, hash ORDER BY kind, hash", [gateway])]
        count = max(1, -(-len(entries) // chunk_entries), -(-len(revoked) // chunk_entries))
        payloads = [Chunk(
            type="chunk", version=version, index=i,
            entries=entries[i * chunk_entries:(i + 1) * chunk_entries],
            revoked=revoked[i * chunk_entries:(i + 1) * chunk_entries],
        ).model_dump_json().encode() for i in range(count)]
        issued, expires = self._times(self.ttl_s)
        manifest = Snapshot(
            type="snapshot", gateway=gateway, seq=version, issued_at=issued,
            expires_at=expires, entries=len(entries), revoked=len(revoked),
            chunk_sha256=[chunk_digest(p) for p in payloads], rev_seq=rev_seq,
            all_seq=all_seq)
        topic = Topics(gateway).inbound("list")
        self._signed(topic, manifest)
        for payload in payloads:
            self._send(topic, payload)
        log.info("snapshot_published", gateway=gateway, version=version,
                 entries=len(entries), revoked=len(revoked), chunks=count, resync=resync)
        return int(version)

    def publish_delta(self, gateway: str, upsert: Sequence[str] = (),
                      remove: Sequence[str] = ()) -> int:
        """Send the stored entries of the cards ``upsert`` and the removal of the cards
        ``remove`` (card ids) as version ``base + 1``; returns the new version."""
        hasher = self._hasher(gateway)
        up = [b64(hasher.credential(normalise_card_id(c))) for c in upsert]
        gone = [b64(hasher.credential(normalise_card_id(c))) for c in remove]
        if not up and not gone:
            raise CentralUsageError("delta: nothing to upsert or remove")
        return int(self._publish_op("delta", {"gateway": gateway, "upsert": up,
                                              "remove": gone}))

    def _do_delta(self, gateway: str, upsert: list[bytes], remove: list[str]) -> int:
        with self._db.tx() as conn:
            rows = []
            for cred in upsert:
                found = list(sqlite_utils.Database(conn).query(
                    "SELECT * FROM entries WHERE gateway = ? AND cred = ?", [gateway, cred]))
                if not found:
                    raise CentralUsageError(f"delta: a card to upsert is not enrolled at "
                                            f"gateway {gateway}")
                rows.append(self._entry(found[0]))
            version = conn.execute(
                "UPDATE gateways SET list_version = list_version + 1, list_published_ms = ? "
                "WHERE id = ? RETURNING list_version", (self._now_ms(), gateway)).fetchone()[0]
        issued, expires = self._times(self.ttl_s)
        self._signed(Topics(gateway).inbound("list"), Delta(
            type="delta", gateway=gateway, seq=version, issued_at=issued, expires_at=expires,
            base=version - 1, upsert=rows, remove=remove))
        log.info("delta_published", gateway=gateway, version=version, upserts=len(rows),
                 removals=len(remove))
        return int(version)

    def revoke(self, target: str, items: Sequence[Revoked]) -> int:
        """Revoke ``items`` at gateway ``target``, or at every gateway with ``"*"``
        (broadcast stream). Returns the stream seq used."""
        if not items:
            raise CentralUsageError("revoke: nothing to revoke")
        if target == "*":
            if any(i.kind != "permit" for i in items):
                raise CentralUsageError("--all: only permits can be revoked everywhere (a "
                                        "credential hash depends on the building's site key)")
        else:
            self._gateway_row(target)
        return int(self._publish_op("revoke", {
            "target": target, "items": [i.model_dump() for i in items]}))

    def _do_revoke(self, target: str, items: list[Revoked]) -> int:
        now_ms = self._now_ms()
        with self._db.tx() as conn:
            if target == "*":
                seq = conn.execute("UPDATE streams SET seq = seq + 1 WHERE name = 'all' "
                                   "RETURNING seq").fetchone()[0]
            else:
                seq = conn.execute("UPDATE gateways SET rev_seq = rev_seq + 1 WHERE id = ? "
                                   "RETURNING rev_seq", (target,)).fetchone()[0]
            conn.executemany("INSERT OR REPLACE INTO revocations VALUES (?,?,?,?,?)",
                             [(target, i.kind, unb64(i.hash), seq, now_ms)
                              for i in items])
        issued, expires = self._times(self.ttl_s)
        topic = (Topics("*").broadcast_revocations if target == "*"
                 else Topics(target).inbound("rev"))
        self._signed(topic, Revocation(
            type="revocation", gateway=target, seq=seq, issued_at=issued, expires_at=expires,
            items=items))
        log.info("revocation_published", gateway=target, seq=seq, items=len(items))
        return int(seq)

    def revoke_permit(self, permit_number: str, gateway: str = "*") -> int:
        """Revoke a permit (every card of it) at one gateway or, by default, everywhere."""
        if not permit_number.strip():
            raise CentralUsageError("--permit: empty permit number")
        digest = permit_hash(self.permit_key(), permit_number)
        return self.revoke(gateway, [Revoked(kind="permit", hash=b64(digest))])

    def revoke_card(self, gateway: str, card_id: str) -> int:
        """Revoke one card at ``gateway``."""
        digest = self._hasher(gateway).credential(normalise_card_id(card_id))
        return self.revoke(gateway, [Revoked(kind="credential", hash=b64(digest))])

    def command(self, gateway: str, action: str) -> int:
        """Send an operational command; returns its seq."""
        if action not in COMMAND_ACTIONS:
            raise CentralUsageError(f"action {action!r}: one of {', '.join(COMMAND_ACTIONS)}")
        self._gateway_row(gateway)
        return int(self._publish_op("command", {"gateway": gateway, "action": action}))

    def _do_command(self, gateway: str, action: str) -> int:
        with self._db.tx() as conn:
            seq = conn.execute("UPDATE gateways SET cmd_seq = cmd_seq + 1 WHERE id = ? "
                               "RETURNING cmd_seq", (gateway,)).fetchone()[0]
        issued, expires = self._times(self.ttl_s)
        self._signed(Topics(gateway).inbound("cmd"), Command(
            type="command", gateway=gateway, seq=seq, issued_at=issued, expires_at=expires,
            action=cast(Any, action)))
        log.info("command_published", gateway=gateway, seq=seq, action=action)
        return int(seq)

    def heartbeat(self, gateway: str) -> int:
        """Send 'your lists are current as of these versions'; returns its seq."""
        self._gateway_row(gateway)
        return int(self._publish_op("heartbeat", {"gateway": gateway}))

    def _do_heartbeat(self, gateway: str) -> int:
        with self._db.tx() as conn:
            seq, version, rev_seq = conn.execute(
                "UPDATE gateways SET hb_seq = hb_seq + 1 WHERE id = ? "
                "RETURNING hb_seq, list_version, rev_seq", (gateway,)).fetchone()
            all_seq = conn.execute("SELECT seq FROM streams WHERE name = 'all'").fetchone()[0]
        issued, expires = self._times(self.heartbeat_ttl_s)
        self._signed(Topics(gateway).inbound("hb"), Heartbeat(
            type="heartbeat", gateway=gateway, seq=seq, issued_at=issued,
            expires_at=expires, list_version=version, rev_seq=rev_seq, all_seq=all_seq))
        log.debug("heartbeat_published", gateway=gateway, seq=seq, list_version=version)
        return int(seq)

    def heartbeat_all(self) -> dict[str, int]:
        """A heartbeat to every gateway; returns the seq sent to each."""
        result = self._publish_op("heartbeat_all", {})
        return {str(k): int(v) for k, v in result.items()}

    # -- receiving ---------------------------------------------------------------------

    def run(self, stop: threading.Event, *, heartbeat_every_s: float | None = None) -> None:
        """Receive, store, acknowledge and answer until ``stop`` is set.

        The calling thread becomes the worker: it alone touches the database and
        publishes. With ``heartbeat_every_s`` every gateway gets a heartbeat right after
        the first connection and then at that interval.
        """
        if self._worker is not None or self._tool_client is not None:
            raise CentralError("this Central is running or publishing already")
        self._signing()  # a missing key is a usage error now, not a log line later
        if not self._hold_folder(exclusive=True):
            raise CentralError(f"{self.folder}: another 'serve' (or a one-shot command) is "
                               "using this folder; only one may publish for it")
        with self._db.tx() as conn:
            conn.execute("DELETE FROM requests WHERE done_ms IS NOT NULL AND done_ms < ?",
                         (_wall_ms() - 86_400_000,))
            # Claimed by a serve that stopped before finishing: whether it was sent is
            # unknown, so it is closed, not redone (the protocol recovers a lost message).
            conn.execute("UPDATE requests SET done_ms = ?, error_kind = 'failure', "
                         "error = 'serve stopped while performing it' "
                         "WHERE taken_ms IS NOT NULL AND done_ms IS NULL", (_wall_ms(),))
        connected = threading.Event()
        client = self._serving_client(connected)
        self._run_client = client
        self._worker = threading.current_thread()
        client.loop_start()
        try:
            self._serve(stop, connected, heartbeat_every_s)
        finally:
            self._worker = None
            while True:
                try:
                    left = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(left, _Job):
                    left.future.set_exception(CentralError("central stopped"))
                # An unacknowledged gateway message is redelivered by the broker on the
                # next start (persistent session).
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001 - shutting down; the loop is stopped next
                log.warning("central_disconnect_failed")
            try:
                client.loop_stop()
            except Exception:  # noqa: BLE001 - shutting down
                log.warning("central_loop_stop_failed")
            self._run_client = None
            self.subscribed.clear()
            self._release_folder()

    def _serving_client(self, connected: threading.Event) -> Client:
        """The persistent-session client of ``run()``; its callbacks only hand off."""
        client = self._new_client(self.client_id, manual_ack=True)
        # paho's queue is memory only (B6): bound it; the protocol recovers anything lost.
        client.max_queued_messages_set(10_000)
        topic = office_subscription()

        def on_connect(c: Client, _u: Any, flags: ConnectFlags, rc: ReasonCode,
                       _p: Properties | None) -> None:
            if rc.is_failure:
                log.warning("central_connect_refused", reason=str(rc))
                return
            self._connection += 1
            log.info("central_connected", session_present=flags.session_present)
            # Subscribing here (paho's network thread) makes it survive reconnects.
            c.subscribe(topic, qos=1)
            connected.set()

        def on_subscribe(_c: Client, _u: Any, _mid: int, codes: list[ReasonCode],
                         _p: Properties | None) -> None:
            if all(not code.is_failure for code in codes):
                self.subscribed.set()
                log.info("central_subscribed", topic=topic)
            else:
                log.error("central_subscribe_refused", reasons=[str(c) for c in codes])

        def on_message(_c: Client, _u: Any, msg: MQTTMessage) -> None:
            self._queue.put(_Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos,
                                      self._connection))

        def on_disconnect(_c: Client, _u: Any, _f: DisconnectFlags, rc: ReasonCode,
                          _p: Properties | None) -> None:
            connected.clear()
            log.info("central_disconnected", reason=str(rc))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.on_disconnect = on_disconnect
        client.connect_async(self.host, self.port, keepalive=30, clean_start=False,
                             properties=self._connect_properties())
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        return props

    def _serve(self, stop: threading.Event, connected: threading.Event,
               heartbeat_every_s: float | None) -> None:
        next_hb = time.monotonic() if heartbeat_every_s else float("inf")
        failures = 0
        while not stop.is_set():
            try:
                item: _Incoming | _Job | None = self._queue.get(timeout=0.2)
            except queue.Empty:
                item = None
            try:
                if isinstance(item, _Job):
                    self._run_job(item)
                elif item is not None:
                    self._handle(item)
                if heartbeat_every_s and connected.is_set() and time.monotonic() >= next_hb:
                    next_hb = time.monotonic() + heartbeat_every_s
                    sent = [self._do_heartbeat(gw) for gw in self.gateways()]
                    log.info("heartbeats_published", gateways=len(sent))
                self._answer_due_resyncs()
                self._serve_requests()
                failures = 0
            except Exception:
                # The worker loop is the one broad boundary: log, back off (capped), go on.
                failures += 1
                log.exception("central_worker_failed", failures=failures)
                stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))

    def _run_job(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            job.future.set_exception(exc)

    def _handle(self, msg: _Incoming) -> None:
        try:
            self._dispatch(msg)
        finally:
            client = self._run_client
            if client is not None and msg.qos > 0 and msg.connection == self._connection:
                # Acknowledged only once handled (stored, or counted as malformed): a crash
                # before this leaves the message with the broker for the next start. One
                # from an earlier connection is redelivered on this one and acked then.
                client.ack(msg.mid, msg.qos)

    def _malformed(self, gateway: str | None, kind: str, reason: str) -> None:
        self.malformed += 1
        log.warning("gateway_message_malformed", gateway=gateway, kind=kind, reason=reason)
        if gateway is not None:
            with self._db.tx() as conn:
                conn.execute("UPDATE gateways SET malformed = malformed + 1 WHERE id = ?",
                             (gateway,))

    def _dispatch(self, msg: _Incoming) -> None:
        parsed = self._parse(msg)
        if parsed is None:
            return
        gateway, body = parsed
        if isinstance(body, EventBatch):
            self._on_events(gateway, body)
        elif isinstance(body, Applied):
            self._on_applied(gateway, body)
        elif isinstance(body, Status):
            self._on_status(gateway, body)
        elif isinstance(body, ResyncRequest):
            self._on_resync(gateway, body)

    def _parse(self, msg: _Incoming) -> tuple[str, BaseModel] | None:
        """The gateway and validated body of a message, or None (counted, logged)."""
        parsed = parse_outbound(msg.topic)
        if parsed is None:
            self._malformed(None, "?", f"unexpected topic {msg.topic[:200]!r}")
            return None
        gateway, kind = parsed
        known = bool(ids.IDENT_RE.match(gateway)) and self._db.conn().execute(
            "SELECT 1 FROM gateways WHERE id = ?", (gateway,)).fetchone() is not None
        if not known:
            self._malformed(None, kind, f"message from unknown gateway {gateway[:64]!r}")
            with self._db.tx() as conn:
                conn.execute("INSERT INTO meta VALUES ('unknown_gateway_messages', '1') ON "
                             "CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")
            return None
        model = GATEWAY_MESSAGES.get(kind)
        problem = None
        body: BaseModel | None = None
        if model is None:
            problem = "unknown message kind"
        elif kind == "status" and not msg.payload:
            return None  # a cleared retained status
        elif len(msg.payload) > MAX_GATEWAY_PAYLOAD:
            problem = f"oversized: {len(msg.payload)} bytes"
        else:
            try:
                body = model.model_validate_json(msg.payload)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "<message>"
                problem = f"{where}: {err['msg']}"
        if body is not None and getattr(body, "gateway", None) != gateway:
            problem = "gateway in the body differs from the topic"
        if problem is not None or body is None:
            self._malformed(gateway, kind, problem or "unreadable")
            return None
        return gateway, body

    def store_events(self, gateway: str, batch: EventBatch) -> StoreResult:
        """Store a batch once (dedupe by seq), check its links, advance ``acked_upto``.

        A seq received again with different contents, a link that does not match its
        neighbour and contents that do not match their hash are each recorded as a chain
        problem; the events are stored as received either way.
        """
        now_ms = self._now_ms()
        problems: list[tuple[int, str]] = []
        new = 0
        with self._db.tx() as conn:
            for ev in batch.events:
                data = json.dumps(ev.data, sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=False)
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (gateway, ev.seq, ev.event_id, ev.ts_ms, ev.kind, ev.door, ev.reader,
                     ev.direction, ev.reason, ev.cred, data, ev.prev_hash, ev.hash, now_ms)
                ).rowcount
                if not inserted:
                    stored = conn.execute("SELECT hash FROM events WHERE gateway = ? AND "
                                          "seq = ?", (gateway, ev.seq)).fetchone()[0]
                    if stored != ev.hash:
                        problems.append((ev.seq, "received again with different contents "
                                         f"(hash {ev.hash[:16]}…, stored {stored[:16]}…)"))
                    continue
                new += 1
                if not contents_match(ev):
                    problems.append((ev.seq, "contents do not match the event's hash"))
                if ev.seq == 1 and ev.prev_hash != GENESIS:
                    problems.append((1, "the first event does not start the chain"))
                before = conn.execute("SELECT hash FROM events WHERE gateway = ? AND seq = ?",
                                      (gateway, ev.seq - 1)).fetchone()
                if before is not None and before[0] != ev.prev_hash:
                    problems.append((ev.seq, f"prev_hash does not match the hash of seq "
                                     f"{ev.seq - 1}"))
                after = conn.execute("SELECT prev_hash FROM events WHERE gateway = ? AND "
                                     "seq = ?", (gateway, ev.seq + 1)).fetchone()
                if after is not None and after[0] != ev.hash:
                    problems.append((ev.seq + 1, f"prev_hash does not match the hash of seq "
                                     f"{ev.seq}"))
            conn.executemany("INSERT OR IGNORE INTO chain_problems VALUES (?,?,?,?)",
                             [(gateway, s, p, now_ms) for s, p in problems])
            upto = conn.execute("SELECT acked_upto FROM gateways WHERE id = ?", (gateway,)
                                ).fetchone()[0]
            for (seq,) in conn.execute("SELECT seq FROM events WHERE gateway = ? AND seq > ? "
                                       "ORDER BY seq", (gateway, upto)):
                if seq != upto + 1:
                    break
                upto = seq
            conn.execute("UPDATE gateways SET acked_upto = ? WHERE id = ?", (upto, gateway))
        for seq, problem in problems:
            log.warning("chain_problem", gateway=gateway, seq=seq, problem=problem)
        return StoreResult(len(batch.events), new, int(upto),
                           tuple(f"seq {s}: {p}" for s, p in problems))

    def _on_events(self, gateway: str, batch: EventBatch) -> None:
        result = self.store_events(gateway, batch)
        # The ack goes out only after the commit above: the gateway may then forget them.
        with self._db.tx() as conn:
            ack_seq = conn.execute("UPDATE gateways SET ack_seq = ack_seq + 1 WHERE id = ? "
                                   "RETURNING ack_seq", (gateway,)).fetchone()[0]
        issued, expires = self._times(self.ttl_s)
        self._signed(Topics(gateway).inbound("ack"), EventAck(
            type="event_ack", gateway=gateway, seq=ack_seq, issued_at=issued,
            expires_at=expires, upto=result.acked_upto))
        log.info("events_stored", gateway=gateway, received=result.received, new=result.new,
                 acked_upto=result.acked_upto, problems=len(result.problems))

    def _on_applied(self, gateway: str, msg: Applied) -> None:
        now_ms = self._now_ms()
        with self._db.tx() as conn:
            conn.execute("INSERT OR REPLACE INTO applied VALUES (?,?,?,?,?,?,?,?)",
                         (gateway, msg.stream, msg.seq, msg.status, msg.reason,
                          msg.list_version, msg.ts_ms, now_ms))
            conn.execute("UPDATE gateways SET applied_list_version = ?, applied_ms = ? "
                         "WHERE id = ?", (msg.list_version, now_ms, gateway))
        event = "gateway_applied" if msg.status == "applied" else "gateway_refused"
        log.info(event, gateway=gateway, stream=msg.stream, seq=msg.seq, reason=msg.reason,
                 list_version=msg.list_version)

    def _on_status(self, gateway: str, msg: Status) -> None:
        now_ms = self._now_ms()
        with self._db.tx() as conn:
            conn.execute("UPDATE gateways SET status = ?, status_ms = ? WHERE id = ?",
                         (msg.model_dump_json(), now_ms, gateway))
            if "list" in msg.versions:
                conn.execute("UPDATE gateways SET applied_list_version = ?, applied_ms = ? "
                             "WHERE id = ?", (msg.versions["list"], now_ms, gateway))
        log.info("gateway_status", gateway=gateway, state=msg.state)

    def _on_resync(self, gateway: str, msg: ResyncRequest) -> None:
        now_ms = self._now_ms()
        reason = msg.reason[:200]  # the gateway's words, kept short
        with self._db.tx() as conn:
            answered = conn.execute(
                "UPDATE gateways SET resync_requested_ms = ?, resync_reason = ? WHERE id = ? "
                "RETURNING resync_answered_ms", (now_ms, reason, gateway)).fetchone()[0]
        due = 0.0 if answered is None else answered / 1000 + self.resync_interval_s
        if self._clock() >= due:
            self._resync_due.pop(gateway, None)
            self._do_snapshot(gateway, MAX_CHUNK_ENTRIES, resync=True)
            log.info("resync_answered", gateway=gateway, reason=reason,
                     gateway_list_version=msg.list_version)
        elif gateway not in self._resync_due:
            self._resync_due[gateway] = due
            log.info("resync_deferred", gateway=gateway, reason=reason,
                     due_in_s=round(due - self._clock(), 1))

    def _answer_due_resyncs(self) -> None:
        now = self._clock()
        for gateway, due in list(self._resync_due.items()):
            if now >= due:
                del self._resync_due[gateway]
                self._do_snapshot(gateway, MAX_CHUNK_ENTRIES, resync=True)
                log.info("resync_answered", gateway=gateway, deferred=True)

    # -- reports -----------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Everything ``show`` prints, as plain data."""
        db = self._db.db()
        all_seq = db.execute("SELECT seq FROM streams WHERE name = 'all'").fetchone()[0]
        gateways = [self._gateway_report(db, row) for row in
                    db.query("SELECT * FROM gateways ORDER BY id")]
        global_revoked = db.execute("SELECT count(*) FROM revocations WHERE gateway = '*'"
                                    ).fetchone()[0]
        unknown = db.execute("SELECT value FROM meta WHERE key = 'unknown_gateway_messages'"
                             ).fetchone()
        return {"all_seq": all_seq, "global_revocations": global_revoked,
                "unknown_gateway_messages": int(unknown[0]) if unknown else 0,
                "gateways": gateways}

    def gateway_report(self, gateway: str) -> dict[str, Any]:
        """The ``show`` report of one gateway."""
        return self._gateway_report(self._db.db(), self._gateway_row(gateway))

    @staticmethod
    def _gateway_report(db: sqlite_utils.Database, row: dict[str, Any]) -> dict[str, Any]:
        gw = row["id"]

        def one(sql: str) -> Any:
            return db.execute(sql, [gw]).fetchone()[0]

        status = json.loads(row["status"]) if row["status"] else None
        applied = {r["stream"]: {k: r[k] for k in ("seq", "status", "reason",
                                                   "list_version", "ts_ms", "received_ms")}
                   for r in db.query("SELECT * FROM applied WHERE gateway = ? "
                                     "ORDER BY stream", [gw])}
        problems = [{"seq": r["seq"], "problem": r["problem"], "found_ms": r["found_ms"]}
                    for r in db.query("SELECT * FROM chain_problems WHERE gateway = ? "
                                      "ORDER BY seq, problem", [gw])]
        return {
            "gateway": gw,
            "site": row["site"],
            "online": None if status is None else status.get("state") == "online",
            "status": status,
            "status_ms": row["status_ms"],
            "list": {"published": row["list_version"],
                     "published_ms": row["list_published_ms"],
                     "applied": row["applied_list_version"],
                     "applied_ms": row["applied_ms"],
                     "current": row["applied_list_version"] == row["list_version"]},
            "streams": {"rev": row["rev_seq"], "cmd": row["cmd_seq"], "hb": row["hb_seq"],
                        "ack": row["ack_seq"]},
            "reported_versions": (status or {}).get("versions", {}),
            "applied": applied,
            "entries": one("SELECT count(*) FROM entries WHERE gateway = ?"),
            "revocations": one("SELECT count(*) FROM revocations WHERE gateway = ?"),
            "events": {"stored": one("SELECT count(*) FROM events WHERE gateway = ?"),
                       "highest_seq": one("SELECT max(seq) FROM events WHERE gateway = ?"),
                       "acked_upto": row["acked_upto"]},
            "chain_problems": problems,
            "resync": {"requested_ms": row["resync_requested_ms"],
                       "reason": row["resync_reason"],
                       "answered_ms": row["resync_answered_ms"]},
            "malformed": row["malformed"],
        }

    def events(self, gateway: str, *, limit: int | None = None,
               after_seq: int = 0) -> list[dict[str, Any]]:
        """Stored events of ``gateway`` in seq order (the newest ``limit`` if given)."""
        self._gateway_row(gateway)
        rows = list(self._db.db().query(
            "SELECT * FROM events WHERE gateway = ? AND seq > ? ORDER BY seq DESC LIMIT ?",
            [gateway, after_seq, -1 if limit is None else limit]))
        rows.reverse()
        return [{**{k: r[k] for k in ("seq", "event_id", "ts_ms", "kind", "door", "reader",
                                      "direction", "reason", "cred")},
                 "data": json.loads(r["data"]), "prev_hash": r["prev_hash"],
                 "hash": r["hash"], "received_ms": r["received_ms"]} for r in rows]
