"""Gradients of the relative-bias tables for the flex backend.

FlexAttention can differentiate tensors captured by a score_mod, but on torch 2.11 the generated
backward fails to compile for our gathers ("can only unsplat single-element tensors"). So the flex
backend reads detached tables, and this bridge adds a zero to the output whose backward computes
the table gradients directly:

    d table[e] = sum over allowed pairs (i, j) with index(i, j) = e of silu'(x_ij) (g_i . v_j) / N

on the padded batch, a few sequences (or, for a long one, a block of query rows) at a time so
memory stays bounded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexgr.masks.block import HSTUMask
from flexgr.ops.jagged import to_padded
from flexgr.ops.rab import RelativeBias, time_bucket

_PAIR_BUDGET = 1 << 26  # elements of one [b, H, L, L] chunk


def _silu_grad(x: Tensor) -> Tensor:
    sig = torch.sigmoid(x)
    return sig * (1 + x * (1 - sig))


class _TableGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pos_w, ts_w, q, k, v, rab, mask, offsets, lengths, alpha, max_seq_len):  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        ctx.args = (rab, mask, offsets, lengths, alpha, max_seq_len, pos_w.shape, ts_w.shape)
        return v.new_zeros(v.shape)

    @staticmethod
    def backward(ctx, g_THD):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        rab, mask, offsets, lengths, alpha, max_seq_len, pos_shape, ts_shape = ctx.args
        d_pos = torch.zeros(pos_shape, device=q.device, dtype=torch.float32)
        d_ts = torch.zeros(ts_shape, device=q.device, dtype=torch.float32)
        _accumulate(d_pos, d_ts, q, k, v, g_THD, rab, mask, offsets, lengths, alpha, max_seq_len)
        return d_pos, d_ts, None, None, None, None, None, None, None, None, None


def _accumulate(d_pos, d_ts, q, k, v, g, rab, mask, offsets, lengths, alpha, max_seq_len) -> None:
    H = q.shape[1]
    positions = rab.token_positions(offsets)
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    N = rab.max_len
    B = lengths.numel()
    lens = lengths.tolist()
    start = 0
    while start < B:
        stop, width = start, 0
        while stop < B:
            width = max(width, lens[stop])
            if stop > start and (stop + 1 - start) * H * width * width > _PAIR_BUDGET:
                break
            stop += 1
        width = max(max(lens[start:stop]), 1)
        lo, hi = int(offsets[start]), int(offsets[stop])
        sub_off = offsets[start : stop + 1] - lo

        def pad(x: Tensor) -> Tensor:
            return to_padded(x[lo:hi], sub_off, width)

        q_b, k_b, v_b, g_b = pad(q).float(), pad(k).float(), pad(v).float(), pad(g).float()
        ts, nxt, pos = pad(rab.timestamps.long()), pad(rab.next_timestamps.long()), pad(positions)
        n = torch.arange(width, device=q.device)
        inside = n.view(1, -1) < lengths[start:stop].view(-1, 1)
        tok = (offsets[start:stop].view(-1, 1) + n.view(1, -1)).clamp(max=max(q.shape[0] - 1, 0))
        # One long sequence alone can exceed the budget: walk its query rows in blocks.
        rows = max(1, _PAIR_BUDGET // max(1, (stop - start) * H * width))
        for r0 in range(0, width, rows):
            r = slice(r0, min(r0 + rows, width))
            x = torch.einsum("bnhd,bmhd->bhnm", q_b[:, r], k_b) * alpha
            rel = (N - 1 + pos.unsqueeze(1) - pos[:, r].unsqueeze(2)).clamp(0, 2 * N - 2)
            dt = nxt[:, r].unsqueeze(2) - ts.unsqueeze(1)
            bucket = time_bucket(dt, rab.num_buckets, rab.bucket_divisor)
            bias = rab.pos_w.detach().float()[rel] + rab.ts_w.detach().float()[bucket]
            x = x + bias.unsqueeze(1)
            # The batch's own mask_mod, evaluated on broadcast global indices of this block.
            allowed = mask.mask_mod(zero, zero, tok[:, r].unsqueeze(2), tok.unsqueeze(1))
            allowed = allowed & inside[:, r].unsqueeze(2) & inside.unsqueeze(1)
            gv = torch.einsum("bnhd,bmhd->bhnm", g_b[:, r], v_b)
            dS = (_silu_grad(x) * gv).sum(1) * allowed / max_seq_len  # [b, rows, m]
            d_pos.index_add_(0, rel.reshape(-1), dS.reshape(-1))
            d_ts.index_add_(0, bucket.reshape(-1), dS.reshape(-1))
        start = stop


def with_table_grads(
    out_THD: Tensor, q: Tensor, k: Tensor, v: Tensor, rab: RelativeBias, mask: HSTUMask,
    offsets: Tensor, *, alpha: float, max_seq_len: int,
) -> Tensor:
    """out + 0, where the 0 carries the gradients of rab's tables."""
    if not (torch.is_grad_enabled() and (rab.pos_w.requires_grad or rab.ts_w.requires_grad)):
        return out_THD
    lengths = offsets[1:] - offsets[:-1]
    zero = _TableGrad.apply(
        rab.pos_w, rab.ts_w, q.detach(), k.detach(), v.detach(), rab, mask, offsets, lengths,
        alpha, max_seq_len,
    )
    return out_THD + zero.to(out_THD.dtype)
