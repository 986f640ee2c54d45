"""Ranking metrics from the 0-based rank of each user's target among the candidate items.

rank 0 is the top of the list. For a cutoff K:
    HR@K   = 1 if rank < K
    NDCG@K = 1 / log2(rank + 2) if rank < K (one relevant item, so the ideal DCG is 1)
    MRR    = 1 / (rank + 1), without a cutoff
Each is averaged over users.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def metric_names(ks: Sequence[int]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")] + ["mrr"]


def per_user_metrics(ranks: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Every metric per user, as float64 [B] tensors."""
    r = ranks.to(torch.float64)
    out: dict[str, Tensor] = {}
    gain = 1.0 / torch.log2(r + 2.0)
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = hit.to(torch.float64)
        out[f"ndcg@{k}"] = torch.where(hit, gain, torch.zeros_like(gain))
    out["mrr"] = 1.0 / (r + 1.0)
    return out


def ranking_metrics(ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Mean of every metric over the users of ``ranks``."""
    acc = MetricAccumulator(ks)
    acc.add(ranks)
    return acc.result()


class MetricAccumulator:
    """Sums per-user metrics on the ranks' device; one host sync, in :meth:`result`."""

    def __init__(self, ks: Sequence[int]) -> None:
        self.ks = list(ks)
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, ranks: Tensor) -> None:
        for name, values in per_user_metrics(ranks, self.ks).items():
            total = values.sum()
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.count += ranks.shape[0]

    def result(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no users were evaluated")
        return {name: float(self.sums[name]) / self.count for name in metric_names(self.ks)}
