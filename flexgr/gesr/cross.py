"""GESR's cross attention: each candidate's tokens query its own request's history, O(M * L).

For candidate c of sequence b (history rows ``[h_b, h_{b+1})``), per head:

    softmax:  o_c = sum_j softmax_j(q_c . k_j / sqrt(D)) v_j
    silu:     o_c = sum_j silu(q_c . k_j) v_j / divisor          (HSTU's pointwise form)

over the history rows j of b only. Candidates never see each other or other requests' histories;
an empty history gives o_c = 0. The eager implementation enumerates the (candidate, history row)
pairs of each request, sum_b M_b * L_b of them, which is the op's cost: nothing quadratic in the
batch's total length is formed. A fused kernel is not written (docs/gesr.md).

Shapes: M candidates in all, L history rows in all, H heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexgr.ranking.tokens import segments

CrossActivation = Literal["softmax", "silu"]


@dataclass(frozen=True)
class CrossPairs:
    """Every (candidate, history row) pair of the same sequence: a per-batch input, built once
    outside the forward (it holds the batch's one host sync, the pair count)."""

    candidate: Tensor  # [P] candidate row of each pair
    history: Tensor  # [P] history row of each pair


def cross_pairs(
    history_offsets: Tensor, candidate_offsets: Tensor, num_candidates: int
) -> CrossPairs:
    c_seq, _ = segments(candidate_offsets, num_candidates)
    hist_len = history_offsets[1:] - history_offsets[:-1]
    per_candidate = hist_len[c_seq]
    P = int(per_candidate.sum())
    pair_cand = torch.repeat_interleave(
        torch.arange(num_candidates, device=c_seq.device), per_candidate, output_size=P
    )
    first_pair = torch.cumsum(per_candidate, 0) - per_candidate
    local = torch.arange(P, device=c_seq.device) - first_pair[pair_cand]
    return CrossPairs(pair_cand, history_offsets[c_seq][pair_cand] + local)


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
    scores_PH = (q_MHD[pairs.candidate] * k_LHD[pairs.history]).sum(-1)
    v_PHD = v_LHD[pairs.history]
    out = v_LHD.new_zeros(M, H, v_LHD.shape[-1])
    if activation == "silu":
        return out.index_add(0, pairs.candidate, F.silu(scores_PH).unsqueeze(-1) * v_PHD) / divisor
    scores_PH = scores_PH / math.sqrt(q_MHD.shape[-1])
    # Softmax per candidate: subtract its max (detached; softmax does not depend on it).
    peak = scores_PH.new_full((M, H), -math.inf)
    index_PH = pairs.candidate.unsqueeze(1).expand(-1, H)
    peak = peak.scatter_reduce(0, index_PH, scores_PH.detach(), "amax")
    weights_PH = torch.exp(scores_PH - peak[pairs.candidate])
    total = scores_PH.new_zeros(M, H).index_add(0, pairs.candidate, weights_PH)
    out = out.index_add(0, pairs.candidate, weights_PH.unsqueeze(-1) * v_PHD)
    # Candidates with an empty history have total 0 and out 0: keep them 0, not NaN.
    return out / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(-1)


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

    def forward(self, candidates_Md: Tensor, history_Ld: Tensor, pairs: CrossPairs) -> Tensor:
        H, D = self.cfg.num_heads, self.cfg.head_dim
        q = self.q(candidates_Md).view(-1, H, D)
        k, v = self.kv(history_Ld).view(-1, 2, H, D).unbind(1)
        o = jagged_cross_attention(q, k, v, pairs, self.cfg.activation, self.cfg.divisor)
        return self.out(o.reshape(-1, H * D))
