"""Delta-query attention: a few candidate rows against a cached history's keys and values.

M-FALCON's candidate step (``flexgr.model.hstu.falcon._CachedAttention``): every candidate
sees all L cached history tokens and itself, never another candidate, so there is no mask;
the relative bias of a candidate toward history token j is one row shared by all candidates
and heads (built with the cache). For candidate m and head h::

    out[m, h] = (sum_j silu(alpha q.K_j + row_j) V_j + silu(alpha q.k_m + row_L) v_m) / N

One program per (head, BLOCK_M candidates) walks the cache in BLOCK_N key tiles; scores stay
in fp32 (the eager step rounds them to the model dtype between its batched matmuls), and the
kernel replaces the step's ~6 launches per layer with one. Inference only (no backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from flexgr.ops.triton_hstu.rules import silu


@triton.jit
def delta_query_kernel(
    Q, K, V, KeysT, Values, Row, Out,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
    stride_th, stride_td, stride_vah, stride_val,
    M, L, alpha, out_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < M
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(Q + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        k_t = tl.load(KeysT + head * stride_th + offs_d[:, None] * stride_td + offs_n[None, :],
                      mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * alpha
        if HAS_ROW:
            s += tl.load(Row + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        p = tl.where(n_ok[None, :], silu(s, False), 0.0)
        v = tl.load(Values + head * stride_vah + offs_n[:, None] * stride_val + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    # The candidate's own key and value: one elementwise term per row.
    k_own = tl.load(K + head * stride_kh + offs_m[:, None] * stride_km + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    s_own = tl.sum(q.to(tl.float32) * k_own.to(tl.float32), axis=1) * alpha
    if HAS_ROW:
        s_own += tl.load(Row + L).to(tl.float32)
    v_own = tl.load(V + head * stride_vh + offs_m[:, None] * stride_vm + offs_dv[None, :],
                    mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    acc += silu(s_own, False)[:, None] * v_own.to(tl.float32)
    tl.store(Out + head * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
             (acc * out_scale).to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


def _block(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def delta_query_attention(
    q_MHD: Tensor, k_MHD: Tensor, v_MHD: Tensor, keys_HDL: Tensor, values_HLD: Tensor,
    row: Tensor | None, *, alpha: float, max_seq_len: int,
) -> Tensor:
    """[M, H, Dv] in v's dtype: each candidate row over the cached ``keys_HDL`` [H, Dqk, L] and
    ``values_HLD`` [H, L, Dv] plus its own key and value, with the bias ``row`` [L + 1] (None:
    no bias), divided by ``max_seq_len``. Last dims must be contiguous."""
    M, H, D = q_MHD.shape
    L, DV = values_HLD.shape[1], values_HLD.shape[2]
    for name, t in (("q", q_MHD), ("k", k_MHD), ("v", v_MHD), ("keys", keys_HDL),
                    ("values", values_HLD)):
        if t.stride(-1) != 1:
            raise ValueError(f"delta_query_attention: {name}'s last dim must be contiguous")
    out = torch.empty((M, H, DV), dtype=v_MHD.dtype, device=v_MHD.device)
    if M == 0:
        return out
    interpret = not q_MHD.is_cuda
    block_m = 16 if interpret else (16 if M <= 16 else 64)
    block_n = 16 if interpret else 64
    row_ = row if row is not None else q_MHD  # never read without HAS_ROW
    grid = (H, triton.cdiv(M, block_m))
    delta_query_kernel[grid](
        q_MHD, k_MHD, v_MHD, keys_HDL, values_HLD, row_, out,
        q_MHD.stride(0), q_MHD.stride(1), k_MHD.stride(0), k_MHD.stride(1),
        v_MHD.stride(0), v_MHD.stride(1), out.stride(0), out.stride(1),
        keys_HDL.stride(0), keys_HDL.stride(1), values_HLD.stride(0), values_HLD.stride(1),
        M, L, float(alpha), 1.0 / max_seq_len,
        D=D, DV=DV, BLOCK_D=_block(D), BLOCK_DV=_block(DV), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_ROW=row is not None,
        DOT_PRECISION="ieee" if q_MHD.dtype in (torch.float32, torch.float64) else "tf32",
        num_warps=4, num_stages=2,
    )
    return out
