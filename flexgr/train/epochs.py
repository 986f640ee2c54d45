"""The run around the steps, shared by every task: epochs, evaluation of the selection split,
best-epoch tracking, checkpoints, exact resume, the final test and the export.

:class:`EpochTrainer` is the one loop; a task's trainer (retrieval's
:class:`flexgr.train.loop.Trainer`, ranking's :class:`flexgr.ranking.train.RankingTrainer`)
builds its data, model and optimizer and supplies the task's parts through a few hooks:
``run_epoch`` (the steps), ``_evaluate`` (the metrics of a split), ``selection_metric`` and
``lower_is_better`` (which epoch is best), ``_export`` (the exported model and its metadata).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from torch import Tensor, nn

from flexgr.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from flexgr.train.config import Config, dump_config
from flexgr.train.progress import TrainProgress
from flexgr.train.rundir import MetricsLog, RunDir
from flexgr.train.schedule import lr_at

if TYPE_CHECKING:
    from flexgr.train.warm_start import WarmStart

# Timing fields of metrics.jsonl records: they differ between otherwise identical runs.
TIMING_KEYS = frozenset({"tokens_per_s", "impressions_per_s", "elapsed_s", "eval_s", "train_s"})


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint."""

    epoch: int = 1  # the epoch in progress, 1-based
    batch_in_epoch: int = 0  # batches of that epoch already trained
    step: int = 0  # optimizer steps taken
    best_value: float | None = None  # the selection metric at the best epoch so far
    best_epoch: int = 0
    best_step: int = 0
    bad_epochs: int = 0  # epochs since the best one
    stopped_early: bool = False
    metrics_size: int = 0  # bytes of metrics.jsonl that this state accounts for


@dataclass
class RunResult:
    run_dir: Path
    test: dict[str, float]  # metrics of the exported model on the test targets
    epoch: int  # the epoch those metrics (and the exported weights) come from
    steps: int
    stop_reason: str  # "max_epochs", "early_stopping", "max_steps" or "max_minutes"


class TrainError(ValueError):
    """A run that cannot start as configured (no CUDA, nothing to train on, ...)."""


class NonFiniteLoss(TrainError):
    """The training loss became NaN or infinite: the run stops instead of training on (and
    evaluating, selecting and checkpointing) weights that no longer mean anything."""


class Callback:
    """Hooks into :func:`flexgr.train.fit`; override what you need. Raising from a hook stops
    the run.

    Under torchrun the hooks run on every rank with the same arguments (records are computed
    everywhere and written by rank 0), so a hook that stops the run stops every rank."""

    def on_log(self, record: dict[str, Any]) -> None: ...

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, state: TrainState) -> None: ...


