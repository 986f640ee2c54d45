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

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from flexgr.masks.layout import JaggedLayout, build_layout
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
        # max_id of the first token's sequence (the tail rows' bound)
        "m_first": layout.max_id.view(-1, block_size)[:, 0].long(),
        "target": (layout.is_target.view(-1, block_size) & real).any(1),
        "ctx": ctx.any(1),
    }


class BandTables(NamedTuple):
    """A batch's layout and block tables as plain tensors (what the compiled builder returns).

    Block tables are ``[NQ]`` / ``[NQ, NKV]`` int32 (key blocks per query block, ascending) and
    their transposes ``q_*`` (query blocks per key block), as BlockMask stores them."""

    seq_id: Tensor
    local: Tensor
    seq_len: Tensor
    pos_id: Tensor
    max_id: Tensor
    is_target: Tensor
    kv_num: Tensor
    kv_idx: Tensor
    full_kv_num: Tensor
    full_kv_idx: Tensor
    q_num: Tensor
    q_idx: Tensor
    full_q_num: Tensor
    full_q_idx: Tensor


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
    if layout.padded_len % block_size:
        raise ValueError(
            f"padded length {layout.padded_len} is not a multiple of block_size {block_size}"
        )
    blocks = _block_tables(
        layout, max_len=max_len, max_attn_len=max_attn_len, full_attn_tail=full_attn_tail,
        block_size=block_size,
    )
    return block_mask_of(blocks, layout.padded_len, block_size, mask_mod)


def block_mask_of(
    blocks: tuple[Tensor, ...], padded_len: int, block_size: int, mask_mod: MaskMod
) -> BlockMask:
    """Wrap the eight block tables (kv, full kv, q, full q; count and indices each) without
    recomputing the transposes."""
    kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx = (
        t[None, None] for t in blocks
    )
    return BlockMask(
        seq_lengths=(padded_len, padded_len),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=fkv_num,
        full_kv_indices=fkv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=fq_num,
        full_q_indices=fq_idx,
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=mask_mod,
    )


def band_tables(
    offsets: Tensor,
    num_targets: Tensor | None,
    total_len: int,
    padded_len: int,
    contextual_len: int,
    max_attn_len: int,
    full_attn_tail: int,
    max_len: int,
    block_size: int,
    global_len: int = 0,
    semi_local: bool = False,
) -> BandTables:
    """Layout and block tables of one batch from its offsets: pure tensor code with shapes
    fixed by the host's integers, so ``torch.compile`` fuses it into a few kernels
    (:func:`compiled_band_tables`; a few dozen launches eagerly). ``global_len`` and
    ``semi_local`` are :class:`flexgr.masks.block.MaskSpec`'s (semi-local attention)."""
    layout = build_layout(
        offsets, num_targets=num_targets, contextual_len=contextual_len,
        total_len=total_len, padded_len=padded_len,
    )
    blocks = _block_tables(
        layout, max_len=max_len, max_attn_len=max_attn_len, full_attn_tail=full_attn_tail,
        block_size=block_size, global_len=global_len, semi_local=semi_local,
    )
    return BandTables(
        layout.seq_id, layout.local, layout.seq_len, layout.pos_id, layout.max_id,
        layout.is_target, *blocks,
    )


@functools.cache
def compiled_band_tables() -> Callable[..., BandTables]:
    """:func:`band_tables` under ``torch.compile`` with dynamic shapes: one graph for every
    packed length (the host ints become symbols), measured in BENCHMARKS.md."""
    return torch.compile(band_tables, dynamic=True, fullgraph=True)


def _block_tables(
    layout: JaggedLayout,
    *,
    max_len: int,
    max_attn_len: int,
    full_attn_tail: int,
    block_size: int,
    global_len: int = 0,
    semi_local: bool = False,
) -> tuple[Tensor, ...]:
    P = layout.padded_len
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
    window = max_attn_len > 0 or semi_local
    tail = full_attn_tail if window else 0
    global_len = global_len if window else 0
    if window:
        # The shared sequence's keys end the key block and its queries start the query block:
        # no pair is closer than p_first(q) - p_last(k) positions. Pairs further apart are
        # visible only through an exemption the two blocks can hold: tail rows (a query block
        # holding a sequence end has some; else its last row decides), contextual rows, or
        # global keys (a key block holding a sequence start has some; else its first key).
        near = q_("p_first") - k_("p_last") <= max_attn_len
        if tail > 0:
            ends = q_("s_lo") != q_("s_hi")
            near = near | ends | (q_("p_last") >= q_("m_first") - tail)
        if not causal:
            near = near | q_("ctx")
        if global_len > 0:
            starts = k_("s_lo") != k_("s_hi")
            near = near | starts | (k_("p_first") < global_len)
        before = before & near
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
    if window:
        # One sequence in both blocks: no pair is further apart than p_last(q) - p_first(k);
        # or every query row is a tail row, or every key a global key.
        every = q_("p_last") - k_("p_first") <= max_attn_len
        if tail > 0:
            every = every | (q_("p_first") >= q_("m_first") - tail)
        if global_len > 0:
            every = every | (k_("p_last") < global_len)
        full = full & every
    partial = any_ & ~full
    kv_num, kv_idx = _compact(partial, kb, nb)
    full_num, full_idx = _compact(full, kb, nb)
    q_num, q_idx = _transposed(partial, kb, k, nb)
    full_q_num, full_q_idx = _transposed(full, kb, k, nb)
    return kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx


def _transposed(select: Tensor, kb: Tensor, k: Tensor, nb: int) -> tuple[Tensor, Tensor]:
    """Per key block: the query blocks that selected it, ascending (BlockMask's q_* tables).
    Scattered into a dense [NKV, NQ] table first: NQ * NKV is small (a few 100k at 64k tokens)."""
    qb = torch.arange(nb, device=kb.device)[:, None].expand_as(kb)
    # Accumulated: clamped out-of-range slots repeat an index (with select False there).
    dense = torch.zeros(nb, nb, dtype=torch.int32, device=kb.device)
    dense.index_put_((k.reshape(-1), qb.reshape(-1)), select.reshape(-1).int(), accumulate=True)
    cols = torch.arange(nb, device=kb.device)[None, :].expand(nb, nb)
    return _compact(dense > 0, cols, nb)


def _compact(select: Tensor, kb: Tensor, nb: int) -> tuple[Tensor, Tensor]:
    """Per query block: the number of selected key blocks and their indices ascending, as
    BlockMask stores them ([NQ] and [NQ, NQ]), with sorts instead of nonzero."""
    keys = torch.where(select, kb, _BIG).to(torch.int32)
    ordered = keys.sort(dim=1).values
    count = select.sum(1, dtype=torch.int32)
    # Exactly nb columns whether the band is wider or narrower than the batch (no branch on
    # the sizes, so one compiled graph serves every length).
    head = torch.nn.functional.pad(ordered, (0, nb), value=_BIG)[:, :nb]
    indices = torch.where(head == _BIG, 0, head)
    return count, indices.contiguous()
