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
import triton.language as tl
from torch import Tensor

BLOCK = 16  # rows per chunk: the interpreter-tested tile; d_k, d_v pad to powers of two >= 16


@triton.jit
def _psi(s, PSI_SILU: tl.constexpr):
    if PSI_SILU:
        return s / (1.0 + tl.exp(-s))
    return s


@triton.jit
def _load_chunk(ptr, rows, row_ok, cols, D: tl.constexpr, stride_t):
    mask = row_ok[:, None] & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _sequence_bounds(Offsets, NumTargets, ChunkOffsets, b):
    """Sequence b's first row, end, first candidate row and first saved-state chunk (int64)."""
    start = tl.load(Offsets + b).to(tl.int64)
    end = tl.load(Offsets + b + 1).to(tl.int64)
    hist_end = tl.maximum(end - tl.load(NumTargets + b).to(tl.int64), start)
    chunk0 = tl.load(ChunkOffsets + b).to(tl.int64)
    return start, end, hist_end, chunk0


@triton.jit
def _qla_fwd(
    Q, K, V, O, Offsets, NumTargets, ChunkOffsets, States,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_sc, stride_sh, Scale, H,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, PSI_SILU: tl.constexpr, SAVE_STATES: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    start, end, hist_end, chunk0 = _sequence_bounds(Offsets, NumTargets, ChunkOffsets, b)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_T)
    q_ptr, k_ptr = Q + h * stride_qh, K + h * stride_kh
    v_ptr, o_ptr = V + h * stride_vh, O + h * stride_oh
    dt = Q.dtype.element_ty
    scale = tl.load(Scale)  # a tensor in Q's dtype: a float argument would be fp32
    state = tl.zeros((BLOCK_DK, BLOCK_DV), dtype=dt)
    num_chunks = tl.cdiv(end - start, BLOCK_T)
    for c in range(num_chunks):
        rows = start + c * BLOCK_T + offs_t
        row_ok = rows < end
        if SAVE_STATES:
            s_ptr = States + (chunk0 + c) * stride_sc + h * stride_sh
            tl.store(s_ptr + offs_dk[:, None] * BLOCK_DV + offs_dv[None, :], state)
        q = _load_chunk(q_ptr, rows, row_ok, offs_dk, DK, stride_qt)
        k = _load_chunk(k_ptr, rows, row_ok, offs_dk, DK, stride_kt)
        v = _load_chunk(v_ptr, rows, row_ok, offs_dv, DV, stride_vt)
        is_hist = row_ok & (rows < hist_end)
        is_cand = row_ok & (rows >= hist_end)
        kh = tl.where(is_hist[:, None], k, 0.0) * scale  # candidates add nothing to the state
        if PSI_SILU:
            kv = kh[:, :, None] * v[:, None, :]  # [BLOCK_T, BLOCK_DK, BLOCK_DV]
            prefix = state[None, :, :] + tl.cumsum(kv, axis=0)
            out = tl.sum(q[:, :, None] * _psi(prefix, PSI_SILU), axis=1)
            state += tl.sum(kv, axis=0)
        else:
            causal = offs_t[:, None] >= offs_t[None, :]
            qk = tl.where(causal, tl.dot(q, tl.trans(kh), input_precision="ieee"), 0.0)
            out = tl.dot(q, state, input_precision="ieee")
            out += tl.dot(qk.to(dt), v, input_precision="ieee")
            state += tl.dot(tl.trans(kh), v, input_precision="ieee")
        diag = tl.sum(q * k, axis=1) * scale
        out += tl.where(is_cand, diag, 0.0)[:, None] * v
        o_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
        tl.store(o_ptr + rows[:, None] * stride_ot + offs_dv[None, :], out, mask=o_mask)


