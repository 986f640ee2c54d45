"""Dense [B, N, N] HSTU masks on a padded batch: the oracle the reference backend uses.

A direct, vectorised statement of the reference HSTU rule, independent of the mask_mod code.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_hstu_mask(
    lengths: Tensor,
    max_len: int,
    *,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
) -> Tensor:
    """Boolean [B, N, N]: row i of sequence b may attend column j. Rows/columns >= length are False."""
    device = lengths.device
    lengths = lengths.to(torch.int64)
    B = lengths.numel()
    idx = torch.arange(max_len, device=device).view(1, max_len)
    ids = idx.expand(B, max_len)
    max_ids = lengths.view(B, 1)
    if contextual_len > 0:
        ids = (ids - contextual_len + 1).clamp(min=0)
        max_ids = max_ids - contextual_len + 1
    if num_targets is not None:
        max_ids = max_ids - num_targets.to(device, torch.int64).view(B, 1)
        ids = torch.minimum(ids, max_ids)
    row = ids.unsqueeze(2)
    col = ids.unsqueeze(1)
    dist = row - col
    eye = torch.eye(max_len, dtype=torch.bool, device=device).unsqueeze(0)
    valid = eye | (dist > 0)
    if max_attn_len > 0:
        near = dist <= max_attn_len
        if full_attn_tail > 0:
            near = near | (row >= max_ids.unsqueeze(2) - full_attn_tail)
        valid = valid & near
    if contextual_len > 0:
        valid = valid | ((row == 0) & (col < max_ids.unsqueeze(2)))
    inside = idx < lengths.view(B, 1)
    return valid & inside.unsqueeze(2) & inside.unsqueeze(1)
