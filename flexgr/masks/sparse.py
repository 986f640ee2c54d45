"""A BlockMask for jagged masks without torch.compile.

A mask that includes ``jagged`` lets a query block see only key blocks that share a sequence with
it: on one device a band of blocks around the diagonal. Evaluating the mask_mod on those block pairs
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


def _block_seq_range(seq_id: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Lowest and highest sequence id of each block's real tokens (empty range if none)."""
    seq_NB = seq_id.view(-1, block_size).long()
    real_NB = seq_NB >= 0
    lo_N = torch.where(real_NB, seq_NB, torch.iinfo(torch.int64).max).amin(1)
    hi_N = torch.where(real_NB, seq_NB, -1).amax(1)
    return lo_N, hi_N


def _candidate_pairs(
    q_seq: Tensor, kv_seq: Tensor, block_size: int, causal: bool
) -> tuple[Tensor, Tensor]:
    """(query block, key block) of every block pair whose sequence-id ranges overlap, row-major.

    Overlapping ranges are necessary for a shared sequence, so no visible pair is missed; with ids
    that never decrease along the tokens (one device) they are also nearly sufficient. The
    overlap test is one [query blocks, key blocks] boolean matrix: 1.8M entries at T = 170k."""
    q_lo, q_hi = _block_seq_range(q_seq, block_size)
    k_lo, k_hi = _block_seq_range(kv_seq, block_size)
    overlap = (q_lo[:, None] <= k_hi[None, :]) & (k_lo[None, :] <= q_hi[:, None])
    if causal:  # key blocks that start after the query block ends hold no visible key
        overlap = torch.tril(overlap)
    row_P, col_P = overlap.nonzero(as_tuple=True)
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


def _ordered(
    select_P: Tensor, row_P: Tensor, col_P: Tensor, shape: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Per query block: how many selected key blocks, and their indices in ascending order."""
    sel = select_P.long()
    count_N = torch.zeros(shape[0], dtype=torch.long, device=row_P.device).index_add_(0, row_P, sel)
    before_N = torch.cumsum(count_N, 0) - count_N
    rank_P = torch.cumsum(sel, 0) - 1 - before_N[row_P]
    indices = torch.zeros(shape, dtype=torch.int32, device=row_P.device)
    keep = select_P.nonzero().squeeze(1)
    indices[row_P[keep], rank_P[keep]] = col_P[keep].to(torch.int32)
    return count_N.to(torch.int32)[None, None], indices[None, None]


def jagged_block_mask(
    mask_mod: MaskMod,
    q_seq: Tensor,
    block_size: int,
    kv_seq: Tensor | None = None,
    *,
    causal: bool = False,
) -> BlockMask:
    """The BlockMask of ``mask_mod``, which must imply ``jagged``: a query sees only keys of its own
    sequence. ``q_seq`` [Q] and ``kv_seq`` [KV] (default: ``q_seq``) are the sequence ids of the
    query and key slots, each padded to a multiple of ``block_size`` with negative ids. A query
    slot whose rows the mask never shows anything may get a negative id too: its blocks are then
    skipped. ``causal`` promises that the mask also implies key index <= query index on one shared
    token axis, which halves the pairs evaluated. Equals ``create_block_mask(mask_mod, 1, None, Q, KV,
    BLOCK_SIZE=block_size)``."""
    kv_seq = q_seq if kv_seq is None else kv_seq
    q_len, kv_len = q_seq.numel(), kv_seq.numel()
    if causal and q_len != kv_len:
        raise ValueError("causal=True needs queries and keys on one token axis (equal lengths)")
    for name, n in (("query", q_len), ("key", kv_len)):
        if n % block_size:
            raise ValueError(f"padded {name} length {n} is not a multiple of block_size {block_size}")
    row_P, col_P = _candidate_pairs(q_seq, kv_seq, block_size, causal)
    any_P, all_P = _classify(mask_mod, row_P, col_P, block_size)
    shape = (q_len // block_size, kv_len // block_size)
    kv_num, kv_idx = _ordered(any_P & ~all_P, row_P, col_P, shape)
    full_num, full_idx = _ordered(all_P, row_P, col_P, shape)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )
