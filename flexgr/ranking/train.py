"""Training a ranking model: epochs of request (ROO) or impression batches, per-task losses,
validation NE/AUC/GAUC, early stopping, checkpoints, export.

``flexgr train`` runs this for ``model.arch`` values whose spec has ``task="ranking"``
(:func:`flexgr.train.loop.fit` picks the trainer). The epochs, checkpoints, resume, best-epoch
selection and final test are the shared loop's (:class:`flexgr.train.epochs.EpochTrainer`), so
the run directory and its records work as for retrieval (docs/run-dir.md, docs/ranking.md);
this module has the ranking parts: request or impression batches, per-task losses, NE/AUC/GAUC.
"""

from __future__ import annotations

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
from flexgr.train.config import Config, eval_batch_size
from flexgr.train.epochs import Callback, EpochTrainer, TrainError
from flexgr.train.progress import TrainProgress
from flexgr.train.rundir import MetricsLog, RunDir
from flexgr.train.runtime import autocast_dtype, resolve_device, seed_everything, set_deterministic
from flexgr.train.setup import load_dataset


def tokens_of(model: torch.nn.Module, batch: RankingBatch) -> int:
    """Tokens the model's encoder reads for ``batch`` (interleaved HSTU: two per event)."""
    per_event = 2 if getattr(model.cfg, "layout", "merged") == "interleaved" else 1
    return per_event * batch.num_history + batch.num_candidates


class RankingTrainer(EpochTrainer):
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
        self.is_main = True
        self.metrics: MetricsLog | None = MetricsLog(run.metrics)
        self._start_state()
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

    def item_ids(self) -> list[str]:
        return list(self.data.item_ids)

    def data_metadata(self) -> dict[str, Any]:
        return {
            "task": "ranking",
            "dataset": self.data.name,
            "protocol": self.cfg.data.protocol,
            "ranking": dataclasses.asdict(self.cfg.ranking),
        }

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

    def train_step(self, batch: RankingBatch) -> Tensor:
        """One optimizer step; the loss is the weighted sum of each task's mean over the
        batch's impressions that have its label, plus the model's ``aux_loss`` when its forward
        set one (a scalar, e.g. VISTA's reconstruction loss)."""
        assert batch.labels is not None and batch.known is not None
        with self._begin_step():
            logits = self.model(batch, self.spec.prepare(self.model, batch))
        sums = task_losses(logits.float(), batch.labels, batch.known, self.examples.kinds)
        counts = batch.known.sum(0).clamp_min(1).to(sums.dtype)
        loss = (self.task_weights * sums / counts).sum()
        aux = getattr(self.model, "aux_loss", None)
        if aux is not None:
            loss = loss + aux.float()
        self._descend(loss)
        return loss.detach()

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch

    def run_epoch(self, progress: TrainProgress) -> bool:
        t, state = self.cfg.train, self.state
        rows, events = self._epoch_examples(state.epoch)
        self.batches_per_epoch = -(-len(rows) // t.batch_size)
        progress.start_epoch(state.epoch, self.batches_per_epoch, state.batch_in_epoch)
        self.model.train()
        start, impressions, tokens = time.perf_counter(), 0, 0
        batches = self._epoch_batches(state.epoch, state.batch_in_epoch, rows, events)
        for cpu_batch in batches:
            if self.limit_reached() is not None:
                return False
            loss = self.train_step(cpu_batch.to(self.device))
            self._add_loss(loss)
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
        loss = self._mean_loss()
        lr = self.lr_at(self.state.step - 1)
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

    # ------------------------------------------------------------ evaluation and export

    @property
    def selection_metric(self) -> str:
        return self.cfg.ranking.metric

    def lower_is_better(self, metric: str) -> bool:
        return LOWER_IS_BETTER[metric.split(":")[0]]

    def summary_keys(self, test: dict[str, float]) -> list[str]:
        return [k for k in test if k.split(":")[0] in ("ne", "auc", "mse")]

    def _evaluate(self, which: str, progress: TrainProgress | None) -> dict[str, float]:
        return evaluate_ranking(
            self.model,
            self.examples,
            which,  # type: ignore[arg-type]
            batch_size=eval_batch_size(self.cfg.eval, self.device.type),
            device=self.device,
            autocast_dtype=self.eval_amp_dtype,
            on_batch=progress.eval_batch if progress is not None else None,
        )

    def _export(self, epoch: int, test: dict[str, float]) -> None:
        metadata = {
            **self.data_metadata(),
            "epoch": epoch,
            "step": self.state.best_step,
            "selected_by": self.selected_by(),
            "test": test,
        }
        export_model(self.model, self.run.model, item_ids=self.item_ids(), metadata=metadata)
