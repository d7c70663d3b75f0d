"""The page's own SQLite database (``web.db`` in the page's state folder): accounts,
sessions, one-time sign-up codes, sign-in back-off and the audit outbox.

The only module of the page that speaks SQL. Nothing the agent keeps is here: no card,
no permit, no tenant. Sessions are server-side and looked up on every request, so a
deleted or changed account signs out everywhere at once: deleting an account deletes its
sessions (foreign key, ``ON DELETE CASCADE``), and a session is valid only while its
account's ``changed_ms`` is the one it was made under (a password or role change bumps
it). Cookies carry a random token; the table holds its SHA-256, so a copy of the database
opens no session. The web server uses one connection from its event loop; the command
line opens its own (WAL, busy timeout), so both can write at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = (
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('landlord', 'installer')),
        pw_hash TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        changed_ms INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        id BLOB PRIMARY KEY,               -- SHA-256 of the cookie's token
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        user_changed_ms INTEGER NOT NULL,  -- the account as it was at sign-in
        csrf TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        seen_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX sessions_user ON sessions(user_id);
    CREATE TABLE setup_codes (
        hash BLOB PRIMARY KEY,             -- SHA-256 of the normalised code
        role TEXT NOT NULL,
        expires_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE backoff (
        key TEXT PRIMARY KEY,              -- 'account:<name>' or 'address:<ip>'
        failures INTEGER NOT NULL,
        last_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE audit_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        message TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE captures (
        id TEXT PRIMARY KEY,               -- the agent's capture id
        session BLOB NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        reader TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
)
"""Migrations, applied in order; ``PRAGMA user_version`` is the number applied."""
SEEN_EVERY_MS = 30_000
"""A session's last-seen time is written at most this often (an SD card's wear)."""
CAPTURES_KEPT_MS = 15 * 60 * 1000


class DatabaseError(Exception):
    """web.db is unusable; the message names the file."""


@dataclass(frozen=True, slots=True)
class User:
    """An account."""

    id: int
    name: str
    role: str
    pw_hash: str
    created_ms: int
    changed_ms: int


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in session and its account."""

    id: bytes
    user: User
    csrf: str
    created_ms: int
    seen_ms: int


def token_id(token: str) -> bytes:
    """The stored form of a session token or sign-up code."""
    return hashlib.sha256(token.encode()).digest()