@triton.jit
def _qla_bwd(
    Q, K, V, DO, DQ, DK_, DV_, Offsets, NumTargets, ChunkOffsets, States,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_sc, stride_sh, Scale, H,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, PSI_SILU: tl.constexpr,
):  # fmt: skip
    # DQ, DK_ share q's strides and DV_ v's: the wrapper allocates them like q and v.
    b = tl.program_id(0)
    h = tl.program_id(1)
    start, end, hist_end, chunk0 = _sequence_bounds(Offsets, NumTargets, ChunkOffsets, b)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_T)
    dt = Q.dtype.element_ty
    scale = tl.load(Scale)
    grad_later = tl.zeros((BLOCK_DK, BLOCK_DV), dtype=dt)  # G: sum of dS over later chunks
    num_chunks = tl.cdiv(end - start, BLOCK_T)
    for rc in range(num_chunks):
        c = num_chunks - 1 - rc
        rows = start + c * BLOCK_T + offs_t
        row_ok = rows < end
        s_ptr = States + (chunk0 + c) * stride_sc + h * stride_sh
        state = tl.load(s_ptr + offs_dk[:, None] * BLOCK_DV + offs_dv[None, :])
        q = _load_chunk(Q + h * stride_qh, rows, row_ok, offs_dk, DK, stride_qt)
        k = _load_chunk(K + h * stride_kh, rows, row_ok, offs_dk, DK, stride_kt)
        v = _load_chunk(V + h * stride_vh, rows, row_ok, offs_dv, DV, stride_vt)
        do = _load_chunk(DO + h * stride_doh, rows, row_ok, offs_dv, DV, stride_dot)
        is_hist = row_ok & (rows < hist_end)
        is_cand = row_ok & (rows >= hist_end)
        hist_scale = tl.where(is_hist, scale, tl.zeros_like(scale))[:, None]
        kh = k * hist_scale
        if PSI_SILU:
            kv = kh[:, :, None] * v[:, None, :]
            prefix = state[None, :, :] + tl.cumsum(kv, axis=0)
            sig = 1.0 / (1.0 + tl.exp(-prefix))
            dq = tl.sum((prefix * sig) * do[:, None, :], axis=2)
            ds = q[:, :, None] * do[:, None, :] * (sig * (1.0 + prefix * (1.0 - sig)))
            g_rows = grad_later[None, :, :] + tl.cumsum(ds, axis=0, reverse=True)
            dk = tl.sum(g_rows * v[:, None, :], axis=2) * hist_scale
            dv = tl.sum(g_rows * kh[:, :, None], axis=1)
            grad_later += tl.sum(ds, axis=0)
        else:
            causal = offs_t[:, None] >= offs_t[None, :]  # [i, j]: row i reads row j
            dov = tl.where(causal, tl.dot(do, tl.trans(v), input_precision="ieee"), 0.0)
            dq = tl.dot(do, tl.trans(state), input_precision="ieee")
            dq += tl.dot(dov.to(dt), kh, input_precision="ieee")
            dk = tl.dot(v, tl.trans(grad_later), input_precision="ieee")
            dk += tl.dot(tl.trans(dov).to(dt), q, input_precision="ieee")
            dk = dk * hist_scale
            qk = tl.where(causal, tl.dot(q, tl.trans(kh), input_precision="ieee"), 0.0)
            dv = tl.dot(kh, grad_later, input_precision="ieee")
            dv += tl.dot(tl.trans(qk).to(dt), do, input_precision="ieee")
            grad_later += tl.dot(tl.trans(q), do, input_precision="ieee")
        vdo_diag = tl.where(is_cand, tl.sum(v * do, axis=1) * scale, 0.0)[:, None]
        qk_diag = tl.where(is_cand, tl.sum(q * k, axis=1) * scale, 0.0)[:, None]
        dq += vdo_diag * k
        dk += vdo_diag * q
        dv += qk_diag * do
        mk = row_ok[:, None] & (offs_dk[None, :] < DK)
        mv = row_ok[:, None] & (offs_dv[None, :] < DV)
        q_off = h * stride_qh + rows[:, None] * stride_qt + offs_dk[None, :]
        tl.store(DQ + q_off, dq, mask=mk)
        tl.store(DK_ + q_off, dk, mask=mk)
        tl.store(DV_ + h * stride_vh + rows[:, None] * stride_vt + offs_dv[None, :], dv, mask=mv)


def _alloc(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Uninitialised kernel outputs (one place, so tests can poison them with NaN)."""
    return like.new_empty(shape)


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _chunk_offsets(offsets: Tensor) -> Tensor:
    """[B + 1]: each sequence's first chunk in the saved-state buffer (on device, no sync)."""
    lengths = offsets[1:] - offsets[:-1]
    chunks = torch.div(lengths + BLOCK - 1, BLOCK, rounding_mode="floor")
    return torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])


class _QLACore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fq, fk, v, offsets, num_targets, scale, psi_silu):  # type: ignore[override]
        T, H, dk = fq.shape
        dv = v.shape[2]
        B = offsets.numel() - 1
        first = _chunk_offsets(offsets)
        save = any(t.requires_grad for t in (fq, fk, v))
        # Each sequence has at most len / BLOCK + 1 chunks: T // BLOCK + B bounds the total.
        states = _alloc(fq, (T // BLOCK + B + 1 if save else 1, H, _pad(dk), _pad(dv)))
        out = _alloc(v, (T, H, dv))
        if T > 0 and B > 0:
            _qla_fwd[(B, H)](
                fq, fk, v, out, offsets, num_targets, first, states,
                fq.stride(0), fq.stride(1), fk.stride(0), fk.stride(1),
                v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                states.stride(0), states.stride(1), fq.new_full((1,), scale), H,
                DK=dk, DV=dv, BLOCK_DK=_pad(dk), BLOCK_DV=_pad(dv), BLOCK_T=BLOCK,
                PSI_SILU=psi_silu, SAVE_STATES=save,
            )  # fmt: skip
        ctx.save_for_backward(fq, fk, v, offsets, num_targets, first, states)
        ctx.scale, ctx.psi_silu = scale, psi_silu
        return out

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        fq, fk, v, offsets, num_targets, first, states = ctx.saved_tensors
        do = do.contiguous()
        T, H, dk = fq.shape
        dv = v.shape[2]
        B = offsets.numel() - 1
        dq, dkk, dvv = _alloc(fq, fq.shape), _alloc(fk, fk.shape), _alloc(v, v.shape)
        if T > 0 and B > 0:
            _qla_bwd[(B, H)](
                fq, fk, v, do, dq, dkk, dvv, offsets, num_targets, first, states,
                fq.stride(0), fq.stride(1), fk.stride(0), fk.stride(1),
                v.stride(0), v.stride(1), do.stride(0), do.stride(1),
                states.stride(0), states.stride(1), fq.new_full((1,), ctx.scale), H,
                DK=dk, DV=dv, BLOCK_DK=_pad(dk), BLOCK_DV=_pad(dv), BLOCK_T=BLOCK,
                PSI_SILU=ctx.psi_silu,
            )  # fmt: skip
        return dq, dkk, dvv, None, None, None, None


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
