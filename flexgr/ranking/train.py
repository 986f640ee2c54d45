"""Training a ranking model: epochs of request (ROO) or impression batches, per-task losses,
validation NE/AUC/GAUC, early stopping, checkpoints, export.

``flexgr train`` runs this for ``model.arch`` values whose spec has ``task="ranking"``
(:func:`flexgr.train.loop.fit` picks the trainer); the run directory, metrics.jsonl records,
checkpoints and resume work as for retrieval (docs/run-dir.md, docs/ranking.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import Tensor

from flexgr.export import export_model
from flexgr.model.registry import spec_of
from flexgr.ranking.batch import RankingBatch, impression_batch, request_batch
from flexgr.ranking.config import LOWER_IS_BETTER
from flexgr.ranking.evaluate import evaluate_ranking
from flexgr.ranking.requests import impressions_of, sample_per_user
from flexgr.ranking.setup import new_ranking_model, ranking_data
from flexgr.ranking.tasks import task_losses
from flexgr.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from flexgr.train.config import Config, dump_config, eval_batch_size
from flexgr.train.loop import Callback, RunResult, TrainError, TrainState
from flexgr.train.progress import TrainProgress
from flexgr.train.rundir import MetricsLog, RunDir
from flexgr.train.runtime import autocast_dtype, resolve_device, seed_everything, set_deterministic
from flexgr.train.setup import load_dataset


def tokens_of(model: torch.nn.Module, batch: RankingBatch) -> int:
    """Tokens the model's encoder reads for ``batch`` (interleaved HSTU: two per event)."""
    per_event = 2 if getattr(model.cfg, "layout", "merged") == "interleaved" else 1
    return per_event * batch.num_history + batch.num_candidates


