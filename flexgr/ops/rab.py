"""HSTU's relative attention bias, kept factorised (two small tables and per-token timestamps) so
that the dense reference, a FlexAttention score_mod and a Triton kernel can all gather it inline.

bias(i, j) = pos_w[N - 1 + pos[j] - pos[i]] + ts_w[bucket(next_ts[i] - ts[j])]
bucket(dt) = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets)

with pos the token's index inside its sequence (or, when ``positions`` is given, its HSTU position
id, so that candidates share one position), and next_ts[i] the timestamp of token i + 1 (for the
last token: the query time, or its own timestamp when none is given), as in the reference HSTU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexgr.masks.layout import seq_ids_and_local

BUCKET_DIVISOR = 0.301


@dataclass(frozen=True)
class RelativeBias:
    pos_w: Tensor  # [2N - 1]
    ts_w: Tensor  # [num_buckets + 1]
    timestamps: Tensor  # [T] int64
    next_timestamps: Tensor  # [T] int64
    positions: Tensor | None = None  # [T] int; None: index inside the sequence
    bucket_divisor: float = BUCKET_DIVISOR

    @property
    def max_len(self) -> int:
        return (self.pos_w.numel() + 1) // 2

    @property
    def num_buckets(self) -> int:
        return self.ts_w.numel() - 1

    @staticmethod
    def from_timestamps(
        pos_w: Tensor,
        ts_w: Tensor,
        timestamps: Tensor,
        offsets: Tensor,
        query_time: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> "RelativeBias":
        nxt = next_timestamps(timestamps, offsets, query_time)
        return RelativeBias(pos_w, ts_w, timestamps, nxt, positions)

    def token_positions(self, offsets: Tensor) -> Tensor:
        """[T] position of every token used by the positional part."""
        if self.positions is not None:
            return self.positions.long()
        return seq_ids_and_local(offsets, self.timestamps.shape[0])[1].long()


def next_timestamps(timestamps: Tensor, offsets: Tensor, query_time: Tensor | None = None) -> Tensor:
    """ts[i + 1] inside each sequence; the last token takes ``query_time[b]`` (or its own ts).

    Per token, with no boolean indexing, so it never waits for the device."""
    T = timestamps.shape[0]
    ts = timestamps.to(torch.int64)
    if T == 0:
        return ts.clone()
    nxt = torch.cat([ts[1:], ts[-1:]])
    seq, _ = seq_ids_and_local(offsets, T)
    seq = seq.long()
    is_last = torch.arange(T, device=ts.device) == offsets[1:].to(torch.int64)[seq] - 1
    last = ts if query_time is None else query_time.to(ts.device, torch.int64)[seq]
    return torch.where(is_last, last, nxt)


def time_bucket(dt: Tensor, num_buckets: int, divisor: float = BUCKET_DIVISOR) -> Tensor:
    """Log-spaced bucket of a time difference, computed in float32 as the reference does."""
    mag = dt.abs().clamp(min=1).to(torch.float32)
    return (torch.log(mag) / divisor).to(torch.int64).clamp(0, num_buckets)


def dense_bias(rab: RelativeBias, offsets: Tensor, max_len: int) -> Tensor:
    """[B, max_len, max_len] bias on the padded batch (differentiable in both tables)."""
    B = offsets.numel() - 1
    T = rab.timestamps.shape[0]
    seq, local = seq_ids_and_local(offsets, T)
    where = (seq.long(), local.long())
    ts = rab.timestamps.new_zeros(B, max_len).index_put(where, rab.timestamps.long())
    nxt = rab.next_timestamps.new_zeros(B, max_len).index_put(where, rab.next_timestamps.long())
    positions = rab.token_positions(offsets)
    pos_BN = positions.new_zeros(B, max_len).index_put(where, positions)
    N = rab.max_len
    rel = (N - 1 + pos_BN.unsqueeze(1) - pos_BN.unsqueeze(2)).clamp(0, 2 * N - 2)
    pos = rab.pos_w[rel]
    buckets = time_bucket(nxt.unsqueeze(2) - ts.unsqueeze(1), rab.num_buckets, rab.bucket_divisor)
    return pos + rab.ts_w[buckets]
