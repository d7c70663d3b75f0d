"""Start-up checks of secret files: a key other users can read is refused, with the fix.

``permitgate doctor`` reports the same condition (agent/doctor.py, ``check_site_key``);
this is the check the agent itself makes before it reads the key.
"""

from __future__ import annotations

import stat
from pathlib import Path

from protocol.hashing import SecretError

_OTHERS = 0o077
"""Permission bits of group and others: a secret file has none of them."""


def require_private(path: Path, *, what: str = "site key") -> None:
    """Refuse the secret file at ``path`` if its group or other users have any access.

    Raises ``SecretError`` (exit status 2) naming the file, its mode and the commands that
    fix it. A file that does not exist, or cannot be looked at, passes: reading it reports
    that, with its own message (``agent.keys.load_site_key``). A symbolic link is judged
    by the file it points to, which is what would be read.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if not mode & _OTHERS:
        return
    who = " and ".join(name for name, bits in (("its group", 0o070), ("other users", 0o007))
                       if mode & bits)
    access = "read" if mode & 0o044 else "written or run"
    raise SecretError(
        f"{path}: the {what} can be {access} by {who} (mode {mode:04o}); a {what} must "
        f"be private to the agent's user. Fix: 'chmod 600 {path}' (and 'chown "
        f"<agent user> {path}' if another user owns it), then start again")
