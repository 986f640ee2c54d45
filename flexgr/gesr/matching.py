"""GESR's hard matching attention (HMA): how often the user's history holds the candidate's
feature values, per feature column (item id, category, creator...).

For candidate c of sequence b and feature column f:

    count[c, f] = sum_{j in history(b)} 1[hist[j, f] == cand[c, f]] * w_j

with ``w_j = 1`` (raw counts) or ``w_j = 0.5 ** (age_j / half_life)``, ``age_j`` the time from
event j to the request's query time (recency weighting). The feature is ``log1p(count)`` or a
bucket index of it for an embedding table. The paper gives no formula; docs/gesr.md says why
these choices.

The join is a sort + searchsorted over composite keys ``sequence * stride + value``: the history
keys are sorted once (:class:`SortedHistory`), and each candidate's count is the length of its
key's run (raw counts) or the difference of the run's cumulative weight at its two ends. Cost
O((L + M) log L) for L history events and M candidates; no ``[M x L]`` comparison is ever
formed. Nothing here reads a tensor's value on the host: the stride comes from the caller's
``value_range`` (the model's vocabulary) or, without one, from the values' ranks (one more sort),
whose count L + M the shapes give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flexgr.ranking.tokens import BatchSegments, segments

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
    history_timestamps: Tensor,
    history_offsets: Tensor,
    query_time: Tensor,
    half_life: float,
    history_seq: Tensor | None = None,
) -> Tensor:
    """[L] float64: ``0.5 ** (age / half_life)``, age = query time - event time, clamped at 0
    (an event logged after the query time counts as fresh, never more than 1). ``history_seq``
    [L], each event's sequence, where the caller has it already."""
    if history_seq is None:
        history_seq, _ = segments(history_offsets, history_timestamps.shape[0])
    return decay(query_time[history_seq] - history_timestamps, half_life)


def decay(age: Tensor, half_life: float) -> Tensor:
    """[L] float64 ``0.5 ** (max(age, 0) / half_life)`` of integer ages."""
    return torch.exp2(-age.clamp_min(0).to(torch.float64) / half_life)


@dataclass(frozen=True)
class SortedHistory:
    """One feature column's history side of the join: its keys sorted, and the running sum of
    their weights in that order (None: every event weighs 1, and a count is a run length)."""

    keys: Tensor  # [L] int64 sorted join keys
    cumulative: Tensor | None  # [L + 1] float64, 0 first

    @staticmethod
    def of(keys_L: Tensor, weights_L: Tensor | None) -> SortedHistory:
        if weights_L is None:
            return SortedHistory(torch.sort(keys_L).values, None)
        sorted_keys, order = torch.sort(keys_L)
        cumulative = weights_L.new_zeros(keys_L.shape[0] + 1)
        cumulative[1:] = torch.cumsum(weights_L[order], 0)
        return SortedHistory(sorted_keys, cumulative)

    def counts(self, keys_M: Tensor) -> Tensor:
        """[M] float64: the total weight of the history events whose key equals each key."""
        left = torch.searchsorted(self.keys, keys_M, side="left")
        right = torch.searchsorted(self.keys, keys_M, side="right")
        if self.cumulative is None:  # unit weights: the run's length, an exact integer
            return (right - left).to(torch.float64)
        # Differences of a running float64 sum: exact for counts, ~1e-16 relative for weights.
        return (self.cumulative[right] - self.cumulative[left]).clamp_min(0)


def value_ranks(history_L: Tensor, candidates_M: Tensor) -> tuple[Tensor, Tensor]:
    """Each value's rank among all L + M values (equal values share one): the join keys of an
    unbounded value range, in ``[0, L + M)``, found without reading any value on the host."""
    both = torch.cat([history_L, candidates_M])
    ranks = torch.searchsorted(torch.sort(both).values, both)
    return ranks[: history_L.shape[0]], ranks[history_L.shape[0] :]


