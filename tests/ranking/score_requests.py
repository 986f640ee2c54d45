"""Ranker.score requests built from a test history, shared by the M-FALCON tests of the
HSTU and GESR rankers."""

from __future__ import annotations

import torch
from torch import nn

from flexgr.ranking.scorer import Ranker


def ranker_over(model: nn.Module, arch: str, num_items: int) -> Ranker:
    """A Ranker over ``model`` whose raw item ids are i1 .. i<num_items>."""
    item_ids = [f"i{k}" for k in range(1, num_items + 1)]
    return Ranker(model, item_ids, {"arch": arch, "config": {}})


def request_body(
    items: torch.Tensor, actions: torch.Tensor, timestamps: torch.Tensor, query_time: int
) -> dict:
    """Ranker.score keyword arguments: raw item ids, a rating (0.5 .. 5) and a click action."""
    ratings = (actions[:, 0].clamp(min=1).float() / 2).tolist()
    return {
        "history": [f"i{int(i)}" for i in items],
        "actions": {"rating": ratings, "click": actions[:, 1].tolist()},
        "timestamps": timestamps.tolist(),
        "query_time": query_time,
    }


def predictions(scored) -> torch.Tensor:
    """[candidates, 2]: the like and rating predictions of Ranker.score's answer."""
    return torch.tensor([[p[t] for t in ("like", "rating")] for _, p in scored])
