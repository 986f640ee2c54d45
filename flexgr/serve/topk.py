"""Exact top-k for serving: one matrix product over the item table, no copy of it.

(``flexgr.eval.ranking.top_k`` pads each item chunk, which copies the table per call: fine for
evaluation batches of thousands of users, too slow per request for millions of items.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def exact_top_k(
    queries: Tensor, items: Tensor, k: int, excluded: Sequence[Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(scores [B, k], item indices [B, k]) best first, over ``items`` [I, d] (item index i is
    row i - 1), leaving out each query's ``excluded`` indices; where fewer than k are left the
    tail is score -inf (callers drop it). Memory: B x I scores."""
    scores = queries @ items.T
    if excluded is not None and any(len(e) for e in excluded):
        rows = torch.cat(
            [torch.full((len(e),), r, dtype=torch.int64) for r, e in enumerate(excluded)]
        ).to(scores.device)
        cols = torch.cat([e.to(torch.int64) for e in excluded]).to(scores.device) - 1
        scores[rows, cols] = float("-inf")
    best, index = scores.topk(min(k, items.shape[0]), dim=1)
    return best, index + 1
