"""Training progress on the console: a rich bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """``show=None``: a bar when the console is a terminal; otherwise one line per log interval
    (so a job's log file shows progress too). ``show=False``: epoch summaries only."""

    def __init__(self, console: Console, show: bool | None = None) -> None:
        self.console = console
        self.bar = console.is_terminal if show is None else show
        self.lines = show is None and not console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._epoch = 0

    def __enter__(self) -> Self:
        if self.bar:
            self._progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[throughput]} tok/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
            self._progress = None

    def start_epoch(self, epoch: int, total_batches: int, done_batches: int) -> None:
        self._epoch = epoch
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(
            "train",
            total=total_batches,
            completed=done_batches,
            epoch=epoch,
            loss="-",
            lr="-",
            throughput="-",
        )

    def advance(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def log(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, loss=f"{loss:.4f}", lr=f"{lr:.2e}", throughput=f"{tokens_per_s:,.0f}"
            )
        elif self.lines:
            self.console.print(
                f"epoch {self._epoch} step {step}: loss {loss:.4f}, lr {lr:.2e}, "
                f"{tokens_per_s:,.0f} tok/s",
                highlight=False,
            )

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False)
