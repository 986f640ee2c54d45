"""Approximate top-k over large item tables with FAISS (``pip install 'flexgr[ann]'``).

An inverted-file index (``IndexIVFFlat``, inner product) over the item embeddings: the table is
split into ``lists`` k-means cells and a query scans only the ``probe`` cells nearest to it, so
the cost grows with ``probe / lists`` of the table instead of all of it. Scores of the returned
items are exact; what is approximate is which items are returned (recall@k < 1). The exact path
(``flexgr.eval.ranking.top_k``) stays the default; measured recall and latency are in
docs/serving.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

INSTALL_HINT = "pip install 'flexgr[ann]'"


class AnnUnavailable(ImportError):
    """faiss is not installed."""


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise AnnUnavailable(f"approximate top-k needs faiss: {INSTALL_HINT}") from None
    return faiss


def default_lists(num_items: int) -> int:
    """About 4 sqrt(I) cells (FAISS's rule of thumb), at least 1 and at most I / 39 (FAISS
    wants 39 training points per cell)."""
    return max(1, min(int(4 * math.sqrt(num_items)), num_items // 39))


class ApproximateIndex:
    """FAISS IVF-Flat index over ``table[1:]`` (row 0 is padding); item index = row + 1."""

    def __init__(
        self,
        table: Tensor,
        *,
        lists: int = 0,
        probe: int = 32,
        train_points: int = 256,
        seed: int = 0,
    ) -> None:
        faiss = import_faiss()
        vectors = np.ascontiguousarray(table[1:].detach().float().cpu().numpy())
        num_items, dim = vectors.shape
        self.lists = lists or default_lists(num_items)
        self.probe = max(1, min(probe, self.lists))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, self.lists, faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample: train_points per cell is plenty (FAISS warns above 256).
        sample = min(num_items, self.lists * train_points)
        rows = np.random.default_rng(seed).choice(num_items, size=sample, replace=False)
        index.train(vectors[np.sort(rows)])
        index.add(vectors)
        index.nprobe = self.probe
        self._index, self._quantizer = index, quantizer  # the index needs its quantizer alive
        self.num_items = num_items

    def describe(self) -> dict[str, Any]:
        return {"method": "faiss IVF-Flat", "lists": self.lists, "probe": self.probe}

    def search(
        self, queries: Tensor, k: int, excluded: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(scores [B, k], item indices [B, k]) best first, leaving out each row's ``excluded``
        item indices; missing places are score -inf, index 0."""
        rows = queries.shape[0]
        excluded = excluded if excluded is not None else [torch.empty(0, dtype=torch.int64)] * rows
        extra = max((len(e) for e in excluded), default=0)
        want = min(k + extra, self.num_items)
        found_scores, found_rows = self._index.search(
            np.ascontiguousarray(queries.detach().float().cpu().numpy()), want
        )
        scores = torch.full((rows, k), float("-inf"))
        items = torch.zeros((rows, k), dtype=torch.int64)
        for row in range(rows):
            drop = set(excluded[row].tolist())
            kept = [
                (int(r) + 1, float(s))
                for r, s in zip(found_rows[row], found_scores[row], strict=True)
                if r >= 0 and int(r) + 1 not in drop
            ][:k]
            if kept:
                items[row, : len(kept)] = torch.tensor([i for i, _ in kept])
                scores[row, : len(kept)] = torch.tensor([s for _, s in kept])
        return scores, items
