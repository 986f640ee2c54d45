"""GESR's cross attention: each candidate's tokens query its own request's history, O(M * L).

For candidate c of sequence b (history rows ``[h_b, h_{b+1})``), per head:

    softmax:  o_c = sum_j softmax_j(q_c . k_j / sqrt(D)) v_j
    silu:     o_c = sum_j silu(q_c . k_j) v_j / divisor          (HSTU's pointwise form)

over the history rows j of b only. Candidates never see each other or other requests' histories;
an empty history gives o_c = 0. Two eager implementations compute the same thing:

- ``jagged_cross_attention`` enumerates the (candidate, history row) pairs of each request,
  sum_b M_b * L_b of them, which is the op's cost: nothing quadratic in the batch's total length
  is formed, whatever the length skew (the reference the other is tested against);
- ``padded_cross_attention`` pads each request's candidates and history to the batch's longest
  (B x M_max x L_max scores, one batched matmul per side) and reads each history's keys and
  values once per request instead of once per candidate: much faster when the lengths are
  alike, as in early-stage ranking where every request has many candidates.

A fused kernel is not written (docs/gesr.md).

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
class CrossPadding:
    """Where every candidate and history row goes in the padded layout: a per-batch input,
    built once outside the forward (it holds the batch's one host sync, the longest lengths)."""

    history_rows: Tensor  # [B, L_max] row of each padded history slot (0 where padding)
    history_valid: Tensor  # [B, L_max] bool: the slot holds a history row
    candidate_seq: Tensor  # [M] sequence of each candidate
    candidate_slot: Tensor  # [M] its slot in its sequence's padded candidates
    max_candidates: int  # M_max


def cross_padding(
    history_offsets: Tensor, candidate_offsets: Tensor, num_candidates: int
) -> CrossPadding:
    hist_len = history_offsets[1:] - history_offsets[:-1]
    cand_len = candidate_offsets[1:] - candidate_offsets[:-1]
    # One host sync: both longest lengths in one read.
    if hist_len.numel():
        longest = torch.stack([hist_len.max(), cand_len.max()]).tolist()
    else:
        longest = [0, 0]
    slots = torch.arange(longest[0], device=history_offsets.device)
    valid = slots < hist_len.unsqueeze(1)
    rows = torch.where(valid, history_offsets[:-1].unsqueeze(1) + slots, 0)
    c_seq, c_slot = segments(candidate_offsets, num_candidates)
    return CrossPadding(rows, valid, c_seq, c_slot, longest[1])


def padded_cross_attention(
    q_MHD: Tensor,
    k_LHD: Tensor,
    v_LHD: Tensor,
    padding: CrossPadding,
    activation: CrossActivation = "softmax",
    divisor: float = 1.0,
) -> Tensor:
    """[M, H, Dv]: the same as :func:`jagged_cross_attention`, through padded batched matmuls."""
    _, H, D = q_MHD.shape
    B, L_max = padding.history_rows.shape
    valid_BL = padding.history_valid
    # Padding slots read row 0; their scores are masked below, so their values never count.
    k_BLHD, v_BLHD = k_LHD[padding.history_rows], v_LHD[padding.history_rows]
    q_BMHD = q_MHD.new_zeros(B, padding.max_candidates, H, D)
    q_BMHD = q_BMHD.index_put((padding.candidate_seq, padding.candidate_slot), q_MHD)
    scores_BHML = torch.einsum("bmhd,blhd->bhml", q_BMHD, k_BLHD)
    keep_B11L = valid_BL[:, None, None, :]
    if activation == "silu":
        weights = F.silu(scores_BHML) * keep_B11L / divisor
        out_BHMD = torch.einsum("bhml,blhe->bhme", weights, v_BLHD)
    else:
        scores_BHML = (scores_BHML / math.sqrt(D)).masked_fill(~keep_B11L, -math.inf)
        # The row maximum (detached: softmax does not depend on it); an empty history's row
        # is all -inf, so its peak is taken as 0 and every weight comes out 0, not NaN.
        if L_max:
            peak = scores_BHML.detach().amax(-1, keepdim=True)
            peak = torch.where(torch.isfinite(peak), peak, 0.0)
        else:  # every history empty (amax has no identity): every output 0
            peak = scores_BHML.new_zeros(*scores_BHML.shape[:-1], 1)
        weights = torch.exp(scores_BHML - peak)
        total = weights.sum(-1, keepdim=True)
        out_BHMD = torch.einsum("bhml,blhe->bhme", weights, v_BLHD)
        out_BHMD = out_BHMD / total.clamp_min(torch.finfo(total.dtype).tiny)
    return out_BHMD.permute(0, 2, 1, 3)[padding.candidate_seq, padding.candidate_slot]


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
