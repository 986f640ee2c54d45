"""Progress display for the slow steps of preparing a dataset (download, parse, write)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Reporter:
    """Shows one line per step on a terminal; does nothing when ``progress`` is None."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    def note(self, message: str) -> None:
        """A one-off line above the bars (e.g. which source is being used)."""
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self._progress is None:
            yield
            return
        task = self._progress.add_task(description, total=None, detail="")
        try:
            yield
        finally:
            self._progress.update(task, total=1, completed=1)

    @contextmanager
    def transfer(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """Yields ``advance(n_bytes)`` for a download of ``total`` bytes (None if unknown)."""
        progress = self._progress
        if progress is None:
            yield lambda n: None
            return
        task = progress.add_task(description, total=total, detail="")
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            size = decimal(done) + (f" / {decimal(total)}" if total else "")
            progress.update(task, advance=n, detail=size)

        try:
            yield advance
        finally:
            progress.update(task, total=done or 1, completed=done or 1)


@contextmanager
def reporter(show: bool | None = None) -> Iterator[Reporter]:
    """``show=None`` shows progress only when stderr is a terminal (not in pipes, CI, tests)."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        yield Reporter(None)
        return
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield Reporter(progress)
