"""The built-in HSTU rule's BlockMask from per-block statistics: no host sync, no mask_mod calls.

A query block can only see key blocks of its own sequences, and a sequence spans at most
``ceil(max_len / B) + 1`` blocks, so the candidates of query block ``qb`` are a fixed band of
key blocks around it (only before it when the rule is causal). Each candidate pair is classified
from small per-block tables (lowest / highest sequence id, lowest / highest position id, whether
the block holds targets or contextual rows) by conservative rules:

- **empty** only when no pair of tokens can be visible (no sequence in common; or, inside one
  sequence, every key further behind than the local window);
- **full** only when every pair is visible (one sequence filling both blocks, keys strictly
  before the queries, no targets among the keys, no contextual rows, within the window);
- **partial** otherwise: the kernel evaluates the rule inline there, so a partial block that
  happens to be full or empty costs time, never correctness.

Every shape is fixed by the padded length, ``max_len`` and the block size, which the host
knows, so building the mask enqueues kernels and waits for none (unlike the nonzero-based
:func:`flexgr.masks.sparse.jagged_block_mask`, which serves arbitrary jagged mask_mods).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from flexgr.masks.layout import JaggedLayout
from flexgr.masks.mods import MaskMod

_BIG = torch.iinfo(torch.int32).max


def band_width(max_len: int, block_size: int) -> int:
    """Key blocks a query block can reach on one side: a sequence of ``max_len`` tokens touches
    at most ``ceil(max_len / B) + 1`` blocks."""
    return -(-max_len // block_size) + 1


def _block_stats(layout: JaggedLayout, block_size: int) -> dict[str, Tensor]:
    """Per block. Real tokens come first (padding only at the end of the batch), sequence ids
    never decrease along the tokens and position ids never decrease inside a sequence, so the
    first and last real token bound the block's sequences and each sequence's positions."""
    seq = layout.seq_id.view(-1, block_size).long()
    real = seq >= 0
    pos = layout.pos_id.view(-1, block_size).long()
    last = (real.sum(1) - 1).clamp(min=0)[:, None]
    ctx = real & (layout.local.view(-1, block_size) < layout.contextual_len)
    return {
        "any_real": real.any(1),
        "all_real": real.all(1),
        "s_lo": seq[:, 0],  # the first token's sequence (-1: an all-padding block)
        "s_hi": seq.gather(1, last)[:, 0],
        "p_first": pos[:, 0],
        "p_last": pos.gather(1, last)[:, 0],
        "target": (layout.is_target.view(-1, block_size) & real).any(1),
        "ctx": ctx.any(1),
    }


def hstu_band_block_mask(
    layout: JaggedLayout,
    mask_mod: MaskMod,
    *,
    max_len: int,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    block_size: int = 128,
) -> BlockMask:
    """The BlockMask of the built-in HSTU rule over ``layout`` (padded to whole blocks), for
    sequences of at most ``max_len`` tokens. ``mask_mod`` is the rule itself (flex evaluates it
    on partial blocks); see the module docstring for how blocks are classified."""
    P = layout.padded_len
    if P % block_size:
        raise ValueError(f"padded length {P} is not a multiple of block_size {block_size}")
    nb = P // block_size
    device = layout.seq_id.device
    st = _block_stats(layout, block_size)
    reach = band_width(max_len, block_size)
    causal = layout.contextual_len == 0
    # Candidate key block of band slot j for query block qb: qb - j (and qb + j without
    # causality, where contextual rows see the rest of their sequence).
    back = torch.arange(reach, device=device)
    offsets = back if causal else torch.cat([back, -back[1:]])
    qb = torch.arange(nb, device=device)[:, None]
    kb = qb - offsets[None, :]
    inside = (kb >= 0) & (kb < nb)
    k = kb.clamp(0, nb - 1)

    def q_(name: str) -> Tensor:
        return st[name][:, None]

    def k_(name: str) -> Tensor:
        return st[name][k]

    real = inside & q_("any_real") & k_("any_real")
    # An earlier key block can share only one sequence with the query block: its last, which
    # is the query block's first (a later key block: the query block's last, its first).
    before = real & (kb < qb) & (k_("s_hi") == q_("s_lo"))
    if max_attn_len > 0 and full_attn_tail == 0 and causal:
        # The shared sequence's keys end the key block and its queries start the query block:
        # no pair is closer than p_first(q) - p_last(k) positions.
        before = before & (q_("p_first") - k_("p_last") <= max_attn_len)
    any_ = before | (real & (kb == qb))
    if not causal:  # keys after the query block: only contextual rows look forward
        any_ = any_ | (real & (kb > qb) & (k_("s_lo") == q_("s_hi")) & q_("ctx"))
    one_seq = (
        q_("all_real")
        & k_("all_real")
        & (q_("s_lo") == q_("s_hi"))
        & (k_("s_lo") == k_("s_hi"))
        & (q_("s_lo") == k_("s_lo"))
    )
    full = any_ & one_seq & (kb < qb) & ~k_("target") & ~q_("ctx") & ~k_("ctx")
    if max_attn_len > 0:
        # One sequence in both blocks: no pair is further apart than p_last(q) - p_first(k).
        full = full & (q_("p_last") - k_("p_first") <= max_attn_len)
    partial = any_ & ~full
    kv_num, kv_idx = _compact(partial, kb, nb)
    full_num, full_idx = _compact(full, kb, nb)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(P, P),
    )


def _compact(select: Tensor, kb: Tensor, nb: int) -> tuple[Tensor, Tensor]:
    """Per query block: the number of selected key blocks and their indices ascending, as
    BlockMask wants them ([1, 1, NQ] and [1, 1, NQ, NKV]), with sorts instead of nonzero."""
    keys = torch.where(select, kb, _BIG).to(torch.int32)
    ordered = keys.sort(dim=1).values
    count = select.sum(1, dtype=torch.int32)
    width = min(ordered.shape[1], nb)
    indices = torch.zeros(nb, nb, dtype=torch.int32, device=kb.device)
    head = ordered[:, :width]
    indices[:, :width] = torch.where(head == _BIG, 0, head)
    return count[None, None], indices[None, None]