class WebDB:
    """web.db: open (creating and migrating it), then one method per question."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                        timeout=5.0)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            raise DatabaseError(f"{path}: cannot open the page's database: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def now_ms(self) -> int:
        """The database's clock, in Unix milliseconds."""
        return int(self._clock() * 1000)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(SCHEMA):
                raise DatabaseError(f"{self.path}: schema version {version} is newer than "
                                    "this program; upgrade permitgate")
            for number in range(version, len(SCHEMA)):
                for statement in SCHEMA[number].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version={len(SCHEMA)}")

    # -- accounts --------------------------------------------------------------------------

    def users(self) -> list[User]:
        """Every account, by name."""
        rows = self.conn.execute("SELECT * FROM users ORDER BY name").fetchall()
        return [User(*row) for row in rows]

    def user(self, name: str) -> User | None:
        """The account called ``name``."""
        row = self.conn.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()
        return None if row is None else User(*row)

    def add_user(self, name: str, role: str, pw_hash: str) -> User:
        """Create an account; ``ValueError`` if the name is taken."""
        now = self.now_ms()
        try:
            with self._tx() as conn:
                cur = conn.execute("INSERT INTO users (name, role, pw_hash, created_ms, "
                                   "changed_ms) VALUES (?, ?, ?, ?, ?)",
                                   (name, role, pw_hash, now, now))
        except sqlite3.IntegrityError:
            raise ValueError(f"an account called {name!r} exists already") from None
        assert cur.lastrowid is not None
        return User(cur.lastrowid, name, role, pw_hash, now, now)

    def change_user(self, name: str, *, role: str | None = None,
                    pw_hash: str | None = None) -> bool:
        """Change an account's role or password; its sessions end. False if unknown."""
        now = self.now_ms()
        with self._tx() as conn:
            row = conn.execute("SELECT id, changed_ms FROM users WHERE name=?",
                               (name,)).fetchone()
            if row is None:
                return False
            conn.execute("UPDATE users SET role=coalesce(?, role), "
                         "pw_hash=coalesce(?, pw_hash), changed_ms=? WHERE id=?",
                         (role, pw_hash, max(now, row[1] + 1), row[0]))
            conn.execute("DELETE FROM sessions WHERE user_id=?", (row[0],))
        return True

    def delete_user(self, name: str) -> bool:
        """Delete an account and its sessions. False if unknown."""
        with self._tx() as conn:
            return conn.execute("DELETE FROM users WHERE name=?", (name,)).rowcount > 0

    # -- sessions ----------------------------------------------------------------------------

    def create_session(self, user: User, token: str, csrf: str) -> None:
        """Record a new session for ``token``."""
        now = self.now_ms()
        with self._tx() as conn:
            conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                         (token_id(token), user.id, user.changed_ms, csrf, now, now))

    def session(self, token: str, *, idle_ms: int, max_ms: int) -> Session | None:
        """The live session of ``token``, marked as seen; None (and the session gone)
        when it is unknown, idle too long, too old, or its account changed."""
        now = self.now_ms()
        sid = token_id(token)
        row = self.conn.execute(
            "SELECT s.user_changed_ms, s.csrf, s.created_ms, s.seen_ms, u.* FROM sessions s "
            "JOIN users u ON u.id = s.user_id WHERE s.id=?", (sid,)).fetchone()
        if row is None:
            return None
        user_changed, csrf, created, seen = row[:4]
        user = User(*row[4:])
        if user_changed != user.changed_ms or now - seen >= idle_ms or now - created >= max_ms:
            self.end_session(token)
            return None
        if now - seen >= min(SEEN_EVERY_MS, idle_ms // 10):
            self.conn.execute("UPDATE sessions SET seen_ms=? WHERE id=?", (now, sid))
            seen = now
        return Session(sid, user, csrf, created, seen)

    def end_session(self, token: str) -> None:
        """End the session of ``token`` (signing out)."""
        self.conn.execute("DELETE FROM sessions WHERE id=?", (token_id(token),))

    def prune(self, *, idle_ms: int, max_ms: int) -> int:
        """Delete expired sessions, codes and old back-off and capture rows."""
        now = self.now_ms()
        with self._tx() as conn:
            count = conn.execute("DELETE FROM sessions WHERE seen_ms <= ? OR created_ms <= ?",
                                 (now - idle_ms, now - max_ms)).rowcount
            conn.execute("DELETE FROM setup_codes WHERE expires_ms <= ?", (now,))
            conn.execute("DELETE FROM backoff WHERE last_ms <= ?", (now - 86_400_000,))
            conn.execute("DELETE FROM captures WHERE created_ms <= ?",
                         (now - CAPTURES_KEPT_MS,))
        return count

    # -- one-time sign-up codes ----------------------------------------------------------------

    def add_setup_code(self, code: str, role: str, valid_ms: int) -> int:
        """Store a code (normalised) for a new account of ``role``; returns its expiry."""
        expires = self.now_ms() + valid_ms
        with self._tx() as conn:
            conn.execute("INSERT INTO setup_codes VALUES (?, ?, ?)",
                         (token_id(code), role, expires))
        return expires

    def setup_code_role(self, code: str) -> str | None:
        """The role a live code is for, without using it."""
        row = self.conn.execute("SELECT role FROM setup_codes WHERE hash=? AND expires_ms > ?",
                                (token_id(code), self.now_ms())).fetchone()
        return None if row is None else str(row[0])

    def redeem_setup_code(self, code: str, name: str, pw_hash: str) -> User | None:
        """Use a live code once: create the account it is for. None if the code is not
        live; ``ValueError`` if the name is taken (the code stays usable)."""
        now = self.now_ms()
        try:
            with self._tx() as conn:
                row = conn.execute("SELECT role FROM setup_codes WHERE hash=? AND "
                                   "expires_ms > ?", (token_id(code), now)).fetchone()
                if row is None:
                    return None
                conn.execute("DELETE FROM setup_codes WHERE hash=?", (token_id(code),))
                cur = conn.execute("INSERT INTO users (name, role, pw_hash, created_ms, "
                                   "changed_ms) VALUES (?, ?, ?, ?, ?)",
                                   (name, row[0], pw_hash, now, now))
        except sqlite3.IntegrityError:
            raise ValueError(f"an account called {name!r} exists already") from None
        assert cur.lastrowid is not None
        return User(cur.lastrowid, name, str(row[0]), pw_hash, now, now)

    # -- back-off ------------------------------------------------------------------------------

    def backoff(self, key: str) -> tuple[int, int]:
        """Failures counted against ``key`` and the time of the last one (ms)."""
        row = self.conn.execute("SELECT failures, last_ms FROM backoff WHERE key=?",
                                (key,)).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def set_backoff(self, key: str, failures: int) -> None:
        """Record ``failures`` against ``key`` now; 0 forgets the key."""
        if failures <= 0:
            self.conn.execute("DELETE FROM backoff WHERE key=?", (key,))
        else:
            self.conn.execute("INSERT OR REPLACE INTO backoff VALUES (?, ?, ?)",
                              (key, failures, self.now_ms()))

    # -- audit outbox ------------------------------------------------------------------------------

    def queue_audit(self, message: dict[str, Any]) -> int:
        """Keep an audit request until the agent has it; returns its id."""
        with self._tx() as conn:
            cur = conn.execute("INSERT INTO audit_outbox (message, created_ms) VALUES (?, ?)",
                               (json.dumps(message, separators=(",", ":")), self.now_ms()))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def pending_audits(self, limit: int = 100) -> list[tuple[int, dict[str, Any]]]:
        """The oldest audit requests not yet taken by the agent."""
        rows = self.conn.execute("SELECT id, message FROM audit_outbox ORDER BY id LIMIT ?",
                                 (limit,)).fetchall()
        return [(int(r[0]), json.loads(r[1])) for r in rows]

    def audit_sent(self, audit_id: int) -> None:
        """The agent recorded this audit request."""
        self.conn.execute("DELETE FROM audit_outbox WHERE id=?", (audit_id,))

    # -- captures ----------------------------------------------------------------------------------

    def add_capture(self, capture_id: str, session_id: bytes, reader: str) -> None:
        """Remember that ``session_id`` started the agent's capture ``capture_id``."""
        self.conn.execute("INSERT OR REPLACE INTO captures VALUES (?, ?, ?, ?)",
                          (capture_id, session_id, reader, self.now_ms()))

    def capture_reader(self, capture_id: str, session_id: bytes) -> str | None:
        """The reader of a capture this session started; None for anyone else's."""
        row = self.conn.execute("SELECT reader FROM captures WHERE id=? AND session=? AND "
                                "created_ms > ?", (capture_id, session_id,
                                                   self.now_ms() - CAPTURES_KEPT_MS)).fetchone()
        return None if row is None else str(row[0])
