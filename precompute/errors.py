"""User-facing errors are one line: this turns any exception into that line."""

from __future__ import annotations


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of ``e``'s message (its type name when empty), at most ``limit`` characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
