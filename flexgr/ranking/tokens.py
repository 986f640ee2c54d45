"""Token layouts of a ranking batch: where each history event, action and candidate sits.

``interleaved`` (the HSTU paper): ``[item_0, action_0, ..., item_{n-1}, action_{n-1}, c_0 ...]``;
``merged`` (ULTRA-HSTU): ``[event_0, ..., event_{n-1}, c_0, ...]``, one token per event holding
item and action. The candidates are the sequence's targets in both. Everything here is index
arithmetic on the batch's offsets, done once per batch outside the forward (no host sync: the
token count is known from the tensor shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flexgr.batch import JaggedBatch
from flexgr.ranking.batch import RankingBatch

TokenLayout = Literal["interleaved", "merged"]


@dataclass(frozen=True)
class TokenRows:
    """Row of every token kind in the packed token sequence of a batch."""

    offsets: Tensor  # [B + 1] token offsets
    item_rows: Tensor  # [H] row of each history event's item (merged: its only) token
    action_rows: Tensor | None  # [H] row of each action token (interleaved), None for merged
    candidate_rows: Tensor  # [C] row of each candidate token
    timestamps: Tensor  # [T] int64: the event's time; candidates at their query time
    num_targets: Tensor  # [B] candidates per sequence
    num_tokens: int


def segments(offsets: Tensor, total: int, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(segment id, index inside the segment) of each of ``total`` packed entries; ``lengths``
    the segments' lengths where the caller has them already. The one-argument
    ``repeat_interleave`` (each index repeated by its length) runs one kernel fewer than
    repeating an arange."""
    lengths = offsets[1:] - offsets[:-1] if lengths is None else lengths
    seg = torch.repeat_interleave(lengths.long(), output_size=total)
    return seg, torch.arange(total, device=offsets.device) - offsets[seg]


@dataclass(frozen=True)
class BatchSegments:
    """Each history event's and candidate's sequence and index in it, and the lengths: derived
    once per batch and shared by everything a model prepares from them."""

    history_seq: Tensor  # [H]
    history_local: Tensor  # [H]
    candidate_seq: Tensor  # [C]
    candidate_local: Tensor  # [C]
    history_len: Tensor  # [B]
    candidate_len: Tensor  # [B]

    @staticmethod
    def of(batch: RankingBatch) -> BatchSegments:
        return BatchSegments.of_offsets(
            batch.history_offsets, batch.candidate_offsets, batch.num_history, batch.num_candidates
        )

    @staticmethod
    def of_offsets(
        history_offsets: Tensor, candidate_offsets: Tensor, num_history: int, num_candidates: int
    ) -> BatchSegments:
        hist_len = history_offsets[1:] - history_offsets[:-1]
        cand_len = candidate_offsets[1:] - candidate_offsets[:-1]
        h_seq, h_local = segments(history_offsets, num_history, hist_len)
        c_seq, c_local = segments(candidate_offsets, num_candidates, cand_len)
        return BatchSegments(h_seq, h_local, c_seq, c_local, hist_len, cand_len)


def token_rows(
    batch: RankingBatch, layout: TokenLayout, segs: BatchSegments | None = None
) -> TokenRows:
    """``segs``: the batch's :class:`BatchSegments`, where the caller has them already."""
    per_event = 2 if layout == "interleaved" else 1
    H, C = batch.num_history, batch.num_candidates
    segs = BatchSegments.of(batch) if segs is None else segs
    hist_len, cand_len = segs.history_len, segs.candidate_len
    lengths = per_event * hist_len + cand_len
    offsets = torch.zeros_like(batch.history_offsets)
    offsets[1:] = torch.cumsum(lengths, 0)
    T = per_event * H + C
    h_seq, h_local = segs.history_seq, segs.history_local
    c_seq, c_local = segs.candidate_seq, segs.candidate_local
    item_rows = offsets[h_seq] + per_event * h_local
    action_rows = item_rows + 1 if layout == "interleaved" else None
    candidate_rows = offsets[c_seq] + per_event * hist_len[c_seq] + c_local
    timestamps = torch.empty(T, dtype=torch.int64, device=batch.device)
    timestamps[item_rows] = batch.history_timestamps
    if action_rows is not None:
        timestamps[action_rows] = batch.history_timestamps
    timestamps[candidate_rows] = batch.query_time[c_seq]
    return TokenRows(offsets, item_rows, action_rows, candidate_rows, timestamps, cand_len, T)


def place(rows: list[Tensor], values: list[Tensor], num_tokens: int) -> Tensor:
    """[T, d]: ``values[i]`` written at ``rows[i]`` (differentiable in the values)."""
    first = values[0]
    out = first.new_zeros(num_tokens, first.shape[-1])
    return out.index_copy(0, torch.cat(rows), torch.cat(values))


def token_batch(rows: TokenRows, batch: RankingBatch) -> JaggedBatch:
    """The token sequences as a JaggedBatch for the attention inputs (offsets, times, targets;
    the ids are placeholders, the token embeddings are placed separately)."""
    return JaggedBatch(
        torch.zeros(rows.num_tokens, dtype=torch.int64, device=batch.device),
        rows.offsets,
        rows.timestamps,
        batch.query_time,
        rows.num_targets,
    )