class EpochTrainer:
    """The epoch loop of one training process. A subclass's ``__init__`` sets ``cfg``, ``run``,
    ``console``, ``show_progress``, ``callbacks``, ``device``, ``amp_dtype``, ``model``,
    ``optimizer``, ``is_main`` and ``metrics`` (rank 0's log, None elsewhere) and calls
    :meth:`_start_state`; it implements ``run_epoch``, ``_evaluate`` and ``_export``."""

    cfg: Config
    run: RunDir
    console: Console
    show_progress: bool | None
    callbacks: list[Callback]
    device: torch.device
    amp_dtype: torch.dtype | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    is_main: bool
    metrics: MetricsLog | None

    def _start_state(self) -> None:
        self.state = TrainState()
        self.best_weights: dict[str, Tensor] | None = None
        # Losses summed on the device since the last training record or checkpoint: a host
        # sync only at log intervals.
        self._loss_acc: Tensor | None = None
        self._loss_steps = 0
        self._deadline: float | None = None  # perf_counter() at which max_minutes runs out

    _clock = staticmethod(time.perf_counter)  # max_minutes' clock (tests replace it)

    def limit_reached(self) -> str | None:
        """The limit that says to stop before the next step ("max_steps" or "max_minutes"), or
        None. Once reached it stays reached: steps and the clock only move forward."""
        t = self.cfg.train
        if t.max_steps and self.state.step >= t.max_steps:
            return "max_steps"
        if self._deadline is not None and self._clock() >= self._deadline:
            return "max_minutes"
        return None

    # ------------------------------------------------------------ the task's parts

    def run_epoch(self, progress: TrainProgress) -> bool:
        """Train the rest of the current epoch; False if a limit (:meth:`limit_reached`) cut
        it short."""
        raise NotImplementedError

    def _evaluate(self, which: str, progress: TrainProgress | None) -> dict[str, float]:
        """The task's metrics of the model on split ``which``."""
        raise NotImplementedError

    def _export(self, epoch: int, test: dict[str, float]) -> None:
        """Write the selected model (the weights now loaded) to the run's export files."""
        raise NotImplementedError

    @property
    def selection_metric(self) -> str:
        return self.cfg.eval.metric

    def lower_is_better(self, metric: str) -> bool:
        return False

    def summary_keys(self, test: dict[str, float]) -> list[str]:
        """The test metrics of the run's last line."""
        return [k for k in ("hr@10", "ndcg@10", "mrr") if k in test]

    def epoch_note(self, metrics: dict[str, float]) -> str:
        """Text after the selection metric on an epoch's line."""
        return ""

    # ------------------------------------------------------------ records and checkpoints

    def warm_start(self) -> WarmStart:
        """Load ``train.init_from``'s weights (before the run's first record, so that a refused
        warm start leaves a directory the next attempt can reuse); :meth:`log_warm_start`
        records what it returns."""
        import torch.distributed as dist

        from flexgr.distributed import unwrap
        from flexgr.train.parallel import on_main
        from flexgr.train.warm_start import held_out_of, warm_start

        t, model = self.cfg.train, unwrap(self.model)
        held_out = held_out_of(self.data_metadata())
        args = (t.init_from, t.init_module, self.item_ids(), held_out)
        ctx = getattr(self, "ctx", None)
        if ctx is None or ctx.world_size == 1:
            warm = warm_start(model, *args)
        else:
            # Rank 0 reads the source and its refusal reaches every rank (a rank that cannot
            # read what rank 0 can would otherwise fail alone, unheard, and rank 0 wait in the
            # next collective); the weights follow from rank 0 (DDP broadcast its own at start).
            warm = on_main(ctx, lambda: warm_start(model, *args))
            with torch.no_grad():
                for tensor in model.state_dict().values():
                    dist.broadcast(tensor, src=0)
        self.console.print(warm.describe(), highlight=False)
        return warm

    def log_warm_start(self, warm: WarmStart) -> None:
        record = {"kind": "warm_start", "step": 0, "source": warm.source, "arch": warm.arch}
        record.update(weights_sha256=warm.weights_sha256, module=warm.module)
        record.update(loaded=warm.loaded, kept=warm.kept)
        self._write(record)

    def item_ids(self) -> list[str]:
        """The raw item id of each embedding row (index i is ``item_ids()[i - 1]``), as the
        export records them."""
        raise NotImplementedError

    def data_metadata(self) -> dict[str, Any]:
        """What the run trained and evaluated on (task, dataset, protocol...): the export's
        metadata without the epoch's, and what a warm start compares
        (:func:`flexgr.train.warm_start.held_out_of`)."""
        raise NotImplementedError

    def _write(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
        for callback in self.callbacks:
            callback.on_log(record)

    def _mean_loss(self) -> float:
        """The mean training loss since the last record (and start a new interval); raises
        :class:`NonFiniteLoss` if a step's loss in it was NaN or infinite."""
        acc, steps = self._loss_acc, self._loss_steps
        self._loss_acc, self._loss_steps = None, 0
        if acc is None:
            return float("nan")
        loss = float(acc) / steps
        self._require_finite(loss, steps)
        return loss

    def _check_loss(self) -> None:
        """Raise :class:`NonFiniteLoss` if a step since the last record had a NaN or infinite
        loss. One host sync, so it is called only where the loop waits anyway (before an
        evaluation or a checkpoint): a NaN in any step makes the device-side sum NaN, so
        checking the sum there and at every record covers every step without a per-step sync."""
        if self._loss_acc is not None:
            self._require_finite(float(self._loss_acc) / self._loss_steps, self._loss_steps)

    def _require_finite(self, mean_loss: float, steps: int) -> None:
        if math.isfinite(mean_loss):
            return
        last = self.state.step
        raise NonFiniteLoss(
            f"training stopped: the mean training loss of steps {last - steps + 1}-{last} "
            f"(epoch {self.state.epoch}) is {mean_loss}; {self.run.last_checkpoint} was saved "
            "before any non-finite loss (lower train.lr or set train.grad_clip, then --resume "
            "or start again)"
        )

    def _add_loss(self, loss: Tensor) -> None:
        self._loss_acc = loss if self._loss_acc is None else self._loss_acc + loss
        self._loss_steps += 1

    def resume(self) -> None:
        ckpt = load_checkpoint(self.run.require_checkpoint())
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        self.best_weights = ckpt.get("best_model")
        acc = ckpt.get("loss_acc")
        self._loss_acc = acc.to(self.device) if acc is not None else None
        self._loss_steps = ckpt.get("loss_steps", 0)
        # Rank 0's generator states serve every rank: the ranks draw alike (parallel.py).
        restore_rng(ckpt["rng"], self.device)
        if self.metrics is not None:
            self.metrics.truncate(self.state.metrics_size)
        if self.best_weights is not None and self.is_main:
            self._write_best()  # best.pt may be ahead of last.pt if the run died between them

    def save(self) -> None:
        self._check_loss()  # never checkpoint weights trained through a NaN loss
        if self.metrics is not None:
            self.state.metrics_size = self.metrics.size
            self.metrics.sync()
            save_checkpoint(
                self.run.last_checkpoint,
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "state": dataclasses.asdict(self.state),
                    "rng": capture_rng(self.device),
                    "best_model": self.best_weights,
                    # The running loss sum stays a tensor, so the next training record sums the
                    # same floats in the same order whether or not the run was resumed between.
                    "loss_acc": self._loss_acc,
                    "loss_steps": self._loss_steps,
                    "config": dump_config(self.cfg),
                },
            )
        for callback in self.callbacks:
            callback.on_checkpoint(self.state)

    def _write_best(self) -> None:
        save_checkpoint(
            self.run.best_checkpoint,
            {
                "model": self.best_weights,
                "epoch": self.state.best_epoch,
                "step": self.state.best_step,
                "metric": self.selection_metric,
                "value": self.state.best_value,
            },
        )

    # ------------------------------------------------------------ steps

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch, for a schedule over the whole run."""
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        if t.lr_schedule == "constant":  # needs no run length
            return lr_at(t, step, total_steps=0)
        total = t.max_epochs * self.steps_per_epoch
        return lr_at(t, step, min(total, t.max_steps) if t.max_steps else total)

    def _begin_step(self) -> contextlib.AbstractContextManager:
        """Set this step's learning rate; the autocast context of the forward."""
        self._set_lr()
        return self._autocast()

    def _set_lr(self) -> None:
        lr = self.lr_at(self.state.step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):  # a captured step reads it at its address
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        """The forward's autocast context; ``cache_enabled=False`` inside CUDA-graph capture
        (the cast weights would otherwise be cached in the graph's memory)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache_enabled)

    def _descend(self, loss: Tensor) -> None:
        """Backward and one optimizer step. Under DDP the gradients are already summed over the
        ranks when clipping sees them, so every rank clips by the same norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()

    # ------------------------------------------------------------ evaluation

    @property
    def eval_amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of evaluation: the training one, or None under eval.precision=fp32."""
        return None if self.cfg.eval.precision == "fp32" else self.amp_dtype

    @property
    def selection_split(self) -> str:
        """The split that picks the epoch: val, or test under gr-compatible (no val there)."""
        return "test" if self.cfg.data.protocol == "gr-compatible" else "val"

    def evaluate(
        self, which: str, progress: TrainProgress | None = None
    ) -> tuple[dict[str, float], float]:
        """The metrics of split ``which`` and the seconds they took."""
        start = time.perf_counter()
        if progress is not None:
            progress.start_eval(which)
        try:
            metrics = self._evaluate(which, progress)
        finally:
            if progress is not None:
                progress.end_eval()
        return metrics, time.perf_counter() - start

    def end_of_epoch(self, progress: TrainProgress, partial: bool) -> dict[str, float]:
        """Evaluate the selection split and track the best epoch."""
        self._check_loss()  # the evaluation syncs anyway; do not rank with diverged weights
        state, which, name = self.state, self.selection_split, self.selection_metric
        metrics, seconds = self.evaluate(which, progress)
        record: dict[str, Any] = {"kind": "eval", "split": which, "epoch": state.epoch}
        record.update(step=state.step, **metrics)
        if partial:
            record["partial"] = True
        record["eval_s"] = seconds
        self._write(record)
        value = metrics[name]
        if state.best_value is None:
            better = True
        elif self.lower_is_better(name):
            better = value < state.best_value
        else:
            better = value > state.best_value
        # gr-compatible reports the last epoch, so the latest one is always "best".
        if which == "test" or better:
            state.best_value, state.best_epoch, state.best_step = value, state.epoch, state.step
            state.bad_epochs = 0
            # Kept on every rank: each evaluates its share of test with these weights at the end.
            self.best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
            if self.is_main:
                self._write_best()
        else:
            state.bad_epochs += 1
        progress.print(
            f"epoch {state.epoch}{' (partial)' if partial else ''}: {which} {name} {value:.4f}"
            f"{self.epoch_note(metrics)}; best {state.best_value:.4f} at epoch "
            f"{state.best_epoch} ({seconds:.1f} s eval)"
        )
        return metrics

    # ------------------------------------------------------------ the run

    def fit(self) -> RunResult:
        t, state = self.cfg.train, self.state
        stop_reason = "max_epochs"
        if t.max_minutes:
            self._deadline = self._clock() + 60.0 * t.max_minutes
        with TrainProgress(self.console, self.show_progress, max_epochs=t.max_epochs) as progress:
            while state.epoch <= t.max_epochs and not state.stopped_early:
                limit = self.limit_reached()
                if limit is not None:
                    stop_reason = limit
                    break
                epoch_start = time.perf_counter()
                if not self.run_epoch(progress):
                    stop_reason = self.limit_reached() or stop_reason  # the limit that cut it
                    self.save()
                    break
                train_seconds = time.perf_counter() - epoch_start
                metrics = self.end_of_epoch(progress, partial=False)
                for callback in self.callbacks:
                    callback.on_epoch_end(state, metrics)
                state.epoch += 1
                state.batch_in_epoch = 0
                if t.patience and state.bad_epochs >= t.patience:
                    state.stopped_early = True
                record = {"kind": "epoch", "epoch": state.epoch - 1, "step": state.step}
                record["train_s"] = train_seconds
                self._write(record)
                self.save()
            if state.stopped_early:
                stop_reason = "early_stopping"
            if stop_reason in ("max_steps", "max_minutes") and state.batch_in_epoch > 0:
                # A cut-short epoch still gets its evaluation, so a cut run has a model.
                self.end_of_epoch(progress, partial=True)
            return self.finish(progress, stop_reason)

    def finish(self, progress: TrainProgress, stop_reason: str) -> RunResult:
        """Test the selected epoch's weights, export them, close the run's log."""
        state = self.state
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        epoch = state.best_epoch if self.best_weights is not None else state.epoch
        test, seconds = self.evaluate("test", progress)
        record: dict[str, Any] = {"kind": "eval", "split": "test", "epoch": epoch}
        record.update(step=state.best_step, final=True, **test, eval_s=seconds)
        self._write(record)
        self._export(epoch, test)
        progress.print(
            f"test at epoch {epoch}: "
            + ", ".join(f"{k} {test[k]:.4f}" for k in self.summary_keys(test))
            + f"; model in {self.run.model}.safetensors"
        )
        if self.metrics is not None:
            self.metrics.close()
        return RunResult(self.run.root, test, epoch, state.step, stop_reason)

    def selected_by(self) -> str:
        """How the exported epoch was chosen (the export's metadata)."""
        if self.selection_split == "test":
            return "last epoch"
        return f"val {self.selection_metric}"
