"""The one exception type the data pipeline raises for bad input."""

from __future__ import annotations

import os

# Long lines (a whole CSV row of free text) would drown the message; the start is enough to find it.
_MAX_SNIPPET = 120


class DataError(ValueError):
    """Bad or unusable input data. The message is always a single line.

    ``path``, ``line`` (1-based) and ``text`` are kept as attributes so callers can act on them
    without parsing the message.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        text: str | None = None,
        where: str = "line",
    ) -> None:
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.line = line
        self.text = text
        super().__init__(_format(problem, self.path, line, text, where))


class FetchError(DataError):
    """A built-in dataset could not be obtained (download failed, checksum mismatch)."""


def snippet(text: str) -> str:
    """``text`` as a one-line, quoted, length-capped excerpt (repr escapes newlines and tabs)."""
    if len(text) > _MAX_SNIPPET:
        return repr(text[:_MAX_SNIPPET]) + "..."
    return repr(text)


def _format(problem: str, path: str | None, line: int | None, text: str | None, where: str) -> str:
    parts = []
    if path is not None:
        parts.append(path)
    if line is not None:
        parts.append(f"{where} {line}")
    head = ", ".join(parts)
    message = f"{head}: {problem}" if head else problem
    if text is not None:
        message += f": {snippet(text)}"
    # Guard the one-line promise even if a caller passes a multi-line problem string.
    return " ".join(message.splitlines())
