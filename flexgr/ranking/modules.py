"""Layers every ranking model shares: the action encoder and the multi-task head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ActionEncoder(nn.Module):
    """Action codes [N, A] -> [N, d]: one embedding per action input, concatenated, then an MLP
    (the reference's DLRM-v3 action encoder, ULTRA-HSTU's ``MLP(actions)``).

    ``bits``: an input's code is a bit field and each set bit adds its own embedding
    (multi-hot); ``categorical``: the code indexes the input's table. ``rating`` is always
    categorical (half-star steps)."""

    def __init__(
        self, names: list[str], vocab: list[int], encoding: str, dim: int, d_model: int
    ) -> None:
        super().__init__()
        self.names = list(names)
        self.bits = [encoding == "bits" and name != "rating" for name in names]
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(size, dim).normal_(0, 0.02)) for size in vocab
        )
        self.mlp = nn.Sequential(
            nn.Linear(dim * len(names), d_model), nn.SiLU(), nn.Linear(d_model, d_model)
        )

    def forward(self, codes_NA: Tensor) -> Tensor:
        parts = []
        for a, table in enumerate(self.tables):
            code = codes_NA[:, a]
            if self.bits[a]:
                shifts = torch.arange(table.shape[0], device=code.device)
                multi_hot = ((code.unsqueeze(1) >> shifts) & 1).to(table.dtype)
                parts.append(multi_hot @ table)
            else:
                parts.append(F.embedding(code, table))
        return self.mlp(torch.cat(parts, dim=-1))


class MultiTaskHead(nn.Module):
    """[C, d_in] -> [C, K] logits (BCE tasks) or values (MSE tasks): one hidden layer shared by
    the tasks, one output per task."""

    def __init__(self, d_in: int, hidden: int, num_tasks: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_in),
            nn.Linear(d_in, hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_tasks),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @property
    def output_bias(self) -> Tensor:
        """[K]: each task's output bias (the trainer starts it at the training labels' mean)."""
        return self.net[-1].bias


def check_codes(codes_NA: Tensor, vocab: list[int], bits: list[bool], names: list[str]) -> None:
    """ValueError naming the action input whose code is outside its table (scoring input)."""
    for a, size in enumerate(vocab):
        column = codes_NA[:, a]
        limit = (1 << size) if bits[a] else size
        if column.numel() and (int(column.min()) < 0 or int(column.max()) >= limit):
            raise ValueError(
                f"action {names[a]!r} has a value outside 0..{limit - 1}, the range the model "
                "was trained with"
            )
