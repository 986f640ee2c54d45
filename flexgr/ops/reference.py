"""Dense eager HSTU attention on a padded batch: the oracle every fast path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_mask

from flexgr.masks.block import HSTUMask
from flexgr.masks.dense import dense_hstu_mask
from flexgr.ops.jagged import lengths_of, to_jagged, to_padded
from flexgr.ops.rab import RelativeBias, dense_bias, time_bucket


def hstu_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    rab: RelativeBias | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Computed in the inputs' dtype: pass float64 inputs for an fp64 oracle."""
    T = q.shape[0]
    lengths = lengths_of(offsets)
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    max_len = max(max_len, 1)
    q_BNHD = to_padded(q, offsets, max_len)
    k_BNHD = to_padded(k, offsets, max_len)
    v_BNHD = to_padded(v, offsets, max_len)
    s_BHNN = torch.einsum("bnhd,bmhd->bhnm", q_BNHD, k_BNHD) * alpha
    if rab is not None:
        s_BHNN = s_BHNN + dense_bias(rab, offsets, max_len).unsqueeze(1).to(s_BHNN.dtype)
    mask_BNN = dense_hstu_mask(
        lengths,
        max_len,
        num_targets=num_targets,
        contextual_len=contextual_len,
        max_attn_len=max_attn_len,
        full_attn_tail=full_attn_tail,
    )
    p_BHNN = F.silu(s_BHNN) * mask_BNN.unsqueeze(1).to(s_BHNN.dtype) / max_seq_len
    o_BNHD = torch.einsum("bhnm,bmhd->bnhd", p_BHNN, v_BNHD)
    return to_jagged(o_BNHD, offsets, T)


def hstu_attention_custom_mask(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: HSTUMask,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
) -> Tensor:
    """Dense [T, T] oracle for an arbitrary mask_mod (small inputs only: O(T^2) memory)."""
    T = q.shape[0]
    P = mask.padded_len
    keep_TT = create_mask(mask.mask_mod, 1, 1, P, P, device=q.device)[0, 0, :T, :T]
    s_HTT = torch.einsum("nhd,mhd->hnm", q, k) * alpha
    if rab is not None:
        local = rab.positions.long() if rab.positions is not None else mask.layout.local[:T].long()
        N = rab.max_len
        rel = (N - 1 + local.view(1, -1) - local.view(-1, 1)).clamp(0, 2 * N - 2)
        dt = rab.next_timestamps.long().view(-1, 1) - rab.timestamps.long().view(1, -1)
        bias = rab.pos_w[rel] + rab.ts_w[time_bucket(dt, rab.num_buckets, rab.bucket_divisor)]
        s_HTT = s_HTT + bias.to(s_HTT.dtype)
    p_HTT = F.silu(s_HTT) * keep_TT.to(s_HTT.dtype) / max_seq_len
    return torch.einsum("hnm,mhd->nhd", p_HTT, v)
