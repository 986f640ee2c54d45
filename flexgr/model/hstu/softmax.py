"""Softmax attention inside the HSTU layer: the HSTU paper's "HSTU w/ softmax" ablation.

Table 2 (synthetic streaming data) and Table 5 of the paper compare HSTU with a variant whose
pointwise ``silu(s) / N`` is replaced by a row softmax, everything else (U gating, the
LayerNorm of the pooled values, the output projection) unchanged:

    out_i = sum_j softmax_j(alpha * q_i . k_j + rab_ij | mask_ij) v_j

over the keys the same mask allows (a row with no allowed key gives 0). ``N`` plays no part.
Two implementations: a dense one on the padded batch (any device; the oracle) and
FlexAttention on CUDA over the batch's BlockMask (its native softmax). FlexAttention's own
backward does not compile for the bias gathers on torch 2.11 (docs/attention.md), so with a
relative bias the dense path is used on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_mask

from flexgr.masks.block import HSTUMask
from flexgr.masks.dense import dense_hstu_mask
from flexgr.ops.jagged import lengths_of, to_jagged, to_padded
from flexgr.ops.rab import RelativeBias, dense_bias, time_bucket


def masked_softmax(s: Tensor, keep: Tensor) -> Tensor:
    """Row softmax of ``s`` over the ``keep`` entries of its last dim; all-masked rows give 0."""
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.where(keep.any(dim=-1, keepdim=True), p, torch.zeros_like(p))


def softmax_attention_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    *,
    alpha: float,
    mask: HSTUMask | None,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    rab: RelativeBias | None = None,
) -> Tensor:
    """[T, H, Dv] in v's dtype. The built-in rule (``mask`` None or with a spec) on the padded
    batch; a custom mask_mod (``mask.spec`` None) or semi-local attention on the dense [T, T]
    grid (small inputs)."""
    if mask is not None and (mask.spec is None or mask.spec.semi_local):
        T = q.shape[0]
        P = mask.padded_len
        keep_TT = create_mask(mask.mask_mod, 1, 1, P, P, device=q.device)[0, 0, :T, :T]
        s_HTT = torch.einsum("nhd,mhd->hnm", q, k) * alpha
        if rab is not None:
            s_HTT = s_HTT + _flat_bias(rab, mask, T).to(s_HTT.dtype)
        return torch.einsum("hnm,mhd->nhd", masked_softmax(s_HTT, keep_TT), v)
    T = q.shape[0]
    lengths = lengths_of(offsets)
    max_len = max(int(lengths.max()) if lengths.numel() else 0, 1)
    q_BNHD, k_BNHD, v_BNHD = (to_padded(x, offsets, max_len) for x in (q, k, v))
    s_BHNN = torch.einsum("bnhd,bmhd->bhnm", q_BNHD, k_BNHD) * alpha
    if rab is not None:
        s_BHNN = s_BHNN + dense_bias(rab, offsets, max_len).unsqueeze(1).to(s_BHNN.dtype)
    keep_BNN = dense_hstu_mask(
        lengths, max_len, num_targets=num_targets, contextual_len=contextual_len,
        max_attn_len=max_attn_len, full_attn_tail=full_attn_tail,
    )
    p_BHNN = masked_softmax(s_BHNN, keep_BNN.unsqueeze(1))
    return to_jagged(torch.einsum("bhnm,bmhd->bnhd", p_BHNN, v_BNHD), offsets, T)


def _flat_bias(rab: RelativeBias, mask: HSTUMask, T: int) -> Tensor:
    local = rab.positions.long() if rab.positions is not None else mask.layout.local[:T].long()
    N = rab.max_len
    rel = (N - 1 + local.view(1, -1) - local.view(-1, 1)).clamp(0, 2 * N - 2)
    dt = rab.next_timestamps.long().view(-1, 1) - rab.timestamps.long().view(1, -1)
    return rab.pos_w[rel] + rab.ts_w[time_bucket(dt, rab.num_buckets, rab.bucket_divisor)]


def softmax_attention_flex(
    q: Tensor, k: Tensor, v: Tensor, mask: HSTUMask, *, alpha: float
) -> Tensor:
    """FlexAttention's softmax over the batch's BlockMask (no bias), [T, H, Dv]."""
    from flexgr.ops.flex import _flex

    T, P = q.shape[0], mask.padded_len

    def to_flex(x: Tensor) -> Tensor:  # [T, H, D] -> [1, H, P, D]
        return F.pad(x, (0, 0, 0, 0, 0, P - T)).transpose(0, 1).unsqueeze(0)

    flex = _flex(q.device)
    out = flex(to_flex(q), to_flex(k), to_flex(v), block_mask=mask.block_mask, scale=alpha)
    return out[0].transpose(0, 1)[:T].to(v.dtype)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    *,
    alpha: float,
    mask: HSTUMask | None,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    rab: RelativeBias | None = None,
) -> Tensor:
    """Flex on CUDA when a BlockMask exists and there is no bias; the dense path otherwise."""
    if q.device.type == "cuda" and mask is not None and rab is None:
        return softmax_attention_flex(q, k, v, mask, alpha=alpha)
    return softmax_attention_dense(
        q, k, v, offsets, alpha=alpha, mask=mask, num_targets=num_targets,
        contextual_len=contextual_len, max_attn_len=max_attn_len, full_attn_tail=full_attn_tail,
        rab=rab,
    )
