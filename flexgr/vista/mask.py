"""The summariser's mask over packed ``[seeds; history]`` segments, as a FlexAttention mask_mod.

Each user's segment is its S seed tokens followed by its history. A seed row sees every token
of its own segment (the other seeds and the whole history); a history row sees only the history
rows at or before it, never a seed. History rows must not see seeds: a seed has read the whole
history one layer earlier, so through it a history row would see its future.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexgr.masks.layout import seq_ids_and_local
from flexgr.masks.mods import MaskMod


def packed_offsets(offsets: Tensor, num_seeds: int) -> Tensor:
    """Offsets [B + 1] of the packed segments: user b's history offsets shifted by S per user."""
    B = offsets.numel() - 1
    return offsets.to(torch.int64) + num_seeds * torch.arange(B + 1, device=offsets.device)


def seed_flags(
    offsets: Tensor, num_seeds: int, padded_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """(seq_id [L] int64, is_seed [L] bool) of every packed token (P = T + B S tokens, L =
    ``padded_len`` >= P rows or P; rows past P hold seq_id -1, not seeds)."""
    packed = packed_offsets(offsets, num_seeds)
    P = int(offsets[-1]) + num_seeds * (offsets.numel() - 1)
    seq, local = seq_ids_and_local(packed, P, padded_len)
    return seq.long(), (local.long() < num_seeds) & (seq >= 0)


def seed_summary_mask(offsets: Tensor, num_seeds: int, padded_len: int | None = None) -> MaskMod:
    """mask_mod over global packed indices: same segment and (the query is a seed, or both are
    history and the key is not after the query). ``offsets`` are the histories' [B + 1].
    ``padded_len``: the tables' length (the block mask's padded length, so that on CUDA
    flex_attention's compiled code, which guards on the tables' shapes, serves every batch of
    one bucket)."""
    seq, is_seed = seed_flags(offsets, num_seeds, padded_len)

    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        same = (seq[q] == seq[kv]) & (seq[q] >= 0)  # padding rows (seq -1) see nothing
        return same & (is_seed[q] | (~is_seed[kv] & (kv <= q)))

    mask.__name__ = mask.__qualname__ = f"vista_seeds_{num_seeds}"
    return mask


def dense_seed_mask(lengths: Tensor, num_seeds: int, max_len: int) -> Tensor:
    """[B, N, N] bool over each padded segment ``[seeds; history]`` (N = ``max_len`` >= the
    longest segment): the same rule as :func:`seed_summary_mask`, one segment at a time, so the
    CPU path costs B N^2 instead of the packed batch's P^2."""
    S, device = num_seeds, lengths.device
    idx = torch.arange(max_len, device=device)
    q, k = idx.view(-1, 1), idx.view(1, -1)
    rule = (q < S) | ((k >= S) & (k <= q))  # [N, N]
    inside = idx.view(1, -1) < (lengths.to(torch.int64) + S).view(-1, 1)  # [B, N]
    return rule.unsqueeze(0) & inside.unsqueeze(2) & inside.unsqueeze(1)
