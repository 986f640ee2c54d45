"""GESR's hard matching attention (HMA): how often the user's history holds the candidate's
feature values, per feature column (item id, category, creator...).

For candidate c of sequence b and feature column f:

    count[c, f] = sum_{j in history(b)} 1[hist[j, f] == cand[c, f]] * w_j

with ``w_j = 1`` (raw counts) or ``w_j = 0.5 ** (age_j / half_life)``, ``age_j`` the time from
event j to the request's query time (recency weighting). The feature is ``log1p(count)`` or a
bucket index of it for an embedding table. The paper gives no formula; docs/gesr.md says why
these choices.

The join is a sort + searchsorted over composite keys ``(sequence, value)``: the history keys are
sorted once, a cumulative sum of their weights is taken, and each candidate's count is the
difference of that sum at the two ends of its key's run. Cost O((L + M) log L) for L history
events and M candidates; no ``[M x L]`` comparison is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flexgr.ranking.tokens import segments

# Composite keys are sequence * span + value in int64: keep the product well inside 2**63.
_KEY_LIMIT = 2**62


@dataclass(frozen=True)
class HardMatchConfig:
    """``half_life``: recency weighting in timestamp units (seconds); None counts every event
    as 1. ``ignore_value``: a feature value that never matches (padding / unknown), None for
    none. ``num_buckets``: 0 returns log1p(count) features; > 0 returns bucket indices
    ``min(floor(log2(1 + count)), num_buckets - 1)`` (0 for no match) and
    :class:`HardMatchEmbedding` embeds them."""

    half_life: float | None = None
    ignore_value: int | None = None
    num_buckets: int = 0

    def __post_init__(self) -> None:
        if self.half_life is not None and not self.half_life > 0:
            raise ValueError(f"hard match half_life must be > 0 or None, got {self.half_life}")
        if self.num_buckets < 0:
            raise ValueError(f"hard match num_buckets must be >= 0, got {self.num_buckets}")


def recency_weights(
    history_timestamps: Tensor, history_offsets: Tensor, query_time: Tensor, half_life: float
) -> Tensor:
    """[L] float64: ``0.5 ** (age / half_life)``, age = query time - event time, clamped at 0
    (an event logged after the query time counts as fresh, never more than 1)."""
    seq, _ = segments(history_offsets, history_timestamps.shape[0])
    age = (query_time[seq] - history_timestamps).clamp_min(0).to(torch.float64)
    return torch.exp2(-age / half_life)


def match_counts(
    history_LF: Tensor,
    history_offsets: Tensor,
    candidates_MF: Tensor,
    candidate_offsets: Tensor,
    weights_L: Tensor | None = None,
    ignore_value: int | None = None,
) -> Tensor:
    """[M, F] float64: the (weighted) number of history events of each candidate's sequence
    whose column-f value equals the candidate's, for every column f."""
    if history_LF.dim() != 2 or candidates_MF.dim() != 2:
        raise ValueError(
            "hard match: features must be [L, F] and [M, F], got "
            f"{tuple(history_LF.shape)} and {tuple(candidates_MF.shape)}"
        )
    if history_LF.shape[1] != candidates_MF.shape[1]:
        raise ValueError(
            f"hard match: history has {history_LF.shape[1]} feature columns, candidates "
            f"{candidates_MF.shape[1]}"
        )
    L, F = history_LF.shape
    M = candidates_MF.shape[0]
    device = candidates_MF.device
    if M == 0 or L == 0:
        return torch.zeros(M, F, dtype=torch.float64, device=device)
    h_seq, _ = segments(history_offsets, L)
    c_seq, _ = segments(candidate_offsets, M)
    w = torch.ones(L, dtype=torch.float64, device=device) if weights_L is None else weights_L
    w = w.to(torch.float64)
    both = torch.cat([history_LF, candidates_MF]).long()
    # One host sync per call: the value range sets the composite key's stride.
    lo_hi = torch.stack([both.min(), both.max()]).tolist()
    low, span = lo_hi[0], lo_hi[1] - lo_hi[0] + 1
    num_seq = history_offsets.shape[0] - 1
    if num_seq * span >= _KEY_LIMIT:
        raise ValueError(
            f"hard match: {num_seq} sequences x value range {span} overflows the int64 join key"
        )
    out = torch.empty(M, F, dtype=torch.float64, device=device)
    for f in range(F):
        h_val, c_val = history_LF[:, f].long(), candidates_MF[:, f].long()
        w_f = w if ignore_value is None else w * (h_val != ignore_value)
        h_key = h_seq * span + (h_val - low)
        c_key = c_seq * span + (c_val - low)
        sorted_key, order = torch.sort(h_key)
        cum = torch.zeros(L + 1, dtype=torch.float64, device=device)
        cum[1:] = torch.cumsum(w_f[order], 0)
        left = torch.searchsorted(sorted_key, c_key, side="left")
        right = torch.searchsorted(sorted_key, c_key, side="right")
        # Differences of a running float64 sum: exact for counts, ~1e-16 relative for weights.
        count = (cum[right] - cum[left]).clamp_min(0)
        if ignore_value is not None:
            count = count * (c_val != ignore_value)
        out[:, f] = count
    return out


def bucketise(counts: Tensor, num_buckets: int) -> Tensor:
    """int64 buckets ``min(floor(log2(1 + count)), num_buckets - 1)``: 0 for no match, then
    1, 2-3, 4-7... events (fractional weighted counts fall between)."""
    return torch.floor(torch.log2(1 + counts)).long().clamp(0, num_buckets - 1)


def hard_match_features(
    cfg: HardMatchConfig,
    history_LF: Tensor,
    history_offsets: Tensor,
    candidates_MF: Tensor,
    candidate_offsets: Tensor,
    history_timestamps: Tensor | None = None,
    query_time: Tensor | None = None,
) -> Tensor:
    """[M, F]: float64 ``log1p(count)`` (``num_buckets == 0``) or int64 bucket indices.
    Recency weighting (``cfg.half_life``) needs ``history_timestamps`` [L] and ``query_time``
    [B]. These are per-batch inputs, built outside the model's forward."""
    weights = None
    if cfg.half_life is not None:
        if history_timestamps is None or query_time is None:
            raise ValueError("hard match: half_life needs history_timestamps and query_time")
        weights = recency_weights(history_timestamps, history_offsets, query_time, cfg.half_life)
    counts = match_counts(
        history_LF, history_offsets, candidates_MF, candidate_offsets, weights, cfg.ignore_value
    )
    return bucketise(counts, cfg.num_buckets) if cfg.num_buckets else torch.log1p(counts)


class HardMatchEmbedding(nn.Module):
    """[M, F] features -> [M, F * dim]: one bucket table per column (bucket features), or one
    ``log1p`` scalar scaled by a learned vector per column (log1p features)."""

    def __init__(self, num_features: int, dim: int, num_buckets: int = 0) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        rows = num_buckets if num_buckets else 1
        self.table = nn.Parameter(torch.empty(num_features, rows, dim).normal_(0, 0.02))

    def forward(self, features_MF: Tensor) -> Tensor:
        M, F = features_MF.shape
        if self.num_buckets:
            column = torch.arange(F, device=features_MF.device)
            return self.table[column, features_MF.long()].reshape(M, -1)
        scaled = features_MF.to(self.table.dtype).unsqueeze(-1) * self.table[:, 0]
        return scaled.reshape(M, -1)
