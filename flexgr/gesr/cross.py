"""GESR's cross attention: each candidate's tokens query its own request's history, O(M * L).

For candidate c of sequence b (history rows ``[h_b, h_{b+1})``), per head:

    softmax:  o_c = sum_j softmax_j(q_c . k_j / sqrt(D)) v_j
    silu:     o_c = sum_j silu(q_c . k_j) v_j / divisor          (HSTU's pointwise form)

over the history rows j of b only. Candidates never see each other or other requests' histories;
an empty history gives o_c = 0. Two eager implementations compute the same thing:

- ``jagged_cross_attention`` enumerates (candidate, history slot) pairs, ``max_history`` slots
  per candidate; the slots past a request's history go to a discarded output row, so each
  candidate sums over exactly its own history (the reference the other is tested against);
- ``padded_cross_attention`` puts each request's candidates in tiles of ``tile_size`` slots
  (one request per tile) and pads every tile's history to ``max_history`` (one batched matmul
  per side over [tiles, tile_size, max_history] scores), reading a history's keys and values
  once per tile instead of once per candidate: much faster when many candidates share a history,
  as in early-stage ranking.

The layouts (flexgr.gesr.cross_layout) are built from shapes and the caller's ``max_history``
bound alone, never from a value read on the host. A fused kernel is not written (docs/gesr.md).

Shapes: M candidates in all, L history rows in all, H heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexgr.gesr.cross_layout import CrossPadding, CrossPairs

CrossActivation = Literal["softmax", "silu"]


def readable(k_LHD: Tensor, v_LHD: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values every padding slot can read: a batch with no history row at all gets one
    zero row (row 0), which the masks then leave out like any padding slot."""
    if k_LHD.shape[0]:
        return k_LHD, v_LHD
    # Concatenated, not replaced, so that the empty k and v still get their (empty) gradients.
    return (
        torch.cat([k_LHD, k_LHD.new_zeros(1, *k_LHD.shape[1:])]),
        torch.cat([v_LHD, v_LHD.new_zeros(1, *v_LHD.shape[1:])]),
    )


def jagged_cross_attention(
    q_MHD: Tensor,
    k_LHD: Tensor,
    v_LHD: Tensor,
    pairs: CrossPairs,
    activation: CrossActivation = "softmax",
    divisor: float = 1.0,
) -> Tensor:
    """[M, H, Dv]: candidate queries over their own sequence's history keys and values."""
    M, H, _ = q_MHD.shape
    k_LHD, v_LHD = readable(k_LHD, v_LHD)
    scores_PH = (q_MHD[pairs.candidate] * k_LHD[pairs.history]).sum(-1)
    v_PHD = v_LHD[pairs.history]
    # Row M collects the slots past each history and is dropped: a candidate's row sums its
    # own history's pairs only, in the order of its history.
    out = v_LHD.new_zeros(M + 1, H, v_LHD.shape[-1])
    if activation == "silu":
        out = out.index_add(0, pairs.target, F.silu(scores_PH).unsqueeze(-1) * v_PHD)
        return out[:M] / divisor
    scores_PH = scores_PH / math.sqrt(q_MHD.shape[-1])
    # Softmax per candidate: subtract its max (detached; softmax does not depend on it).
    peak = scores_PH.new_full((M + 1, H), -math.inf)
    index_PH = pairs.target.unsqueeze(1).expand(-1, H)
    peak = peak.scatter_reduce(0, index_PH, scores_PH.detach(), "amax")
    weights_PH = torch.exp(scores_PH - peak[pairs.target])
    total = scores_PH.new_zeros(M + 1, H).index_add(0, pairs.target, weights_PH)
    out = out.index_add(0, pairs.target, weights_PH.unsqueeze(-1) * v_PHD)
    # Candidates with an empty history have total 0 and out 0: keep them 0, not NaN.
    return out[:M] / total[:M].clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(-1)


