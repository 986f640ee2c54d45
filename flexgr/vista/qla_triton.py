"""QLA's core as Triton kernels: one program per (sequence, head), the state kept on chip.

The feature map phi and the dtype casts stay in PyTorch (``flexgr.vista.qla.qla`` applies them
and autograd differentiates them); the kernels compute the core on already-mapped inputs
``fq, fk [T, H, dk]`` and ``v [T, H, dv]`` in the accumulation dtype (fp32, or fp64):

    S_i = scale * sum_{j <= i, j history} fk_j^T v_j       o_i = fq_i . psi(S_i)
    candidate rows (the last num_targets[b] of sequence b) add scale * (fq_t . fk_t) v_t

Forward: a program walks its sequence in chunks of BLOCK rows and keeps the ``dk x dv`` state
of the rows before the chunk in registers. With psi = identity the chunk's rows take the
inter-chunk term ``fq @ S`` plus the intra-chunk causal term, a masked ``fq @ fk^T`` tile times
v (the tile-product form of linear attention). With psi = SiLU the state is nonlinear in the
rows, so each row needs its own prefix state: the chunk builds ``[BLOCK, dk, dv]`` prefix states
with a cumulative sum over rows (on chip, never in memory) and contracts each with its row.

Backward (recompute-based): the forward saves the state at the start of every chunk (a
``[chunks, H, dk, dv]`` buffer, one state per BLOCK rows, not one per row). A reverse pass per
(sequence, head) walks the chunks last to first, recomputes the chunk's prefix states from the
saved start, and carries ``G``, the reverse-accumulated ``sum_{i later} dS_i`` with
``dS_i = fq_i^T do_i * psi'(S_i)``; then ``dfq_i = psi(S_i) . do_i``,
``dfk_j = scale * (G_j . v_j)`` and ``dv_j = scale * (fk_j . G_j)`` for history rows j, where
``G_j`` includes every row at or after j. Saving one state per chunk avoids both a separate
forward pass for dq and recovering states by subtraction (``S_total - suffix``), which
cancels badly in fp32. Candidates' diagonal terms are elementwise and added in the same passes.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from flexgr.vista.qla_triton_kernels import _chunk_sums, _exclusive_scan, _qla_bwd, _qla_fwd

BLOCK = 64  # rows per chunk: the unit of parallelism along the sequence and of saved states
SUB_BLOCK = 16  # the backward's recompute sub-block (tl.dot needs >= 16 rows)
DV_BLOCK_MAX = 32  # d_v columns per program: a dk x 32 fp32 state slice sits in registers


def _alloc(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Uninitialised kernel outputs (one place, so tests can poison them with NaN)."""
    return like.new_empty(shape)


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _chunk_tables(offsets: Tensor, num_targets: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Chunk slots (on device, no host sync): each sequence's first chunk [B + 1] and per slot
    ``[3, slots]`` its first row, its sequence's end and first candidate row. A sequence has at
    most len // BLOCK + 1 chunks, so T // BLOCK + B slots hold them all; the unused slots are
    zero (no rows)."""
    B = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    chunks = torch.div(lengths + BLOCK - 1, BLOCK, rounding_mode="floor")
    first = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
    slot = torch.arange(T // BLOCK + B, device=offsets.device)
    seq = torch.searchsorted(first[1:], slot, right=True).clamp(max=B - 1)
    used = slot < first[-1]
    seq_start, seq_end = offsets[seq], offsets[seq + 1]
    row0 = seq_start + (slot - first[seq]) * BLOCK
    hist_end = torch.maximum(seq_end - num_targets[seq], seq_start)
    bounds = torch.stack([row0, seq_end, hist_end]) * used
    return first, bounds.contiguous()


class _QLACore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fq, fk, v, offsets, num_targets, scale, psi_silu):  # type: ignore[override]
        T, H, dk = fq.shape
        dv = v.shape[2]
        B = offsets.numel() - 1
        dv_block = min(DV_BLOCK_MAX, _pad(dv))
        n_dv = triton.cdiv(dv, dv_block)
        out = _alloc(v, (T, H, dv))
        ctx.scale, ctx.psi_silu, ctx.dv_block = scale, psi_silu, dv_block
        if T == 0 or B == 0:
            ctx.save_for_backward(fq, fk, v, offsets)
            return out
        first, bounds = _chunk_tables(offsets, num_targets, T)
        slots = bounds.shape[1]
        states = _alloc(fq, (slots, H, _pad(dk), n_dv * dv_block))
        scale_t = fq.new_full((1,), scale)  # in the compute dtype: a float argument is fp32
        grid = (slots, H, n_dv)
        strides = (fq.stride(0), fq.stride(1), v.stride(0), v.stride(1), *states.stride()[:3])
        dims = {"DK": dk, "DV": dv, "BLOCK_DK": _pad(dk), "DV_BLOCK": dv_block, "BLOCK_T": BLOCK}
        _chunk_sums[grid](
            fq, fk, v, v, states, states, bounds, slots, *strides, scale_t, **dims,
            PSI_SILU=psi_silu, GRAD=False,
        )  # fmt: skip
        _exclusive_scan[(B, H, n_dv)](
            states, first, *states.stride()[:3], BLOCK_DK=_pad(dk), DV_BLOCK=dv_block,
            REVERSE=False,
        )  # fmt: skip
        _qla_fwd[grid](
            fq, fk, v, out, states, bounds, slots, *strides, scale_t, **dims, PSI_SILU=psi_silu
        )
        ctx.save_for_backward(fq, fk, v, offsets, first, bounds, states)
        return out

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        fq, fk, v, offsets, *tables = ctx.saved_tensors
        T, H, dk = fq.shape
        dv = v.shape[2]
        B = offsets.numel() - 1
        if T == 0 or B == 0:
            return torch.zeros_like(fq), torch.zeros_like(fk), torch.zeros_like(v), *[None] * 4
        first, bounds, states = tables
        do = do.contiguous()
        dv_block = ctx.dv_block
        n_dv = triton.cdiv(dv, dv_block)
        slots = bounds.shape[1]
        scale_t = fq.new_full((1,), ctx.scale)
        grid = (slots, H, n_dv)
        strides = (fq.stride(0), fq.stride(1), v.stride(0), v.stride(1), *states.stride()[:3])
        dims = {"DK": dk, "DV": dv, "BLOCK_DK": _pad(dk), "DV_BLOCK": dv_block, "BLOCK_T": BLOCK}
        grads = _alloc(states, tuple(states.shape))
        _chunk_sums[grid](
            fq, fk, v, do, states, grads, bounds, slots, *strides, scale_t, **dims,
            PSI_SILU=ctx.psi_silu, GRAD=True,
        )  # fmt: skip
        _exclusive_scan[(B, H, n_dv)](
            grads, first, *states.stride()[:3], BLOCK_DK=_pad(dk), DV_BLOCK=dv_block, REVERSE=True
        )
        # dq, dk sum over d_v: each d_v block writes its part, summed here (no atomics).
        dq_parts, dk_parts = _alloc(fq, (n_dv, T, H, dk)), _alloc(fk, (n_dv, T, H, dk))
        dvv = _alloc(v, v.shape)
        _qla_bwd[grid](
            fq, fk, v, do, dq_parts, dk_parts, dvv, states, grads, bounds, slots,
            fq.stride(0), fq.stride(1), v.stride(0), v.stride(1), dq_parts.stride(0),
            *states.stride()[:3], scale_t, **dims, SUB_T=SUB_BLOCK, PSI_SILU=ctx.psi_silu,
        )  # fmt: skip
        return dq_parts.sum(0), dk_parts.sum(0), dvv, None, None, None, None


def qla_core_triton(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    offsets: Tensor,
    num_targets: Tensor | None,
    *,
    divisor: float,
    psi_silu: bool,
) -> Tensor:
    """The core on mapped, same-dtype (fp32 or fp64) inputs: [T, H, dk], [T, H, dk], [T, H, dv]
    -> [T, H, dv] in that dtype. Differentiable in fq, fk and v."""
    B = offsets.numel() - 1
    nt = (
        torch.zeros(B, dtype=torch.int64, device=offsets.device)
        if num_targets is None
        else num_targets.to(torch.int64)
    )
    fq, fk, v = fq.contiguous(), fk.contiguous(), v.contiguous()
    return _QLACore.apply(fq, fk, v, offsets.to(torch.int64), nt, 1.0 / divisor, psi_silu)
