"""HSTU's relative attention bias, kept factorised (two small tables and per-token timestamps) so
that the dense reference, a FlexAttention score_mod and a Triton kernel can all gather it inline.

bias(i, j) = pos_w[N - 1 + j - i] + ts_w[bucket(next_ts[i] - ts[j])]
bucket(dt) = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets)

with i, j indices inside one sequence, and next_ts[i] the timestamp of token i + 1 (for the last
token: the query time, or its own timestamp when none is given), as in the reference HSTU.
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
    ) -> "RelativeBias":
        return RelativeBias(pos_w, ts_w, timestamps, next_timestamps(timestamps, offsets, query_time))


def next_timestamps(timestamps: Tensor, offsets: Tensor, query_time: Tensor | None = None) -> Tensor:
    """ts[i + 1] inside each sequence; the last token takes ``query_time[b]`` (or its own ts)."""
    T = timestamps.shape[0]
    ts = timestamps.to(torch.int64)
    nxt = torch.cat([ts[1:], ts[-1:]]) if T > 0 else ts.clone()
    ends = (offsets[1:] - 1).to(torch.int64)
    nonempty = offsets[1:] > offsets[:-1]
    ends = ends[nonempty]
    last = ts[ends] if query_time is None else query_time.to(ts.device, torch.int64)[nonempty]
    return nxt.index_put((ends,), last)


def time_bucket(dt: Tensor, num_buckets: int, divisor: float = BUCKET_DIVISOR) -> Tensor:
    """Log-spaced bucket of a time difference, computed in float32 as the reference does."""
    mag = dt.abs().clamp(min=1).to(torch.float32)
    return (torch.log(mag) / divisor).to(torch.int64).clamp(0, num_buckets)


def dense_bias(rab: RelativeBias, offsets: Tensor, max_len: int) -> Tensor:
    """[B, max_len, max_len] bias on the padded batch (differentiable in both tables)."""
    B = offsets.numel() - 1
    T = rab.timestamps.shape[0]
    seq, local = seq_ids_and_local(offsets, T)
    ts = rab.timestamps.new_zeros(B, max_len).index_put((seq.long(), local.long()), rab.timestamps.long())
    nxt = rab.next_timestamps.new_zeros(B, max_len).index_put(
        (seq.long(), local.long()), rab.next_timestamps.long()
    )
    N = rab.max_len
    i = torch.arange(max_len, device=offsets.device)
    rel = (N - 1 + i.view(1, -1) - i.view(-1, 1)).clamp(0, 2 * N - 2)
    pos = rab.pos_w[rel].unsqueeze(0)
    buckets = time_bucket(nxt.unsqueeze(2) - ts.unsqueeze(1), rab.num_buckets, rab.bucket_divisor)
    return pos + rab.ts_w[buckets]
