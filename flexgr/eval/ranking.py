"""Full ranking over every item, a chunk of items at a time.

Memory is bounded by ``queries x chunk`` scores whatever the catalogue size. Items a user must
not be recommended (its history) are masked per chunk from a jagged list, so no dense
[users, items] mask is ever built.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _mask_chunk(scores: Tensor, rows: Tensor, items: Tensor, lo: int, hi: int) -> None:
    """scores[row, item - lo] = -inf for the (row, item) pairs with lo <= item < hi.

    ``scores`` has one spare last column: pairs outside the chunk are sent there instead of being
    filtered out, which would need a host sync.
    """
    if items.numel() == 0:
        return
    spare = scores.shape[1] - 1
    inside = (items >= lo) & (items < hi)
    cols = torch.where(inside, items - lo, torch.full_like(items, spare))
    scores.index_put_((rows, cols), torch.tensor(NEG_INF, device=scores.device, dtype=scores.dtype))


def _exclusion_rows(exclude_offsets: Tensor, total: int) -> Tensor:
    """The query row of every excluded item (output_size given: no host sync on CUDA)."""
    counts = exclude_offsets[1:] - exclude_offsets[:-1]
    rows = torch.arange(counts.numel(), device=counts.device)
    return torch.repeat_interleave(rows, counts, output_size=total)


def target_ranks(
    queries: Tensor,
    item_table: Tensor,
    targets: Tensor,
    exclude_items: Tensor | None = None,
    exclude_offsets: Tensor | None = None,
    *,
    chunk_size: int = 65536,
) -> Tensor:
    """0-based rank of each target among items 1..I, by dot product with ``queries``.

    queries: [B, D]; item_table: [I + 1, D] (row 0 is padding and never ranked); targets: [B].
    Excluded items (a jagged list per query) are removed from the competition; the target itself
    never is. Ties count against the target (a tied item ranks ahead of it), so a model that
    scores everything alike gets no credit. A NaN target score ranks last.
    """
    B = queries.shape[0]
    num_items = item_table.shape[0] - 1
    target_scores = (queries * item_table[targets]).sum(-1)
    rows = None
    if exclude_items is not None and exclude_offsets is not None:
        rows = _exclusion_rows(exclude_offsets, exclude_items.numel())
    ranks = torch.zeros(B, dtype=torch.int64, device=queries.device)
    for lo in range(1, num_items + 1, chunk_size):
        hi = min(lo + chunk_size, num_items + 1)
        scores = _chunk_scores(queries, item_table, lo, hi)
        if exclude_items is not None and rows is not None:
            _mask_chunk(scores, rows, exclude_items, lo, hi)
        # The target competes with the others, not with itself.
        _mask_chunk(scores, torch.arange(B, device=queries.device), targets, lo, hi)
        ranks += (scores[:, :-1] >= target_scores.unsqueeze(1)).sum(1)
    return torch.where(torch.isnan(target_scores), torch.full_like(ranks, num_items), ranks)


def top_k(
    queries: Tensor,
    item_table: Tensor,
    k: int,
    exclude_items: Tensor | None = None,
    exclude_offsets: Tensor | None = None,
    *,
    chunk_size: int = 65536,
) -> tuple[Tensor, Tensor]:
    """The k best items 1..I per query: (scores [B, k], item indices [B, k]), best first.

    k is capped at the number of items. Where fewer than k items are left after exclusion, the
    tail has score -inf; callers drop those.
    """
    B = queries.shape[0]
    num_items = item_table.shape[0] - 1
    k = min(k, num_items)
    rows = None
    if exclude_items is not None and exclude_offsets is not None:
        rows = _exclusion_rows(exclude_offsets, exclude_items.numel())
    best_scores = torch.full((B, 0), NEG_INF, device=queries.device, dtype=queries.dtype)
    best_items = torch.zeros((B, 0), dtype=torch.int64, device=queries.device)
    for lo in range(1, num_items + 1, chunk_size):
        hi = min(lo + chunk_size, num_items + 1)
        scores = _chunk_scores(queries, item_table, lo, hi)
        if exclude_items is not None and rows is not None:
            _mask_chunk(scores, rows, exclude_items, lo, hi)
        scores = scores[:, :-1]
        chunk_best, chunk_cols = scores.topk(min(k, hi - lo), dim=1)
        merged = torch.cat([best_scores, chunk_best], dim=1)
        merged_items = torch.cat([best_items, chunk_cols + lo], dim=1)
        best_scores, order = merged.topk(min(k, merged.shape[1]), dim=1)
        best_items = merged_items.gather(1, order)
    return best_scores, best_items


def _chunk_scores(queries: Tensor, item_table: Tensor, lo: int, hi: int) -> Tensor:
    """[B, (hi - lo) + 1]: scores of items lo..hi-1 and a spare column for masked-out pairs."""
    # Padding the (small) item chunk rather than the (large) score matrix saves a copy.
    chunk = item_table[lo:hi]
    return queries @ torch.cat([chunk, chunk.new_zeros(1, chunk.shape[1])]).T
