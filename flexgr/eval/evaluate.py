"""Evaluate a sequence model on a split's validation or test targets by full ranking."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from flexgr.data import InteractionData, Split
from flexgr.eval.batches import EvalSequences
from flexgr.eval.metrics import MetricAccumulator
from flexgr.eval.ranking import target_ranks

Forward = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: InteractionData,
    split: Split,
    which: Literal["val", "test"],
    *,
    max_seq_len: int,
    ks: Sequence[int] = (1, 10, 50, 200),
    exclude_history: bool = True,
    batch_size: int = 512,
    item_chunk: int = 65536,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    forward: Forward | None = None,
) -> dict[str, float]:
    """HR@K and NDCG@K for every K in ``ks``, and MRR, over the users with a ``which`` target.

    Each user's query is the model's output at the last event before the target (with the
    target's timestamp as the query time); every item 1..I is ranked against it, minus the
    user's earlier items when ``exclude_history``. ``forward`` replaces ``model(...)`` (e.g. a
    compiled model); the item table always comes from ``model.item_embeddings()``.

    The result also holds ``"users"``, the number of users evaluated.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    run = forward or model
    sequences = EvalSequences(data, split, which, max_seq_len, exclude_history)
    table = model.item_embeddings().float()
    acc = MetricAccumulator(ks)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        for cpu_batch in sequences.batches(batch_size):
            batch = cpu_batch.to(device, non_blocking=True)
            with autocast:
                states = run(batch.item_ids, batch.offsets, batch.timestamps, batch.query_time)
            queries = states[batch.offsets[1:] - 1].float()
            ranks = target_ranks(
                queries,
                table,
                batch.targets,
                batch.exclude_items if exclude_history else None,
                batch.exclude_offsets if exclude_history else None,
                chunk_size=item_chunk,
            )
            acc.add(ranks)
    finally:
        model.train(was_training)
    return {**acc.result(), "users": len(sequences)}
