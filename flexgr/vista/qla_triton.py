"""QLA's core as Triton kernels, parallel over (chunk, head, d_v block); the state on chip.

The feature map phi and the dtype casts stay in PyTorch (``flexgr.vista.qla.qla`` applies them
and autograd differentiates them); the kernels (``flexgr.vista.qla_triton_kernels``) compute the
core on already-mapped inputs ``fq, fk [T, H, dk]`` and ``v [T, H, dv]`` in the accumulation
dtype (fp32, or fp64):

    S_i = scale * sum_{j <= i, j history} fk_j^T v_j       o_i = fq_i . psi(S_i)
    candidate rows (the last num_targets[b] of sequence b) add scale * (fq_t . fk_t) v_t

Each sequence is cut into chunks of BLOCK rows (a chunk never straddles sequences), and every
program owns one (chunk, head, d_v block of DV_BLOCK columns), so its state slice is
``dk x DV_BLOCK`` (2k fp32 values at dk = 64) rather than a ``[BLOCK, dk, dv]`` stack of row
states. Chunk slots come from small device tables (no host sync): T // BLOCK + B bound them.

Forward: (a) each chunk's ``scale * sum fk_j^T v_j`` over its history rows, one tile product,
into a ``[slots, H, dk, dv]`` buffer; (b) an in-place exclusive scan over each sequence's
chunks turns those sums into each chunk's start state (added forwards, never a total minus a
part); (c) each chunk's rows from its start state: with psi = SiLU one row at a time, a rank-1
update of the state slice then ``fq_i . psi(S_i)``; with psi = identity the tile product of
linear attention (``fq @ S`` plus a causally masked ``fq fk^T`` tile times v). Candidates add
nothing to the state and add their diagonal term elementwise.

Backward, the same decomposition in reverse, from the saved start states: (a) each chunk's
``sum dS_i``, ``dS_i = fq_i^T do_i * psi'(S_i)``, walking its rows forwards from the start state;
(b) a reverse exclusive scan gives each chunk G, the dS of the sequence's later chunks; (c) each
chunk walks its rows last to first, adding each row's dS to G: ``dfq_i = psi(S_i) . do_i``,
``dfk_j = scale * (G_j . v_j)``, ``dv_j = scale * (fk_j . G_j)`` for history rows j. Going
backwards needs S_i in reverse order; recovering it by subtraction (``S_later - kv``, or
``S_total - suffix``) cancels badly in fp32, so each row's state is recomputed from the chunk
start instead: a SUB_BLOCK-row sub-block's start by one masked product over the chunk's earlier
rows, then the row's by one masked product over its sub-block. dq and dk sum over d_v, so each
d_v block writes its part and the wrapper adds them (deterministic, no atomics). With psi =
identity (c) is tile products again.
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


def _launch_args(
    fq: Tensor, v: Tensor, states: Tensor, dv_block: int
) -> tuple[tuple[int, int, int], tuple[int, ...], dict[str, int]]:
    """The grid, strides and sizes every per-chunk kernel takes (forward and backward alike)."""
    (slots, H), dk, dv = states.shape[:2], fq.shape[2], v.shape[2]
    grid = (slots, H, triton.cdiv(dv, dv_block))
    strides = (fq.stride(0), fq.stride(1), v.stride(0), v.stride(1), *states.stride()[:3])
    dims = {"DK": dk, "DV": dv, "BLOCK_DK": _pad(dk), "DV_BLOCK": dv_block, "BLOCK_T": BLOCK}
    return grid, strides, dims


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
        grid, strides, dims = _launch_args(fq, v, states, dv_block)
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
        grid, strides, dims = _launch_args(fq, v, states, dv_block)
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
