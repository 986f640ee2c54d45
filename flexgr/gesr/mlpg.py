"""GESR's multi-logit parameterised gating (MLPG): K gated secondary logits fused with the
primary (two-tower) logit.

For the fused input ``z`` [C, d_in] (MoA outputs and tower outputs, concatenated by the caller),
for k = 1..K and every task t:

    g_k       = sigmoid(W_g^k z + b_g^k)                  [C, hidden]  feature-wise gate
    h_k(z)    = silu(W_h^k z + b_h^k)                     [C, hidden]
    logit_k,t = w_{k,t} . (g_k * h_k(z))                  [C]
    final_t   = logit_primary_t + sum_k lambda_k logit_k,t

The paper gives the structure, not the equations; h_k as one SiLU layer, the biases, lambda
learned from ``lambda_init`` and w_k without bias are choices (docs/gesr.md). The K branches
are batched into one matmul per projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MLPGConfig:
    d_in: int
    num_logits: int = 4  # K
    hidden: int = 64
    num_tasks: int = 1
    lambda_init: float = 1.0
    learn_lambda: bool = True

    def __post_init__(self) -> None:
        for key in ("d_in", "num_logits", "hidden", "num_tasks"):
            if getattr(self, key) < 1:
                raise ValueError(f"mlpg {key} must be >= 1, got {getattr(self, key)}")


class MLPG(nn.Module):
    def __init__(self, cfg: MLPGConfig) -> None:
        super().__init__()
        self.cfg = cfg
        K, d, h, T = cfg.num_logits, cfg.d_in, cfg.hidden, cfg.num_tasks
        bound_in, bound_h = 1 / math.sqrt(d), 1 / math.sqrt(h)
        self.gate_weight = nn.Parameter(torch.empty(K, d, h).uniform_(-bound_in, bound_in))
        self.gate_bias = nn.Parameter(torch.zeros(K, h))
        self.value_weight = nn.Parameter(torch.empty(K, d, h).uniform_(-bound_in, bound_in))
        self.value_bias = nn.Parameter(torch.zeros(K, h))
        self.logit_weight = nn.Parameter(torch.empty(K, h, T).uniform_(-bound_h, bound_h))
        lam = torch.full((K,), float(cfg.lambda_init))
        if cfg.learn_lambda:
            self.lam = nn.Parameter(lam)
        else:
            self.register_buffer("lam", lam)

    def gated(self, z_Cd: Tensor) -> Tensor:
        """[C, K, hidden]: every branch's ``g_k * h_k(z)``. The 2K projections are one matmul
        (a per-branch einsum batches over k and costs about twice as much on CPU)."""
        K, d, h = self.gate_weight.shape
        # Concatenated along the branch dimension of the [d, K, h] views: the [d, 2K, h] result
        # is contiguous, so the reshape below copies nothing.
        weight = torch.cat([self.gate_weight.transpose(0, 1), self.value_weight.transpose(0, 1)], 1)
        pre = (z_Cd @ weight.reshape(d, 2 * K * h)).view(-1, 2 * K, h)
        gate, value = (pre + torch.cat([self.gate_bias, self.value_bias])).split(K, dim=1)
        return torch.sigmoid(gate) * F.silu(value)

    def secondary(self, z_Cd: Tensor) -> Tensor:
        """[C, K, T]: every branch's secondary logits, before the lambdas."""
        return torch.einsum("ckh,kht->ckt", self.gated(z_Cd), self.logit_weight)

    def forward(self, z_Cd: Tensor, primary_CT: Tensor) -> Tensor:
        """[C, T]: the primary logits plus the lambda-weighted secondary logits."""
        if z_Cd.shape[-1] != self.cfg.d_in or primary_CT.shape != (
            z_Cd.shape[0],
            self.cfg.num_tasks,
        ):
            raise ValueError(
                f"mlpg: z must be [C, {self.cfg.d_in}] and the primary logits "
                f"[C, {self.cfg.num_tasks}], got {tuple(z_Cd.shape)} and {tuple(primary_CT.shape)}"
            )
        K, h, T = self.logit_weight.shape
        # sum_k lambda_k w_k . gated_k as one matmul over the K * hidden gated values.
        weight = (self.logit_weight * self.lam.view(K, 1, 1)).reshape(K * h, T)
        return primary_CT + self.gated(z_Cd).reshape(-1, K * h) @ weight
