"""VISTA's quasi-linear attention (QLA) over packed (jagged) sequences: the eager reference.

A sequence's history rows attend causally through a per-head ``d_k x d_v`` state, so the cost is
linear in the history length; its candidates (the last ``num_targets`` rows) read the whole
history's state and add only their own diagonal term, so they never see each other:

    S_i   = (1 / N) * sum_{j <= i, j history} phi(k_j)^T v_j              [H, dk, dv]
    o_i   = phi(q_i) . psi(S_i)                                           history row i
    o_t   = phi(q_t) . psi(S_last) + (1 / N) * (phi(q_t) . phi(k_t)) v_t     candidate t

phi = SiLU (the paper's feature map), psi = SiLU on the state (the digest's
``phi(Q) . phi(phi(K)^T V)``) or the identity (plain causal linear attention), and N a constant
divisor like HSTU's (the batch's or config's maximum length, never the row length), because the
paper's RowNormalize term is not known. docs/vista.md gives the reasons.

The state is a cumulative sum over the whole packed batch minus each sequence's starting prefix:
no padding and no host sync, at the price of materialising ``[T, H, dk, dv]``. The Triton
kernels in ``flexgr/vista/qla_triton.py`` (``impl="triton"``) keep the state on chip instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flexgr.masks.layout import seq_ids_and_local
from flexgr.ops.triton_backend import available as triton_available

StateActivation = Literal["silu", "identity"]
FeatureMap = Literal["silu", "identity"]
Impl = Literal["auto", "eager", "triton"]


def _check(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, num_targets: Tensor | None, divisor: float
) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"qla: q, k must be [T, H, dk] and v [T, H, dv], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"qla: offsets must be [B + 1], got {tuple(offsets.shape)}")
    if num_targets is not None and num_targets.shape != (offsets.numel() - 1,):
        raise ValueError(
            f"qla: num_targets must be [B] = [{offsets.numel() - 1}], got {tuple(num_targets.shape)}"
        )
    if divisor <= 0:
        raise ValueError(f"qla: divisor must be > 0, got {divisor}")


def _state_fn(activation: str, name: str = "state_activation"):
    if activation == "silu":
        return F.silu
    if activation == "identity":
        return lambda s: s
    raise ValueError(f"qla: {name} must be 'silu' or 'identity', got {activation!r}")


def candidate_rows(offsets: Tensor, num_targets: Tensor | None, total_len: int) -> Tensor:
    """[T] bool: the token is one of the last ``num_targets[b]`` tokens of its sequence."""
    if num_targets is None:
        return torch.zeros(total_len, dtype=torch.bool, device=offsets.device)
    seq, local = seq_ids_and_local(offsets.to(torch.int64), total_len)
    seq, local = seq.long(), local.long()
    lengths = (offsets[1:] - offsets[:-1]).to(torch.int64)
    return local >= (lengths - num_targets.to(lengths))[seq]


def qla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    *,
    divisor: float,
    num_targets: Tensor | None = None,
    state_activation: StateActivation = "silu",
    feature_map: FeatureMap = "silu",
    impl: Impl = "auto",
) -> Tensor:
    """Quasi-linear attention: q, k [T, H, dk], v [T, H, dv], offsets [B + 1] -> [T, H, dv] in
    v's dtype (accumulated in fp32, or fp64 for fp64 inputs). ``feature_map="identity"`` takes
    q and k as already mapped (an HSTU layer's projections are SiLU'd before attention).
    ``impl``: "eager" (cumulative sums), "triton" (``flexgr.vista.qla_triton``, the state on
    chip) or "auto" (the default: triton on CUDA, eager otherwise). On the H200 the kernels
    matched eager within 5e-6 (fp32, forward and the three gradients, lengths 1-4096) and ran
    forward + backward in 3.39 ms against eager's 10.24 (docs/vista.md)."""
    _check(q, k, v, offsets, num_targets, divisor)
    psi = _state_fn(state_activation)
    phi = _state_fn(feature_map, "feature_map")
    if impl not in ("auto", "eager", "triton"):
        raise ValueError(f"qla: impl must be 'auto', 'eager' or 'triton', got {impl!r}")
    T = q.shape[0]
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    fq, fk, vv = phi(q.to(acc)), phi(k.to(acc)), v.to(acc)
    if impl == "triton" or (impl == "auto" and q.is_cuda and triton_available(q.device)):
        from flexgr.vista.qla_triton import qla_core_triton

        core = qla_core_triton(
            fq, fk, vv, offsets, num_targets, divisor=divisor,
            psi_silu=state_activation == "silu",
        )  # fmt: skip
        return core.to(v.dtype)
    is_cand = candidate_rows(offsets, num_targets, T)
    history = (~is_cand).to(acc).view(T, 1, 1, 1)
    # Candidates add nothing to the state, so a candidate's inclusive prefix is its history's.
    kv_THKV = fk.unsqueeze(-1) * vv.unsqueeze(-2) * history / divisor
    prefix = torch.cat([kv_THKV.new_zeros((1, *kv_THKV.shape[1:])), kv_THKV.cumsum(0)])
    seq, _ = seq_ids_and_local(offsets.to(torch.int64), T)
    start = offsets.to(torch.int64)[seq.long()]
    state_THKV = prefix[1:] - prefix[start]
    out = torch.einsum("thk,thkv->thv", fq, psi(state_THKV))
    self_term = (fq * fk).sum(-1, keepdim=True) * vv / divisor
    out = out + self_term * is_cand.to(acc).view(T, 1, 1)
    return out.to(v.dtype)