def match_counts(
    history_LF: Tensor,
    history_offsets: Tensor,
    candidates_MF: Tensor,
    candidate_offsets: Tensor,
    weights_L: Tensor | None = None,
    ignore_value: int | None = None,
    *,
    value_range: tuple[int, int] | None = None,
    segs: BatchSegments | None = None,
) -> Tensor:
    """[M, F] float64: the (weighted) number of history events of each candidate's sequence
    whose column-f value equals the candidate's, for every column f.

    ``value_range`` (low, high): every value lies in it (the model passes its item vocabulary);
    it sets the key stride with no further work. A value outside it is the caller's error and
    is not checked (that would read the data on the host). None: the keys are the values'
    ranks (exact for any int64 values, one more sort per column). ``segs``: the offsets'
    segment ids, where the caller has them already."""
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
    num_seq = history_offsets.shape[0] - 1
    # Ranks lie in [0, L + M); a given range spans high - low + 1 values.
    low, high = (0, L + M - 1) if value_range is None else value_range
    span = high - low + 1
    if span < 1:
        raise ValueError(f"hard match: value_range {value_range} is empty")
    if num_seq * span >= _KEY_LIMIT:
        raise ValueError(
            f"hard match: {num_seq} sequences x value range {span} overflows the int64 join key"
        )
    if segs is None:
        segs = BatchSegments.of_offsets(history_offsets, candidate_offsets, L, M)
    columns = []
    for f in range(F):
        h_val, c_val = history_LF[:, f].long(), candidates_MF[:, f].long()
        if value_range is None:
            h_pos, c_pos = value_ranks(h_val, c_val)
        else:
            h_pos, c_pos = (h_val - low, c_val - low) if low else (h_val, c_val)
        # key = sequence * span + position in the range, one fused multiply-add each.
        h_key = torch.add(h_pos, segs.history_seq, alpha=span)
        c_key = torch.add(c_pos, segs.candidate_seq, alpha=span)
        join = SortedHistory.of(h_key, counted_weights(weights_L, h_val, ignore_value))
        columns.append(candidate_counts(join, c_key, c_val, ignore_value))
    return columns[0].unsqueeze(1) if F == 1 else torch.stack(columns, dim=1)


def counted_weights(
    weights_L: Tensor | None, values_L: Tensor, ignore_value: int | None
) -> Tensor | None:
    """[L] float64 weights with the ignored events' at 0, or None for unit weights. Ignored
    events can only meet ignored candidates, whose counts :func:`candidate_counts` zeroes; their
    weights are zeroed too only so that the running sum (and so every weighted count, to the
    bit) is the sum of the weights that count."""
    if weights_L is None:
        return None
    weights = weights_L.to(torch.float64)
    return weights if ignore_value is None else weights * (values_L != ignore_value)


def candidate_counts(
    join: SortedHistory, keys_M: Tensor, values_M: Tensor, ignore_value: int | None
) -> Tensor:
    """[M] float64 counts of the candidates' keys, 0 where the value is ignored."""
    count = join.counts(keys_M)
    return count if ignore_value is None else count * (values_M != ignore_value)


def one_history_join(
    values_L: Tensor, weights_L: Tensor | None, ignore_value: int | None
) -> SortedHistory:
    """The join's history side of one request (serving): the keys are the values themselves
    (one sequence), sorted once and reused by every microbatch of its candidates."""
    values = values_L.long()
    return SortedHistory.of(values, counted_weights(weights_L, values, ignore_value))


def features_of(cfg: HardMatchConfig, counts: Tensor) -> Tensor:
    """``counts`` as the configured features: bucket ids or ``log1p`` values."""
    return bucketise(counts, cfg.num_buckets) if cfg.num_buckets else torch.log1p(counts)


def bucketise(counts: Tensor, num_buckets: int) -> Tensor:
    """int64 buckets ``min(floor(log2(1 + count)), num_buckets - 1)``: 0 for no match, then
    1, 2-3, 4-7... events (fractional weighted counts fall between)."""
    # log2(1 + count) >= 0 (counts are >= 0), so the cast's truncation is the floor.
    return torch.log2(1 + counts).long().clamp(0, num_buckets - 1)


def hard_match_features(
    cfg: HardMatchConfig,
    history_LF: Tensor,
    history_offsets: Tensor,
    candidates_MF: Tensor,
    candidate_offsets: Tensor,
    history_timestamps: Tensor | None = None,
    query_time: Tensor | None = None,
    *,
    value_range: tuple[int, int] | None = None,
    segs: BatchSegments | None = None,
) -> Tensor:
    """[M, F]: float64 ``log1p(count)`` (``num_buckets == 0``) or int64 bucket indices.
    Recency weighting (``cfg.half_life``) needs ``history_timestamps`` [L] and ``query_time``
    [B]. These are per-batch inputs, built outside the model's forward; the keywords are
    :func:`match_counts`'."""
    weights = None
    if cfg.half_life is not None:
        if history_timestamps is None or query_time is None:
            raise ValueError("hard match: half_life needs history_timestamps and query_time")
        history_seq = None if segs is None else segs.history_seq
        weights = recency_weights(
            history_timestamps, history_offsets, query_time, cfg.half_life, history_seq
        )
    counts = match_counts(
        history_LF,
        history_offsets,
        candidates_MF,
        candidate_offsets,
        weights,
        cfg.ignore_value,
        value_range=value_range,
        segs=segs,
    )
    return features_of(cfg, counts)


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
        if self.num_buckets and F == 1:  # one column: one table, one gather
            return self.table[0][features_MF[:, 0].long()]
        if self.num_buckets:
            column = torch.arange(F, device=features_MF.device)
            return self.table[column, features_MF.long()].reshape(M, -1)
        scaled = features_MF.to(self.table.dtype).unsqueeze(-1) * self.table[:, 0]
        return scaled.reshape(M, -1)
