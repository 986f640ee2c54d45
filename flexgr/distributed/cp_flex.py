"""Context-parallel HSTU attention through FlexAttention: the shift transform of
``flexgr.ops.flex`` with Q_LEN = S (this rank's padded queries) and KV_LEN = C * S (the gathered
keys), the mask and the relative bias remapped to global token indices."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from flexgr.distributed.cp_dense import _dense, _global_tables
from flexgr.distributed.cp_mask import CPMask, flex_block_mask
from flexgr.ops.flex import BiasFn, shift_sum, table_bias
from flexgr.ops.rab import RelativeBias

_PAIR_BUDGET = 1 << 26  # score elements per chunk when recomputing bias-table gradients


def _chunks(
    len_q: list[int], len_k: list[int], heads: int, budget: int
) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
    """(lo, hi, rows) work items whose padded score block stays within ``budget`` elements:
    runs of whole sequences, or blocks of query rows of one sequence too long to fit alone."""
    B, start = len(len_q), 0
    while start < B:
        if heads * len_q[start] * len_k[start] > budget:
            step = max(1, budget // (heads * len_k[start]))
            for a in range(0, len_q[start], step):
                yield start, start + 1, (a, min(a + step, len_q[start]))
            start += 1
            continue
        stop, wq, wk = start, 0, 0
        while stop < B:
            wq2, wk2 = max(wq, len_q[stop]), max(wk, len_k[stop])
            if stop > start and (stop + 1 - start) * heads * wq2 * wk2 > budget:
                break
            wq, wk, stop = wq2, wk2, stop + 1
        yield start, stop, None
        start = stop


class _TableGrad(torch.autograd.Function):
    """Adds a zero whose backward is the gradient of the bias tables (flex reads them detached:
    its captured-buffer backward does not compile for these gathers on torch 2.11). The gradient
    is recomputed densely in fp32, in chunks of bounded size (see ``_chunks``)."""

    @staticmethod
    def forward(ctx, pos_w, ts_w, q, k_all, v_all, mask, rab, alpha, max_seq_len):  # type: ignore[override]
        ctx.save_for_backward(q, k_all, v_all)
        ctx.args = (mask, rab, alpha, max_seq_len, pos_w, ts_w)
        return v_all.new_zeros((q.shape[0], *v_all.shape[1:]))

    @staticmethod
    def backward(ctx, g_THD):  # type: ignore[override]
        q, k_all, v_all = ctx.saved_tensors
        mask, rab, alpha, max_seq_len, pos_w, ts_w = ctx.args
        pw = pos_w.detach().float().requires_grad_(True)
        tw = ts_w.detach().float().requires_grad_(True)
        d_pos, d_ts = torch.zeros_like(pw), torch.zeros_like(tw)
        rab_f = dataclasses.replace(rab, pos_w=pw, ts_w=tw)
        tables = _global_tables(rab, mask)
        shard = mask.shard
        len_k = (shard.offsets[1:] - shard.offsets[:-1]).tolist()
        len_q = (shard.local_offsets[1:] - shard.local_offsets[:-1]).tolist()
        l_off = shard.local_offsets.tolist()
        qf, kf, vf, gf = q.float(), k_all.float(), v_all.float(), g_THD.float()
        with torch.enable_grad():
            for lo, hi, rows in _chunks(len_q, len_k, q.shape[1], _PAIR_BUDGET):
                r0, r1 = (
                    (l_off[lo], l_off[hi])
                    if rows is None
                    else (l_off[lo] + rows[0], l_off[lo] + rows[1])
                )
                if r1 == r0:
                    continue
                out = _dense(
                    qf,
                    kf,
                    vf,
                    mask,
                    max_seq_len=max_seq_len,
                    alpha=alpha,
                    rab=rab_f,
                    seqs=(lo, hi),
                    rows=rows,
                    tables=tables,
                )
                gp, gt = torch.autograd.grad(out, (pw, tw), gf[r0:r1])
                d_pos += gp
                d_ts += gt
        return d_pos.to(pos_w.dtype), d_ts.to(ts_w.dtype), None, None, None, None, None, None, None


def _flex_bias_fn(rab: RelativeBias | None, mask: CPMask) -> BiasFn:
    if rab is None:
        return lambda s, q, kv: s
    pos, ts, nxt = _global_tables(rab, mask)
    qi, ki = mask.q_index.clamp(min=0), mask.kv_index.clamp(min=0)
    # Gathered once per call into per-slot tables, so the kernel does one lookup per side.
    return table_bias(rab, pos[qi], nxt[qi], pos[ki], ts[ki])


def attend_gathered_flex(
    q: Tensor,
    k_all: Tensor,
    v_all: Tensor,
    mask: CPMask,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
) -> Tensor:
    """The shift transform of ``flexgr.ops.flex`` with Q_LEN = S and KV_LEN = C*S."""
    T_r, S = q.shape[0], mask.q_len
    q4 = F.pad(q, (0, 0, 0, 0, 0, S - T_r)).transpose(0, 1).unsqueeze(0)
    k4 = k_all.transpose(0, 1).unsqueeze(0)
    v4 = v_all.transpose(0, 1).unsqueeze(0)
    add_bias = _flex_bias_fn(rab, mask)
    opts = {"BLOCK_M": 64, "BLOCK_N": 64} if rab is not None and q.device.type == "cuda" else None

    acc = shift_sum(q4, k4, v4, add_bias, flex_block_mask(mask), alpha, opts)
    out_THD = (acc[0].transpose(0, 1)[:T_r] / max_seq_len).to(v_all.dtype)
    if (
        rab is not None
        and torch.is_grad_enabled()
        and (rab.pos_w.requires_grad or rab.ts_w.requires_grad)
    ):
        zero = _TableGrad.apply(
            rab.pos_w,
            rab.ts_w,
            q.detach(),
            k_all.detach(),
            v_all.detach(),
            mask,
            rab,
            alpha,
            max_seq_len,
        )
        out_THD = out_THD + zero.to(out_THD.dtype)
    return out_THD
