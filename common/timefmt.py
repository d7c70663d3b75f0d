"""Times as the terminals of both sides print them."""

from __future__ import annotations


def age(seconds: float) -> str:
    """How long ago, in the largest fitting unit: ``12 s ago``, ``3 min ago``, ``2 d ago``
    (or ``… in the future`` for a negative age)."""
    if seconds < 0:
        return f"{-seconds:.0f} s in the future"
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172_800, "h", 3600)):
        if seconds < limit:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds / 86_400:.0f} d ago"
