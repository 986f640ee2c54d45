"""Evaluate a sequence model on a split's validation or test targets by full ranking."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flexgr.batch import JaggedBatch
from flexgr.data import InteractionData, Split
from flexgr.eval.batches import EvalBatch, EvalSequences, Exclusion
from flexgr.eval.metrics import MetricAccumulator
from flexgr.eval.ranking import target_ranks
from flexgr.model.registry import spec_of

Forward = Callable[[Tensor, Any], Tensor]  # (item ids, prepared inputs) -> states


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: InteractionData,
    split: Split,
    which: Literal["val", "test"],
    *,
    max_seq_len: int,
    ks: Sequence[int] = (1, 10, 50, 200),
    exclude: Exclusion = "all",
    batch_size: int = 512,
    item_chunk: int = 65536,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    forward: Forward | None = None,
    part: tuple[int, int] = (0, 1),
    reduce: Callable[[Tensor], Tensor] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """HR@K and NDCG@K for every K in ``ks``, and MRR, over the users with a ``which`` target.

    Each user's query is the model's output at the last event before the target (with the
    target's timestamp as the query time); every item of the model's table (1..I, the item
    pool it was built for) is ranked against it, minus the user's earlier items: all of them
    (``exclude="all"``), those in the input window of ``max_seq_len`` events (``"window"``, the
    reference HSTU's rule) or none. ``forward`` replaces ``model(...)`` (e.g. a compiled
    model); the item table always comes from ``model.item_embeddings()``.

    Split over processes: ``part=(i, n)`` ranks only batches i, i + n, ... and ``reduce`` sums a
    tensor over the n processes (an all-reduce). Every process then returns the metrics of all
    users, computed from the same batches in the same order as one process would, so they equal
    the single-process metrics bit for bit given the same weights.

    ``on_batch(done, total)`` is called after each batch this process ranks (a progress bar).

    The result also holds ``"users"``, the number of users evaluated.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    run = forward or model
    spec = spec_of(model)
    sequences = EvalSequences(data, split, which, max_seq_len, exclude)
    table = model.item_embeddings().float()
    acc = MetricAccumulator(ks)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def ranks_of(cpu_batch: EvalBatch) -> Tensor:
        batch = cpu_batch.to(device, non_blocking=True)
        jagged = JaggedBatch(batch.item_ids, batch.offsets, batch.timestamps, batch.query_time)
        inputs = spec.prepare(model, jagged)
        with autocast:
            states = run(batch.item_ids, inputs)
        # Each user's last position (attention truncation keeps it, under other offsets).
        ends = getattr(inputs, "output_offsets", None)
        queries = states[(batch.offsets if ends is None else ends)[1:] - 1].float()
        return target_ranks(
            queries,
            table,
            batch.targets,
            batch.exclude_items if exclude != "none" else None,
            batch.exclude_offsets if exclude != "none" else None,
            chunk_size=item_chunk,
        )

    # The batches this process ranks (all of them unless the evaluation is split).
    total = len(range(part[0], -(-len(sequences) // batch_size), part[1]))
    done = 0

    def ranked(cpu_batch: EvalBatch) -> Tensor:
        nonlocal done
        ranks = ranks_of(cpu_batch)
        done += 1
        if on_batch is not None:
            on_batch(done, total)
        return ranks

    try:
        if part == (0, 1) and reduce is None:
            for cpu_batch in sequences.batches(batch_size):
                acc.add(ranked(cpu_batch))
        else:
            _add_split(acc, sequences, batch_size, part, reduce, ranked, device)
    finally:
        model.train(was_training)
    return {**acc.result(), "users": len(sequences)}


def _add_split(
    acc: MetricAccumulator,
    sequences: EvalSequences,
    batch_size: int,
    part: tuple[int, int],
    reduce: Callable[[Tensor], Tensor] | None,
    ranks_of: Callable[[EvalBatch], Tensor],
    device: torch.device,
) -> None:
    """This process's batches, every user's rank summed in from the others, then the metric sums
    batch by batch in single-process order (float sums depend on the order)."""
    index, count = part
    if not 0 <= index < count:
        raise ValueError(f"part must be (i, n) with 0 <= i < n, got {part}")
    batches = sequences.batch_rows(batch_size)
    bounds = [0]
    for rows in batches:
        bounds.append(bounds[-1] + len(rows))
    # Zero where another process ranks the user: the sum over processes fills every slot once.
    ranks = torch.zeros(bounds[-1], dtype=torch.int64, device=device)
    for b in range(index, len(batches), count):
        ranks[bounds[b] : bounds[b + 1]] = ranks_of(sequences.batch(batches[b]))
    if reduce is not None:
        ranks = reduce(ranks)
    for b in range(len(batches)):
        acc.add(ranks[bounds[b] : bounds[b + 1]])