class RankingTrainer:
    """One process's ranking run; the same surface as :class:`flexgr.train.loop.Trainer`."""

    def __init__(
        self,
        cfg: Config,
        run: RunDir,
        console: Console,
        show_progress: bool | None,
        callbacks: Sequence[Callback],
        ctx: Any = None,
    ) -> None:
        if ctx is not None:
            raise TrainError("ranking models train in one process; run without torchrun")
        self.cfg, self.run, self.console = cfg, run, console
        self.show_progress, self.callbacks = show_progress, list(callbacks)
        t = cfg.train
        if t.deterministic:
            set_deterministic(True)
        try:
            self.device = resolve_device(t.device)
            self.amp_dtype = autocast_dtype(t.precision, self.device)
        except ValueError as err:
            raise TrainError(str(err)) from None
        self.data = load_dataset(cfg)
        try:
            self.examples = ranking_data(cfg, self.data)
        except ValueError as err:
            raise TrainError(str(err)) from None
        self.split = self.examples.split
        if len(self.split.train) == 0:
            raise TrainError(f"{self.data.name!r} has no training requests; nothing to train on")
        seed_everything(t.seed)
        self.model = new_ranking_model(cfg, self.data, self.examples.events.actions).to(self.device)
        self.spec = spec_of(self.model)
        with torch.no_grad():
            self.model.output_bias.copy_(self._label_bias())
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            weight_decay=t.weight_decay,
        )
        weights = cfg.ranking.task_weights or [1.0] * len(self.examples.tasks)
        self.task_weights = torch.tensor(weights, dtype=torch.float32, device=self.device)
        self.state = TrainState()
        self.best_weights: dict[str, Tensor] | None = None
        self.metrics = MetricsLog(run.metrics)
        self._loss_acc: Tensor | None = None
        self._loss_steps = 0
        # Training examples per epoch: requests (ROO) or (request, impression) pairs.
        self.batches_per_epoch = -(-len(self._epoch_examples(1)[0]) // t.batch_size)

    def _label_bias(self) -> Tensor:
        """Each task's output bias at the start: the logit of the training impressions' positive
        rate (BCE) or their mean label (MSE), so the model starts at "predict the average" (NE
        1) instead of at 0, where a rating's squared error (about 13) would swamp the BCE tasks'
        gradients for the first epochs."""
        ex = self.examples
        _, events = impressions_of(ex.requests.take(self.split.train))
        values = []
        for k, kind in enumerate(ex.kinds):
            known = ex.events.known[events, k]
            mean = float(ex.events.labels[events, k][known].mean()) if known.any() else 0.0
            if kind == "bce":
                rate = min(max(mean, 1e-4), 1 - 1e-4)
                mean = float(np.log(rate / (1 - rate)))
            values.append(mean)
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------ records and checkpoints

    def _write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        for callback in self.callbacks:
            callback.on_log(record)

    def log_setup(self) -> None:
        r = self.examples.requests
        record = {"kind": "setup", "step": 0, "task": "ranking", "items": self.data.num_items}
        record.update(
            examples=self.cfg.ranking.examples,
            requests={k: len(self.split.rows(k)) for k in ("train", "val", "test")},
            impressions_per_request=float(r.sizes.mean()) if len(r) else 0.0,
            tasks=[t.name for t in self.examples.tasks],
        )
        backend = getattr(getattr(self.model, "encoder", None), "cfg", None)
        if backend is not None:
            from flexgr.model.hstu.inputs import backend_choice

            choice = backend_choice(backend, self.device, training=True)
            record["backend"] = {"requested": choice.requested, "train": choice.backend}
        self._write(record)

    def save(self) -> None:
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
                "loss_acc": self._loss_acc,
                "loss_steps": self._loss_steps,
                "config": dump_config(self.cfg),
            },
        )
        for callback in self.callbacks:
            callback.on_checkpoint(self.state)

    def resume(self) -> None:
        ckpt = load_checkpoint(self.run.require_checkpoint())
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        self.best_weights = ckpt.get("best_model")
        acc = ckpt.get("loss_acc")
        self._loss_acc = acc.to(self.device) if acc is not None else None
        self._loss_steps = ckpt.get("loss_steps", 0)
        restore_rng(ckpt["rng"], self.device)
        self.metrics.truncate(self.state.metrics_size)

    def _save_best(self) -> None:
        save_checkpoint(
            self.run.best_checkpoint,
            {
                "model": self.best_weights,
                "epoch": self.state.best_epoch,
                "step": self.state.best_step,
                "metric": self.cfg.ranking.metric,
                "value": self.state.best_value,
            },
        )

    # ------------------------------------------------------------ training

    def _epoch_examples(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(request rows, impression events or None): the epoch's training examples, the
        requests sampled per user when ranking.sample_per_user is set (an epoch's sample and
        order are functions of train.seed and the epoch, so a resumed run draws the same)."""
        r, train = self.cfg.ranking, self.split.train
        rng = np.random.default_rng([self.cfg.train.seed, epoch, 1])
        if r.sample_per_user:
            train = train[
                sample_per_user(self.examples.requests.user[train], r.sample_per_user, rng)
            ]
        if r.examples == "request":
            return train, None
        rows, events = impressions_of(self.examples.requests.take(train))
        return train[rows], events

    def _epoch_batches(
        self, epoch: int, skip: int, rows: np.ndarray, impressions: np.ndarray | None
    ) -> Iterator[RankingBatch]:
        """This epoch's batches in a fixed order (a function of seed and epoch), from ``skip``."""
        t, ex = self.cfg.train, self.examples
        order = np.random.default_rng([t.seed, epoch]).permutation(len(rows))
        for index in range(skip, self.batches_per_epoch):
            take = np.sort(order[index * t.batch_size : (index + 1) * t.batch_size])
            if impressions is None:
                yield request_batch(ex.events, ex.requests, rows[take])
            else:
                yield impression_batch(ex.events, ex.requests, rows[take], impressions[take])

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: RankingBatch) -> Tensor:
        """One optimizer step; the loss is the weighted sum of each task's mean over the
        batch's impressions that have its label."""
        t = self.cfg.train
        lr = t.lr * min(1.0, (self.state.step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        assert batch.labels is not None and batch.known is not None
        with self._autocast():
            logits = self.model(batch, self.spec.prepare(self.model, batch))
        sums = task_losses(logits.float(), batch.labels, batch.known, self.examples.kinds)
        counts = batch.known.sum(0).clamp_min(1).to(sums.dtype)
        loss = (self.task_weights * sums / counts).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def run_epoch(self, progress: TrainProgress) -> bool:
        t, state = self.cfg.train, self.state
        rows, events = self._epoch_examples(state.epoch)
        self.batches_per_epoch = -(-len(rows) // t.batch_size)
        progress.start_epoch(state.epoch, self.batches_per_epoch, state.batch_in_epoch)
        self.model.train()
        start, impressions, tokens = time.perf_counter(), 0, 0
        batches = self._epoch_batches(state.epoch, state.batch_in_epoch, rows, events)
        for cpu_batch in batches:
            if t.max_steps and state.step >= t.max_steps:
                return False
            loss = self.train_step(cpu_batch.to(self.device))
            self._loss_acc = loss if self._loss_acc is None else self._loss_acc + loss
            self._loss_steps += 1
            state.step += 1
            state.batch_in_epoch += 1
            impressions += cpu_batch.num_candidates
            tokens += tokens_of(self.model, cpu_batch)
            progress.advance(loss)
            if state.step % t.log_every == 0:
                elapsed = max(time.perf_counter() - start, 1e-9)
                self._log_train(progress, impressions / elapsed, tokens / elapsed)
                start, impressions, tokens = time.perf_counter(), 0, 0
            if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                self.save()
        return state.batch_in_epoch >= self.batches_per_epoch

    def _log_train(
        self, progress: TrainProgress, impressions_per_s: float, tokens_per_s: float
    ) -> None:
        loss = (
            float(self._loss_acc) / self._loss_steps if self._loss_acc is not None else float("nan")
        )
        self._loss_acc, self._loss_steps = None, 0
        t = self.cfg.train
        lr = t.lr * min(1.0, self.state.step / t.warmup_steps) if t.warmup_steps else t.lr
        self._write(
            {
                "kind": "train",
                "step": self.state.step,
                "epoch": self.state.epoch,
                "loss": loss,
                "lr": lr,
                "tokens_per_s": tokens_per_s,
                "impressions_per_s": impressions_per_s,
            }
        )
        progress.log(self.state.step, loss, lr, tokens_per_s)

    # ------------------------------------------------------------ evaluation and the run

    @property
    def selection_split(self) -> str:
        return "test" if self.cfg.data.protocol == "gr-compatible" else "val"

    def evaluate(self, which: str, progress: TrainProgress | None = None) -> tuple[dict, float]:
        start = time.perf_counter()
        if progress is not None:
            progress.start_eval(which)
        try:
            metrics = evaluate_ranking(
                self.model,
                self.examples,
                which,  # type: ignore[arg-type]
                batch_size=eval_batch_size(self.cfg.eval, self.device.type),
                device=self.device,
                autocast_dtype=self.amp_dtype,
                on_batch=progress.eval_batch if progress is not None else None,
            )
        finally:
            if progress is not None:
                progress.end_eval()
        return metrics, time.perf_counter() - start

    def end_of_epoch(self, progress: TrainProgress, partial: bool) -> dict[str, float]:
        state, which, name = self.state, self.selection_split, self.cfg.ranking.metric
        metrics, seconds = self.evaluate(which, progress)
        record: dict[str, Any] = {"kind": "eval", "split": which, "epoch": state.epoch}
        record.update(step=state.step, **metrics)
        if partial:
            record["partial"] = True
        record["eval_s"] = seconds
        self._write(record)
        value = metrics[name]
        lower = LOWER_IS_BETTER[name.split(":")[0]]
        better = state.best_value is None or (
            value < state.best_value if lower else value > state.best_value
        )
        if which == "test" or better:
            state.best_value, state.best_epoch, state.best_step = value, state.epoch, state.step
            state.bad_epochs = 0
            self.best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
            self._save_best()
        else:
            state.bad_epochs += 1
        progress.print(
            f"epoch {state.epoch}{' (partial)' if partial else ''}: {which} {name} {value:.4f}"
            f"; best {state.best_value:.4f} at epoch {state.best_epoch} ({seconds:.1f} s eval)"
        )
        return metrics

    def fit(self) -> RunResult:
        t, state = self.cfg.train, self.state
        stop_reason = "max_epochs"
        with TrainProgress(self.console, self.show_progress, max_epochs=t.max_epochs) as progress:
            while state.epoch <= t.max_epochs and not state.stopped_early:
                if t.max_steps and state.step >= t.max_steps:
                    stop_reason = "max_steps"
                    break
                epoch_start = time.perf_counter()
                if not self.run_epoch(progress):
                    stop_reason = "max_steps"
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
                self._write(
                    {
                        "kind": "epoch",
                        "epoch": state.epoch - 1,
                        "step": state.step,
                        "train_s": train_seconds,
                    }
                )
                self.save()
            if state.stopped_early:
                stop_reason = "early_stopping"
            if stop_reason == "max_steps" and state.batch_in_epoch > 0:
                self.end_of_epoch(progress, partial=True)
            return self.finish(progress, stop_reason)

    def finish(self, progress: TrainProgress, stop_reason: str) -> RunResult:
        state = self.state
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        epoch = state.best_epoch if self.best_weights is not None else state.epoch
        test, seconds = self.evaluate("test", progress)
        self._write(
            {
                "kind": "eval",
                "split": "test",
                "epoch": epoch,
                "step": state.best_step,
                "final": True,
                **test,
                "eval_s": seconds,
            }
        )
        metadata = {
            "task": "ranking",
            "dataset": self.data.name,
            "protocol": self.cfg.data.protocol,
            "ranking": dataclasses.asdict(self.cfg.ranking),
            "epoch": epoch,
            "step": state.best_step,
            "selected_by": (
                "last epoch" if self.selection_split == "test" else f"val {self.cfg.ranking.metric}"
            ),
            "test": test,
        }
        export_model(self.model, self.run.model, item_ids=self.data.item_ids, metadata=metadata)
        shown = [k for k in test if k.split(":")[0] in ("ne", "auc", "mse")]
        progress.print(
            f"test at epoch {epoch}: "
            + ", ".join(f"{k} {test[k]:.4f}" for k in shown)
            + f"; model in {self.run.model}.safetensors"
        )
        self.metrics.close()
        return RunResult(self.run.root, test, epoch, state.step, stop_reason)
