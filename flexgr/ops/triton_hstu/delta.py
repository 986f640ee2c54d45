"""Delta-query attention: a few candidate rows against a cached history's keys and values.

M-FALCON's candidate step (``flexgr.model.hstu.falcon._CachedAttention``): every candidate
sees all L cached history tokens and itself, never another candidate, so there is no mask;
the relative bias of a candidate toward history token j is one row shared by all candidates
and heads (built with the cache). For candidate m and head h::

    out[m, h] = (sum_j silu(alpha q.K_j + row_j) V_j + silu(alpha q.k_m + row_L) v_m) / N

One program per (head, BLOCK_M candidates, key split) walks its split of the cache in BLOCK_N
key tiles; scores stay in fp32 (the eager step rounds them to the model dtype between its
batched matmuls). The attention is pointwise (no softmax), so the splits' partial sums simply
add: with more than one split each program writes its fp32 partial and torch sums them (split 0
adds the candidate's own term). Without splits the grid was 4 heads x 4 candidate tiles at
b_m = 256, 16 programs for the H200's 132 SMs, each walking all 8,192 cached keys, and the
kernel lost to the batched matmuls inside a CUDA graph (BENCHMARKS.md "The delta-query
kernel"). Inference only (no backward).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from flexgr.ops.triton_hstu.rules import silu


@triton.jit
def delta_query_kernel(
    Q, K, V, KeysT, Values, Row, Out,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
    stride_os, stride_th, stride_td, stride_vah, stride_val,
    M, L, keys_per_split, alpha, out_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PARTIAL: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < M
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(Q + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    first = split * keys_per_split  # keys_per_split is a multiple of BLOCK_N
    for start in range(first, tl.minimum(L, first + keys_per_split), BLOCK_N):
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
    if split == 0:  # the candidate's own key and value: one elementwise term per row
        k_own = tl.load(K + head * stride_kh + offs_m[:, None] * stride_km + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        s_own = tl.sum(q.to(tl.float32) * k_own.to(tl.float32), axis=1) * alpha
        if HAS_ROW:
            s_own += tl.load(Row + L).to(tl.float32)
        v_own = tl.load(V + head * stride_vh + offs_m[:, None] * stride_vm + offs_dv[None, :],
                        mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        acc += silu(s_own, False)[:, None] * v_own.to(tl.float32)
    out_ptrs = (Out + split.to(tl.int64) * stride_os + head * stride_oh
                + offs_m[:, None] * stride_om + offs_dv[None, :])
    out_ok = row_ok[:, None] & dv_ok[None, :]
    if PARTIAL:  # fp32 partial of this split, summed and scaled by the caller
        tl.store(out_ptrs, acc, mask=out_ok)
    else:
        tl.store(out_ptrs, (acc * out_scale).to(Out.dtype.element_ty), mask=out_ok)


def _block(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def key_splits_for(M: int, H: int, L: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Splits of the cached keys that give about two programs per SM, each split at least
    four key tiles long (shorter ones spend more on the partials than they save)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    programs = H * triton.cdiv(M, block_m)
    most = max(1, triton.cdiv(L, 4 * block_n))
    return max(1, min(most, triton.cdiv(2 * sms, programs)))


def delta_query_attention(
    q_MHD: Tensor, k_MHD: Tensor, v_MHD: Tensor, keys_HDL: Tensor, values_HLD: Tensor,
    row: Tensor | None, *, alpha: float, max_seq_len: int, key_splits: int | None = None,
) -> Tensor:
    """[M, H, Dv] in v's dtype: each candidate row over the cached ``keys_HDL`` [H, Dqk, L] and
    ``values_HLD`` [H, L, Dv] plus its own key and value, with the bias ``row`` [L + 1] (None:
    no bias), divided by ``max_seq_len``. Last dims must be contiguous. ``key_splits``: how
    many programs share one candidate tile's keys (None: chosen from the GPU's SM count; 1 on
    the CPU interpreter)."""
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
    if key_splits is None:
        key_splits = key_splits_for(M, H, L, block_m, block_n, q_MHD.device)
    if key_splits < 1:
        raise ValueError(f"delta_query_attention: key_splits must be >= 1, got {key_splits}")
    keys_per_split = max(block_n, triton.cdiv(triton.cdiv(L, key_splits), block_n) * block_n)
    splits = max(1, triton.cdiv(L, keys_per_split))  # the rounding may leave fewer, none empty
    partial = splits > 1
    target = (torch.empty((splits, M, H, DV), dtype=torch.float32, device=v_MHD.device)
              if partial else out[None])
    row_ = row if row is not None else q_MHD  # never read without HAS_ROW
    grid = (H, triton.cdiv(M, block_m), splits)
    delta_query_kernel[grid](
        q_MHD, k_MHD, v_MHD, keys_HDL, values_HLD, row_, target,
        q_MHD.stride(0), q_MHD.stride(1), k_MHD.stride(0), k_MHD.stride(1),
        v_MHD.stride(0), v_MHD.stride(1), target.stride(1), target.stride(2), target.stride(0),
        keys_HDL.stride(0), keys_HDL.stride(1), values_HLD.stride(0), values_HLD.stride(1),
        M, L, keys_per_split, float(alpha), 1.0 / max_seq_len,
        D=D, DV=DV, BLOCK_D=_block(D), BLOCK_DV=_block(DV), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_ROW=row is not None,
        DOT_PRECISION="ieee" if q_MHD.dtype in (torch.float32, torch.float64) else "tf32",
        PARTIAL=partial, num_warps=4, num_stages=2,
    )
    if partial:
        out.copy_(target.sum(0).mul_(1.0 / max_seq_len))
    return out
