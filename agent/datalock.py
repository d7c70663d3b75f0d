"""One agent per data folder: an exclusive lock held for the agent's whole life.

Two agents on one folder would interleave their event chains (the second's events take
sequence numbers the first then fails to commit) and take over each other's control
socket. The lock is ``flock`` on ``agent.lock`` in the data folder: the kernel releases it
when the process ends, however it ends (SIGKILL, power cut), so a stale file never blocks a
restart. The file holds the owner's pid for the message a second agent prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from common.sqlite import StoreError


class AlreadyRunningError(Exception):
    """Another agent holds the data folder; the message names its pid and the folder."""


class DataLock:
    """The held lock; ``release`` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> DataLock:
        """Take the lock at ``path`` or raise ``AlreadyRunningError`` at once (no wait)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path.parent}: cannot create the store directory: "
                             f"{exc.strerror}") from exc
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the data folder's lock file: "
                             f"{exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            owner = holder_pid(path)
            who = f"pid {owner}" if owner else "another process"
            raise AlreadyRunningError(
                f"{path.parent}: another agent is running on this data folder ({who}); "
                "stop it first (systemctl stop permitgate), or give this one its own "
                "[store] path") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        """Free the lock (the file stays: removing it could race a new owner)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def holder_pid(path: Path) -> int | None:
    """The pid written in the lock file, if any."""
    try:
        text = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
