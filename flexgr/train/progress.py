"""Training progress on the console: a rich bar on a terminal, plain log lines elsewhere.

The bar shows ``epoch i/N``, the epoch's steps, the loss (from the first step on: until the
first training record, the running mean of the steps so far), lr, tokens/s, the epoch's time
and an overall ETA (the epochs left at the pace so far, evaluation included; early stopping can
end the run sooner). Evaluation gets a bar of its own while it runs.
"""

from __future__ import annotations

import time
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
from torch import Tensor


def clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Pace:
    """Seconds per training batch and per epoch end (evaluation, checkpoint), measured in this
    process, and the ETA of the whole run from them."""

    def __init__(self, max_epochs: int | None) -> None:
        self.max_epochs = max_epochs
        self._epoch_started: float | None = None
        self._batches_at_start = 0
        self._train_s = 0.0  # summed over the finished epochs' training parts
        self._train_batches = 0
        self._end_s = 0.0  # evaluation + checkpoint time of finished epochs
        self._ends = 0
        self._train_done: float | None = None  # when this epoch's last batch finished

    def start_epoch(self, done_batches: int) -> None:
        now = time.perf_counter()
        if self._train_done is not None:
            self._end_s += now - self._train_done
            self._ends += 1
        self._epoch_started, self._batches_at_start, self._train_done = now, done_batches, None

    def epoch_trained(self, batches: int) -> None:
        """The epoch's last batch is done (evaluation comes next)."""
        if self._epoch_started is None or self._train_done is not None:
            return
        self._train_done = time.perf_counter()
        self._train_s += self._train_done - self._epoch_started
        self._train_batches += batches - self._batches_at_start

    def eta(self, epoch: int, done: int, total: int) -> str:
        """``12:34`` for the run's remaining time, ``-`` until a batch has been timed."""
        if self.max_epochs is None or self._epoch_started is None:
            return "-"
        batches, seconds = self._train_batches, self._train_s
        if self._train_done is None:  # the epoch's own batches so far
            batches += done - self._batches_at_start
            seconds += time.perf_counter() - self._epoch_started
        if batches <= 0:
            return "-"
        per_batch = seconds / batches
        per_end = self._end_s / self._ends if self._ends else 0.0
        epochs_after = max(0, self.max_epochs - epoch)
        left = (total - done) * per_batch + per_end + epochs_after * (total * per_batch + per_end)
        # Before the first evaluation has been timed the estimate leaves it out.
        return clock(left) if self._ends else f">{clock(left)}"


class TrainProgress:
    """``show=None``: a bar when the console is a terminal; otherwise one line per log interval
    (so a job's log file shows progress too). ``show=False``: epoch summaries only.

    ``max_epochs`` turns on ``epoch i/N`` and the overall ETA."""

    def __init__(
        self, console: Console, show: bool | None = None, *, max_epochs: int | None = None
    ) -> None:
        self.console = console
        self.bar = console.is_terminal if show is None else show
        self.lines = show is None and not console.is_terminal
        self.max_epochs = max_epochs
        self.pace = Pace(max_epochs)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._eval_task: TaskID | None = None
        self._epoch = 0
        self._total = 0
        self._done = 0
        self._logged = False  # a training record has been shown: stop reading early losses
        self._early_sum, self._early_steps = 0.0, 0

    def __enter__(self) -> Self:
        if self.bar:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[eta]}"),
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

    def _epoch_label(self, epoch: int) -> str:
        return f"epoch {epoch}/{self.max_epochs}" if self.max_epochs else f"epoch {epoch}"

    def start_epoch(self, epoch: int, total_batches: int, done_batches: int) -> None:
        self._epoch, self._total, self._done = epoch, total_batches, done_batches
        self.pace.start_epoch(done_batches)
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(
            self._epoch_label(epoch),
            total=total_batches,
            completed=done_batches,
            info="loss -",
            eta="",
        )

    def advance(self, loss: Tensor | float | None = None) -> None:
        """One training batch done. ``loss`` (the step's loss, on any device) is read only while
        something shows it before the first training record: the bar's running mean (every
        step until then), the first step's line; so the first steps show a loss at the cost of
        a few host syncs, and without a bar only the first step pays one (none when quiet).
        Later steps show the records' losses."""
        self._done += 1
        early = None
        shown = self._progress is not None or (self.lines and self._early_steps == 0)
        if loss is not None and not self._logged and shown:
            self._early_sum += float(loss)
            self._early_steps += 1
            early = self._early_sum / self._early_steps
            if self.lines and self._early_steps == 1:
                self.console.print(
                    f"{self._epoch_label(self._epoch)} step {self._done}: loss {early:.4f} "
                    "(first step)",
                    highlight=False,
                )
        if self._done >= self._total:
            self.pace.epoch_trained(self._done)
        if self._progress is not None and self._task is not None:
            fields = {"eta": self._eta()}
            if early is not None:
                fields["info"] = f"loss {early:.4f} (mean of {self._early_steps} steps)"
            self._progress.update(self._task, advance=1, **fields)

    def _eta(self) -> str:
        eta = self.pace.eta(self._epoch, self._done, self._total)
        return "" if eta == "-" else f"run ETA {eta}"

    def log(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self._logged = True
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task,
                info=f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s",
                eta=self._eta(),
            )
        elif self.lines:
            eta = self._eta()
            self.console.print(
                f"{self._epoch_label(self._epoch)} step {step}: loss {loss:.4f}, lr {lr:.2e}, "
                f"{tokens_per_s:,.0f} tok/s" + (f", {eta}" if eta else ""),
                highlight=False,
            )

    def start_eval(self, split: str) -> None:
        """An evaluation begins; :meth:`eval_batch` reports its batches."""
        self.pace.epoch_trained(self._done)
        if self._progress is not None:
            self._end_eval()
            self._eval_task = self._progress.add_task(
                f"evaluating {split}", total=None, info="", eta=""
            )
        elif self.lines:
            self.console.print(f"evaluating {split} ...", highlight=False)

    def eval_batch(self, done: int, total: int) -> None:
        if self._progress is not None and self._eval_task is not None:
            self._progress.update(self._eval_task, completed=done, total=total)

    def end_eval(self) -> None:
        self._end_eval()

    def _end_eval(self) -> None:
        if self._progress is not None and self._eval_task is not None:
            self._progress.remove_task(self._eval_task)
            self._eval_task = None

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False)
