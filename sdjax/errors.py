"""How an expected error reads on a command line: one line that says what is wrong."""

from __future__ import annotations


def one_line(err: BaseException) -> str:
    """The first line of an error's message (an OS error as "reason: path"; an empty one as its type)."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
