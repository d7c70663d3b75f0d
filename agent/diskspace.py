"""Room on the SD card: a reserve file that is given back when the disk fills, so the
alarm that says so can still be written.

On a full file system SQLite cannot even open a database in WAL mode (it needs room for
``-wal`` and ``-shm``): an agent stopped while the disk was full could not start again,
and under ``Restart=always`` it looped without deciding anything. The agent keeps
``reserve.bin`` (``[store] reserve_mb``, default 8 MiB, allocated with ``fallocate`` so
the blocks are really taken) in its data folder, deletes it the moment a write fails for
lack of space (or before opening the store on a full disk), records ``disk_full``, and
allocates it again once the disk has twice that much room.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

RESERVE_NAME = "reserve.bin"


def free_bytes(folder: Path) -> int:
    """Bytes free for an unprivileged writer in ``folder``'s file system (0 if unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def looks_full(error: BaseException | str, folder: Path, *, threshold: int = 1 << 20
               ) -> bool:
    """Whether a storage error is (most likely) the disk being full: SQLite's own
    SQLITE_FULL text, ENOSPC, or an I/O error while under ``threshold`` bytes are free."""
    text = str(error).lower()
    if "database or disk is full" in text or "no space left" in text:
        return True
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "disk i/o error" in text and free_bytes(folder) < threshold


class Reserve:
    """The reserve file in one data folder."""

    def __init__(self, folder: Path, size: int) -> None:
        self.path = folder / RESERVE_NAME
        self.size = size

    @property
    def held(self) -> bool:
        """Whether the reserve is allocated."""
        try:
            return self.path.stat().st_size >= self.size
        except OSError:
            return False

    def release(self) -> bool:
        """Give the reserve back to the file system; True if there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError:
            return False
        return True

    def ensure(self) -> bool:
        """Allocate the reserve if it is missing and the disk has twice its size free;
        True when it is held afterwards. Never fills the disk itself."""
        if self.size <= 0:
            return False
        if self.held:
            return True
        if free_bytes(self.path.parent) < 2 * self.size:
            return False
        tmp = self.path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True


def usage(folder: Path) -> dict[str, int]:
    """Free and total bytes of ``folder``'s file system."""
    try:
        du = shutil.disk_usage(folder)
    except OSError:
        return {"free_bytes": 0, "total_bytes": 0}
    return {"free_bytes": du.free, "total_bytes": du.total}
