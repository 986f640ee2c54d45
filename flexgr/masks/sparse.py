"""A BlockMask for jagged masks without torch.compile.

A mask that includes ``jagged`` lets a query block see only key blocks that share a sequence with
it: a contiguous band of blocks around the diagonal. Evaluating the mask_mod on those block pairs
alone costs O(sum of per-sequence pairs) memory and time instead of ``create_block_mask``'s
O(T^2) eager tensors, and it needs no compilation. The compiled ``create_block_mask`` recompiles
for every new packed length, and on the H100 test machine training runs stalled inside those
compiles (docs/attention.md), so built-in HSTU masks are built here on every device.

Only for mask_mods that imply ``jagged``: a pair of blocks with no sequence in common is never
evaluated and counts as empty.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from flexgr.masks.mods import MaskMod

# Mask elements evaluated at once: bounds the int64 temporaries of a mask_mod to ~128 MB each.
CHUNK_ELEMENTS = 1 << 24


def _candidate_pairs(seq_id_P: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """(query block, key block) of every block pair that shares a sequence, row-major."""
    num_blocks = seq_id_P.numel() // block_size
    seq_NB = seq_id_P.view(num_blocks, block_size).long()
    real_NB = seq_NB >= 0
    has_N = real_NB.any(1)
    big = torch.iinfo(torch.int64).max
    lo_seq_N = torch.where(real_NB, seq_NB, big).amin(1)
    hi_seq_N = torch.where(real_NB, seq_NB, -1).amax(1)
    # Sequence ids never decrease along the tokens and padding comes last, so the blocks that hold
    # real tokens are a prefix whose lowest and highest ids both never decrease: each query block's
    # partners form one contiguous run, found by binary search.
    real_blocks = int(has_N.sum())
    first_N = torch.searchsorted(hi_seq_N[:real_blocks].contiguous(), lo_seq_N, right=False)
    last_N = torch.searchsorted(lo_seq_N[:real_blocks].contiguous(), hi_seq_N, right=True) - 1
    count_N = torch.where(has_N, last_N - first_N + 1, 0).clamp(min=0)
    row_P = torch.repeat_interleave(torch.arange(num_blocks, device=seq_id_P.device), count_N)
    row_start_N = torch.cumsum(count_N, 0) - count_N
    col_P = first_N[row_P] + torch.arange(row_P.numel(), device=seq_id_P.device) - row_start_N[row_P]
    return row_P, col_P


def _classify(
    mask_mod: MaskMod, row_P: Tensor, col_P: Tensor, block_size: int
) -> tuple[Tensor, Tensor]:
    """(any, all) of the mask over each block pair."""
    device = row_P.device
    offs = torch.arange(block_size, device=device)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    any_P = torch.empty(row_P.numel(), dtype=torch.bool, device=device)
    all_P = torch.empty_like(any_P)
    step = max(1, CHUNK_ELEMENTS // (block_size * block_size))
    for start in range(0, row_P.numel(), step):
        rows, cols = row_P[start : start + step], col_P[start : start + step]
        q = (rows * block_size)[:, None, None] + offs[None, :, None]
        kv = (cols * block_size)[:, None, None] + offs[None, None, :]
        m = mask_mod(zero, zero, q, kv).expand(rows.numel(), block_size, block_size)
        flat = m.reshape(rows.numel(), -1)
        any_P[start : start + step] = flat.any(1)
        all_P[start : start + step] = flat.all(1)
    return any_P, all_P


def _ordered(select_P: Tensor, row_P: Tensor, col_P: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """Per query block: how many selected key blocks, and their indices in ascending order."""
    sel = select_P.long()
    count_N = torch.zeros(num_blocks, dtype=torch.long, device=row_P.device).index_add_(0, row_P, sel)
    before_N = torch.cumsum(count_N, 0) - count_N
    rank_P = torch.cumsum(sel, 0) - 1 - before_N[row_P]
    indices = torch.zeros(num_blocks, num_blocks, dtype=torch.int32, device=row_P.device)
    keep = select_P.nonzero().squeeze(1)
    indices[row_P[keep], rank_P[keep]] = col_P[keep].to(torch.int32)
    return count_N.to(torch.int32)[None, None], indices[None, None]


def jagged_block_mask(mask_mod: MaskMod, seq_id_P: Tensor, block_size: int) -> BlockMask:
    """The BlockMask of ``mask_mod`` (which must imply ``jagged``) over ``seq_id_P`` (padded to a
    multiple of ``block_size``; padding tokens have a negative id). Equals
    ``create_block_mask(mask_mod, 1, None, P, P, BLOCK_SIZE=block_size)``."""
    padded_len = seq_id_P.numel()
    if padded_len % block_size:
        raise ValueError(f"padded length {padded_len} is not a multiple of block_size {block_size}")
    num_blocks = padded_len // block_size
    row_P, col_P = _candidate_pairs(seq_id_P, block_size)
    any_P, all_P = _classify(mask_mod, row_P, col_P, block_size)
    kv_num, kv_idx = _ordered(any_P & ~all_P, row_P, col_P, num_blocks)
    full_num, full_idx = _ordered(all_P, row_P, col_P, num_blocks)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(padded_len, padded_len),
    )
