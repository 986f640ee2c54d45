"""Per-task NE, AUC and GAUC of a ranking model on the validation or test requests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from flexgr.model.registry import spec_of
from flexgr.ranking.batch import ranges, request_batch
from flexgr.ranking.metrics import task_metrics
from flexgr.ranking.requests import Which
from flexgr.ranking.setup import RankingData
from flexgr.ranking.tasks import predictions


@torch.no_grad()
def predict_requests(
    model: nn.Module,
    examples: RankingData,
    rows: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """[N, K] predictions (probabilities for BCE tasks, values for MSE tasks) of every
    impression of the requests ``rows``, in request order. Requests are scored as ROO
    sequences: the impression layout gives the same numbers (tests/ranking/test_layouts.py)."""
    spec = spec_of(model)
    was_training = model.training
    model.eval()
    out = []
    total = (len(rows) + batch_size - 1) // batch_size
    try:
        for index, start in enumerate(range(0, len(rows), batch_size)):
            batch = request_batch(
                examples.events, examples.requests, rows[start : start + batch_size]
            )
            batch = batch.to(device)
            amp = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with amp:
                logits = model(batch, spec.prepare(model, batch))
            out.append(predictions(logits.float(), examples.kinds).cpu().numpy())
            if on_batch is not None:
                on_batch(index + 1, total)
    finally:
        model.train(was_training)
    K = len(examples.tasks)
    return np.concatenate(out) if out else np.zeros((0, K), dtype=np.float32)


def evaluate_ranking(
    model: nn.Module,
    examples: RankingData,
    which: Which,
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Every task's metrics (``ne:like``, ``auc:like``, ``gauc:like``, ``mse:rating``, ...) on
    the impressions of the ``which`` requests, plus their counts."""
    rows = examples.split.rows(which)
    if len(rows) == 0:
        raise ValueError(f"no {which} requests: nothing to evaluate")
    preds = predict_requests(
        model,
        examples,
        rows,
        batch_size=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        on_batch=on_batch,
    )
    chosen = examples.requests.take(rows)
    impressions = ranges(chosen.start, chosen.end)
    ev = examples.events
    metrics: dict[str, float] = {}
    for k, task in enumerate(examples.tasks):
        metrics.update(
            task_metrics(
                task.name,
                task.kind,
                preds[:, k],
                ev.labels[impressions, k],
                ev.known[impressions, k],
                ev.users[impressions],
            )
        )
    metrics["impressions"] = float(len(impressions))
    metrics["requests"] = float(len(rows))
    return metrics
