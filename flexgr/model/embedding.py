"""Input and output layers shared by HSTU and SASRec (reference-HSTU semantics)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ItemEmbedding(nn.Module):
    """Item table; id 0 is padding. Truncated normal init (std 0.02) as in the reference."""

    def __init__(self, num_items: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_items + 1, dim))
        nn.init.trunc_normal_(self.weight, std=0.02, a=-0.04, b=0.04)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)

    def normalized(self, ids: Tensor | None = None) -> Tensor:
        w = self.weight if ids is None else F.embedding(ids, self.weight)
        return F.normalize(w, dim=-1, eps=1e-6)


class SequenceInput(nn.Module):
    """emb(item) * sqrt(d) + learned absolute position embedding, then dropout."""

    def __init__(self, max_len: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.dim = dim
        self.pos = nn.Parameter(torch.empty(max_len, dim))
        nn.init.xavier_normal_(self.pos)
        self.dropout = nn.Dropout(dropout)

    def forward(self, item_emb_TD: Tensor, positions_T: Tensor) -> Tensor:
        x = item_emb_TD * math.sqrt(self.dim) + self.pos[positions_T]
        return self.dropout(x)


def l2_normalize(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)