def padded_cross_attention(
    q_MHD: Tensor,
    k_LHD: Tensor,
    v_LHD: Tensor,
    padding: CrossPadding,
    activation: CrossActivation = "softmax",
    divisor: float = 1.0,
) -> Tensor:
    """[M, H, Dv]: the same as :func:`jagged_cross_attention`, through padded batched matmuls."""
    M, H, D = q_MHD.shape
    N, L_max = padding.history_rows.shape
    pad_1N1L = padding.history_padding[None, :, None, :]
    # Padding slots read some real row (cross_layout.spread_padding); their scores are masked
    # below, so their values never count.
    # Everything is head-major ([H, N, ...]), the layout the batched matmuls read, so no
    # operand is copied into place.
    k_LHD, v_LHD = readable(k_LHD, v_LHD)
    k_HNLD = k_LHD.transpose(0, 1)[:, padding.history_rows]
    v_HNLD = v_LHD.transpose(0, 1)[:, padding.history_rows]
    q_HNTD = q_MHD.new_zeros(H, N, padding.tile_size, D)
    q_HNTD[:, padding.candidate_tile, padding.candidate_slot] = q_MHD.transpose(0, 1)
    scores_HNTL = q_HNTD @ k_HNLD.transpose(-1, -2)
    if activation == "silu":
        weights = F.silu(scores_HNTL).masked_fill(pad_1N1L, 0.0) / divisor
        out_HNTD = weights @ v_HNLD
    else:
        scores_HNTL = (scores_HNTL / math.sqrt(D)).masked_fill(pad_1N1L, -math.inf)
        # The row maximum (detached: softmax does not depend on it); an empty history's row
        # is all -inf, and its peak is raised to the lowest finite value, so every weight comes
        # out exp(-inf) = 0, not NaN. A finite peak is unchanged.
        if L_max:
            peak = scores_HNTL.detach().amax(-1, keepdim=True)
            peak = peak.clamp_min(torch.finfo(peak.dtype).min)
        else:  # every history empty (amax has no identity): every output 0
            peak = scores_HNTL.new_zeros(*scores_HNTL.shape[:-1], 1)
        weights = torch.exp(scores_HNTL - peak)
        total = weights.sum(-1, keepdim=True)
        out_HNTD = (weights @ v_HNLD) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return out_HNTD[:, padding.candidate_tile, padding.candidate_slot].transpose(0, 1)


@dataclass(frozen=True)
class CrossAttentionConfig:
    d_model: int = 64
    num_heads: int = 2
    head_dim: int = 32
    activation: CrossActivation = "softmax"
    divisor: float = 1.0  # silu only: a constant normaliser (e.g. the longest history)

    def __post_init__(self) -> None:
        for key in ("d_model", "num_heads", "head_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"cross attention {key} must be >= 1, got {getattr(self, key)}")
        if self.activation not in ("softmax", "silu"):
            raise ValueError(
                f"cross attention activation must be softmax or silu, not {self.activation!r}"
            )
        if not self.divisor > 0:
            raise ValueError(f"cross attention divisor must be > 0, got {self.divisor}")


class CrossAttention(nn.Module):
    """Candidate tokens [M, d] over history tokens [L, d] -> [M, d]: projections, the jagged
    attention above, an output projection."""

    def __init__(self, cfg: CrossAttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.head_dim
        self.q = nn.Linear(cfg.d_model, inner)
        self.kv = nn.Linear(cfg.d_model, 2 * inner)
        self.out = nn.Linear(inner, cfg.d_model)

    def forward(
        self, candidates_Md: Tensor, history_Ld: Tensor, layout: CrossPairs | CrossPadding
    ) -> Tensor:
        """``layout`` picks the implementation: pairs (jagged) or padding (padded)."""
        return self.attend(self.queries(candidates_Md), *self.keys_values(history_Ld), layout)

    # The three steps are separate so that serving can keep the candidates' queries (per item)
    # and a history's keys and values (per user) across calls (flexgr.gesr.falcon).

    def queries(self, candidates_Md: Tensor) -> Tensor:
        """[M, H, D] the candidates' queries."""
        return self.q(candidates_Md).view(-1, self.cfg.num_heads, self.cfg.head_dim)

    def keys_values(self, history_Ld: Tensor) -> tuple[Tensor, Tensor]:
        """([L, H, D], [L, H, D]) the history's keys and values."""
        k, v = self.kv(history_Ld).view(-1, 2, self.cfg.num_heads, self.cfg.head_dim).unbind(1)
        return k, v

    def attend(
        self, q_MHD: Tensor, k_LHD: Tensor, v_LHD: Tensor, layout: CrossPairs | CrossPadding
    ) -> Tensor:
        """[M, d]: the attention of queries over keys and values, then the output projection."""
        attend = (
            jagged_cross_attention if isinstance(layout, CrossPairs) else padded_cross_attention
        )
        o = attend(q_MHD, k_LHD, v_LHD, layout, self.cfg.activation, self.cfg.divisor)  # type: ignore[arg-type]
        return self.out(o.reshape(o.shape[0], -1))
