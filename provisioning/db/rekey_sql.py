"""The statements of a site-key change-over (provisioning/site_rotation.py), one text for
both backends: each function runs inside the caller's transaction, on a SQLite or a
psycopg connection, with ``mark`` the backend's placeholder (``?`` or ``%s``).

``rekey_pending`` lists, per gateway in change-over, the entries still under the previous
key. A pair ``(old, new)`` reported by the gateway moves what the office holds under
``old`` to ``new``: the entry (when it is still pending), the gateway's own credential
revocation, and the enrollment record. A pair is left alone when ``new`` is already
another entry: a gateway cannot merge two cards' entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

Conn = Any
"""A ``sqlite3.Connection`` or a ``psycopg.Connection``: both have ``execute``."""


def _q(sql: str, mark: str) -> str:
    return sql if mark == "?" else sql.replace("?", mark)


def begin(conn: Conn, mark: str, gateway: str, site_key_path: str) -> int:
    """Hash new cards of ``gateway`` under the key at ``site_key_path`` from now on, and
    mark every entry it holds now as still under the previous key; returns how many."""
    conn.execute(_q("UPDATE gateways SET site_key_path = ? WHERE id = ?", mark),
                 (site_key_path, gateway))
    conn.execute(_q("DELETE FROM rekey_pending WHERE gateway = ?", mark), (gateway,))
    return int(conn.execute(_q("INSERT INTO rekey_pending (gateway, cred) SELECT gateway, "
                               "cred FROM entries WHERE gateway = ?", mark),
                            (gateway,)).rowcount)


def apply(conn: Conn, mark: str, gateway: str, pairs: Sequence[tuple[bytes, bytes]],
          now_ms: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """Move what ``gateway`` holds under each pair's old hash to its new one; returns the
    pairs whose entry moved (for a delta) and how many revocations moved."""
    moved: list[tuple[bytes, bytes]] = []
    revocations = 0
    for old, new in pairs:
        if old == new or conn.execute(_q(
                "SELECT 1 FROM entries WHERE gateway = ? AND cred = ?", mark),
                (gateway, new)).fetchone() is not None:
            continue  # another card's entry: never merged
        pending_here = conn.execute(_q(
            "DELETE FROM rekey_pending WHERE gateway = ? AND cred = ?", mark),
            (gateway, old)).rowcount
        if pending_here and conn.execute(_q(
                "UPDATE entries SET cred = ?, updated_ms = ? WHERE gateway = ? AND cred = ?",
                mark), (new, now_ms, gateway, old)).rowcount:
            moved.append((old, new))
        # The card's revocation under the new hash (revoked during the change-over) and
        # under the old one are the same card's: one is kept.
        if conn.execute(_q("SELECT 1 FROM revocations WHERE gateway = ? AND kind = "
                           "'credential' AND hash = ?", mark), (gateway, new)).fetchone():
            conn.execute(_q("DELETE FROM revocations WHERE gateway = ? AND kind = "
                            "'credential' AND hash = ?", mark), (gateway, old))
        else:
            revocations += conn.execute(_q(
                "UPDATE revocations SET hash = ? WHERE gateway = ? AND kind = 'credential' "
                "AND hash = ?", mark), (new, gateway, old)).rowcount
        conn.execute(_q("UPDATE enrollments SET cred = ? WHERE gateway = ? AND cred = ?",
                        mark), (new, gateway, old))
    return moved, revocations


def pending(conn: Conn, mark: str, gateway: str) -> int:
    """How many of ``gateway``'s entries are still under the previous key."""
    row = conn.execute(_q("SELECT count(*) AS n FROM rekey_pending WHERE gateway = ?",
                          mark), (gateway,)).fetchone()
    return int(row[0] if isinstance(row, tuple) else row["n"])


def end(conn: Conn, mark: str, gateway: str, *, drop: bool) -> int:
    """End the change-over; with ``drop`` the entries still under the previous key are
    deleted (their cards must be enrolled again). Returns how many were left pending."""
    if drop:
        conn.execute(_q("DELETE FROM entries WHERE gateway = ? AND cred IN (SELECT cred FROM "
                        "rekey_pending WHERE gateway = ?)", mark), (gateway, gateway))
    return int(conn.execute(_q("DELETE FROM rekey_pending WHERE gateway = ?", mark),
                            (gateway,)).rowcount)


class RekeyStatements:
    """The change-over methods of ``OfficeDatabase``, for a backend that has ``_tx()``
    (one transaction) and sets ``_MARK``."""

    _MARK = "?"

    def _tx(self) -> AbstractContextManager[Conn]:
        raise NotImplementedError

    def begin_rekey(self, gateway: str, site_key_path: str) -> int:
        """``begin`` in one transaction."""
        with self._tx() as conn:
            return begin(conn, self._MARK, gateway, site_key_path)

    def rekey(self, gateway: str, pairs: Sequence[tuple[bytes, bytes]], now_ms: int
              ) -> tuple[list[tuple[bytes, bytes]], int]:
        """``apply`` in one transaction."""
        with self._tx() as conn:
            return apply(conn, self._MARK, gateway, pairs, now_ms)

    def rekey_pending(self, gateway: str) -> int:
        """``pending``."""
        with self._tx() as conn:
            return pending(conn, self._MARK, gateway)

    def end_rekey(self, gateway: str, *, drop: bool) -> int:
        """``end`` in one transaction."""
        with self._tx() as conn:
            return end(conn, self._MARK, gateway, drop=drop)
