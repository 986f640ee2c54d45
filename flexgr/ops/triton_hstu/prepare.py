"""A batch's mask tables and per-token bias tables in two Triton launches, no host sync.

:func:`flexgr.masks.band.band_tables` is a few dozen small torch ops (2.5-2.8 ms of launches
per batch on an H200 eagerly, 0.73-0.78 ms compiled); the work itself is a few microseconds.
Here it is two kernels, bit-identical to it (tests/ops/test_prepare_kernel.py):

1. :func:`_token_kernel`, whole mask blocks per program (512 tokens): each token's sequence
   (binary search over the offsets), the layout's per-token tables, HSTU's per-token bias
   inputs (positions, the timestamps as int64, the next timestamps), and each block's
   statistics of ``_block_stats``.
2. :func:`_pairs_kernel`, 16 rows per program: rows of the kv tables (a query block's key
   blocks) and rows of the transposed q tables (a key block's query blocks): the band's
   candidate pairs classified by the rules of ``_block_tables``, compacted in ascending order
   by a prefix sum, written as whole rows (zeros past the count), so no memset runs either.

Design notes: docs/triton-kernel.md, "Per-batch tables".
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from flexgr.masks.band import BandTables, band_width

if TYPE_CHECKING:
    from flexgr.masks.block import HSTUMask
    from flexgr.ops.triton_hstu.launch import MaskTables

# Rows of the per-block statistics table (``_block_stats``'s names).
_ANY = tl.constexpr(0)
_ALL = tl.constexpr(1)
_S_LO = tl.constexpr(2)
_S_HI = tl.constexpr(3)
_P_FIRST = tl.constexpr(4)
_P_LAST = tl.constexpr(5)
_TARGET = tl.constexpr(6)
_CTX = tl.constexpr(7)
_M_FIRST = tl.constexpr(8)
_STATS = 9
_TOKENS = 512  # tokens per program of the token kernel (at least one mask block)
_ROWS = 16  # block-table rows per program
_PAIR_CHUNK = 64  # candidate pairs of a row classified at once
_ROW_CHUNK = 128  # index columns of a row written at once


def supports_block_size(block_size: int) -> bool:
    """Block sizes the kernels take: powers of two (``tl.arange``), as the attention kernels'."""
    return 16 <= block_size <= 1024 and block_size & (block_size - 1) == 0


class BiasInputs(NamedTuple):
    """HSTU's per-token bias inputs of a batch (``flexgr.model.hstu.inputs.bias_tables``) and
    its positions padded for the attention kernel (``launch.bias_tables``' ``local``)."""

    positions: Tensor  # [T] int64 HSTU position ids
    timestamps: Tensor  # [T] int64
    next_timestamps: Tensor  # [T] int64
    padded_positions: Tensor  # [P] int32, zeros past T


# Runtime ints are not specialised (on == 1 or divisibility by 16): one compiled kernel per
# flag combination however the batch's lengths come out.
@triton.jit(do_not_specialize=[
    "num_seqs", "total_len", "num_blocks", "contextual_len", "search_steps",
])
def _token_kernel(
    offsets_ptr, num_targets_ptr, ts_ptr, query_time_ptr,
    seq_id_ptr, local_ptr, seq_len_ptr, pos_id_ptr, max_id_ptr, is_target_ptr, stats_ptr,
    positions_ptr, ts_out_ptr, next_ts_ptr, padded_pos_ptr,
    num_seqs, total_len, num_blocks, contextual_len, search_steps,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr, WITH_BIAS: tl.constexpr, HAS_TS: tl.constexpr,
    WRITE_TS: tl.constexpr, HAS_QUERY_TIME: tl.constexpr,
):
    """ROWS mask blocks of BLOCK tokens each, one block a row of the tile."""
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    i = tl.arange(0, BLOCK)[None, :]
    tok = blocks[:, None] * BLOCK + i
    inside = tok < num_blocks * BLOCK
    # The sequence: how many ends offsets[1:] are <= tok (searchsorted, right=True).
    lo = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    hi = lo + num_seqs
    for _ in range(search_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        end = tl.load(offsets_ptr + 1 + mid, mask=active, other=0).to(tl.int64)
        right = active & (end <= tok)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    pad = tok >= total_len
    seq = tl.where(pad, 0, tl.minimum(lo, num_seqs - 1))  # padding reads sequence 0, as eager
    start = tl.load(offsets_ptr + seq).to(tl.int64)
    stop = tl.load(offsets_ptr + seq + 1).to(tl.int64)
    length = stop - start
    local = tl.where(pad, 0, tok - start)
    if HAS_CONTEXT:
        pos = tl.maximum(local - contextual_len + 1, 0)
        max_id = length - contextual_len + 1
    else:
        pos = local
        max_id = length
    if HAS_TARGETS:
        nt = tl.load(num_targets_ptr + seq).to(tl.int64)
        max_id = max_id - nt
        pos = tl.minimum(pos, max_id)
        is_target = (local >= length - nt) & ~pad
    else:
        is_target = tok < 0
    seq_out = tl.where(pad, -1, seq)
    pos32 = pos.to(tl.int32)
    tl.store(seq_id_ptr + tok, seq_out, mask=inside)
    tl.store(local_ptr + tok, local.to(tl.int32), mask=inside)
    tl.store(seq_len_ptr + tok, tl.where(pad, 0, length).to(tl.int32), mask=inside)
    tl.store(pos_id_ptr + tok, pos32, mask=inside)
    tl.store(max_id_ptr + tok, max_id.to(tl.int32), mask=inside)
    tl.store(is_target_ptr + tok, is_target.to(tl.uint8), mask=inside)

    # Block statistics: real tokens come first, so the first and the last real token bound the
    # block's sequences and positions (the last is token 0 of an all-padding block).
    n_real = tl.minimum(tl.maximum(total_len - blocks * BLOCK, 0), BLOCK)
    first = i == 0
    last = i == tl.maximum(n_real - 1, 0)[:, None]
    stats = stats_ptr + blocks
    ok = blocks < num_blocks
    tl.store(stats + _ANY * num_blocks, (n_real > 0).to(tl.int32), mask=ok)
    tl.store(stats + _ALL * num_blocks, (n_real == BLOCK).to(tl.int32), mask=ok)
    tl.store(stats + _S_LO * num_blocks, tl.sum(tl.where(first, seq_out, 0), 1), mask=ok)
    tl.store(stats + _S_HI * num_blocks, tl.sum(tl.where(last, seq_out, 0), 1), mask=ok)
    tl.store(stats + _P_FIRST * num_blocks, tl.sum(tl.where(first, pos32, 0), 1), mask=ok)
    tl.store(stats + _P_LAST * num_blocks, tl.sum(tl.where(last, pos32, 0), 1), mask=ok)
    tl.store(stats + _TARGET * num_blocks, tl.max(is_target.to(tl.int32), 1), mask=ok)
    if HAS_CONTEXT:
        ctx = tl.max((~pad & (local < contextual_len)).to(tl.int32), 1)
    else:
        ctx = tl.zeros([ROWS], dtype=tl.int32)
    tl.store(stats + _CTX * num_blocks, ctx, mask=ok)
    max32 = max_id.to(tl.int32)
    tl.store(stats + _M_FIRST * num_blocks, tl.sum(tl.where(first, max32, 0), 1), mask=ok)

    if WITH_BIAS:
        t = ~pad
        tl.store(positions_ptr + tok, pos, mask=t)
        tl.store(padded_pos_ptr + tok, tl.where(t, pos32, 0), mask=inside)
        if HAS_TS:
            ts = tl.load(ts_ptr + tok, mask=t, other=0).to(tl.int64)
            after = tl.minimum(tok + 1, total_len - 1)
            nxt = tl.load(ts_ptr + after, mask=t, other=0).to(tl.int64)
        else:
            ts = tl.zeros([ROWS, BLOCK], dtype=tl.int64)
            nxt = ts
        if WRITE_TS:
            tl.store(ts_out_ptr + tok, ts, mask=t)
        if HAS_QUERY_TIME:
            final = tl.load(query_time_ptr + seq, mask=t, other=0).to(tl.int64)
        else:
            final = ts
        nxt = tl.where(tok == stop - 1, final, nxt)  # a sequence's last token: the query time
        tl.store(next_ts_ptr + tok, nxt, mask=t)


@triton.jit
def _pair_rows(
    stats_ptr, num_ptr, idx_ptr, full_num_ptr, full_idx_ptr, first_row, num_blocks, reach,
    max_attn_len, tail, global_len,
    TRANSPOSED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_GLOBAL: tl.constexpr, ROWS: tl.constexpr,
    PAIR_CHUNK: tl.constexpr, ROW_CHUNK: tl.constexpr,
):
    """ROWS rows: the key blocks of each query block (or, TRANSPOSED, the query blocks of each
    key block), partial and full, ascending; ``_block_tables``' rules pair by pair."""
    rows = first_row + tl.arange(0, ROWS)
    row_ok = rows < num_blocks
    if CAUSAL:
        span = reach
        lowest = rows if TRANSPOSED else rows - (reach - 1)  # keys never after the queries
    else:
        span = 2 * reach - 1
        lowest = rows - (reach - 1)
    base = (rows.to(tl.int64) * num_blocks)[:, None]
    n_part = tl.zeros([ROWS], dtype=tl.int32)
    n_full = tl.zeros([ROWS], dtype=tl.int32)
    row_c = tl.minimum(rows, num_blocks - 1)[:, None]
    for c0 in range(0, span, PAIR_CHUNK):
        j = c0 + tl.arange(0, PAIR_CHUNK)[None, :]
        other = lowest[:, None] + j
        valid = row_ok[:, None] & (j < span) & (other >= 0) & (other < num_blocks)
        other_c = tl.minimum(tl.maximum(other, 0), num_blocks - 1)
        if TRANSPOSED:  # the rows are key blocks, the candidates query blocks
            qb = other_c
            kb = row_c + 0 * other_c
        else:
            qb = row_c + 0 * other_c
            kb = other_c
        sq = stats_ptr + qb
        sk = stats_ptr + kb
        s_lo_q = tl.load(sq + _S_LO * num_blocks)
        s_hi_q = tl.load(sq + _S_HI * num_blocks)
        s_lo_k = tl.load(sk + _S_LO * num_blocks)
        s_hi_k = tl.load(sk + _S_HI * num_blocks)
        ctx_q = tl.load(sq + _CTX * num_blocks) != 0
        ctx_k = tl.load(sk + _CTX * num_blocks) != 0
        real = valid & (tl.load(sq + _ANY * num_blocks) != 0) & (tl.load(sk + _ANY * num_blocks) != 0)
        # An earlier key block shares at most its last sequence, the query block's first.
        before = real & (kb < qb) & (s_hi_k == s_lo_q)
        if HAS_WINDOW:  # further than the window: only through an exemption (band.py)
            p_first_q = tl.load(sq + _P_FIRST * num_blocks).to(tl.int64)
            p_last_k = tl.load(sk + _P_LAST * num_blocks).to(tl.int64)
            near = p_first_q - p_last_k <= max_attn_len
            if HAS_TAIL:
                p_last_q = tl.load(sq + _P_LAST * num_blocks).to(tl.int64)
                m_first_q = tl.load(sq + _M_FIRST * num_blocks).to(tl.int64)
                near = near | (s_lo_q != s_hi_q) | (p_last_q >= m_first_q - tail)
            if not CAUSAL:
                near = near | ctx_q
            if HAS_GLOBAL:
                p_first_k = tl.load(sk + _P_FIRST * num_blocks).to(tl.int64)
                near = near | (s_lo_k != s_hi_k) | (p_first_k < global_len)
            before = before & near
        any_ = before | (real & (kb == qb))
        if not CAUSAL:  # keys after the query block: only contextual rows look forward
            any_ = any_ | (real & (kb > qb) & (s_lo_k == s_hi_q) & ctx_q)
        all_q = tl.load(sq + _ALL * num_blocks) != 0
        all_k = tl.load(sk + _ALL * num_blocks) != 0
        one_seq = all_q & all_k & (s_lo_q == s_hi_q) & (s_lo_k == s_hi_k) & (s_lo_q == s_lo_k)
        target_k = tl.load(sk + _TARGET * num_blocks) != 0
        full = any_ & one_seq & (kb < qb) & ~target_k & ~ctx_q & ~ctx_k
        if HAS_WINDOW:
            p_last_q = tl.load(sq + _P_LAST * num_blocks).to(tl.int64)
            p_first_k = tl.load(sk + _P_FIRST * num_blocks).to(tl.int64)
            every = p_last_q - p_first_k <= max_attn_len
            if HAS_TAIL:
                p_first_q = tl.load(sq + _P_FIRST * num_blocks).to(tl.int64)
                m_first_q = tl.load(sq + _M_FIRST * num_blocks).to(tl.int64)
                every = every | (p_first_q >= m_first_q - tail)
            if HAS_GLOBAL:
                p_last_k = tl.load(sk + _P_LAST * num_blocks).to(tl.int64)
                every = every | (p_last_k < global_len)
            full = full & every
        part = any_ & ~full
        # Compaction: a selected pair's column is the number of selected pairs before it.
        part_i = part.to(tl.int32)
        full_i = full.to(tl.int32)
        part_at = n_part[:, None] + tl.cumsum(part_i, 1) - 1
        full_at = n_full[:, None] + tl.cumsum(full_i, 1) - 1
        tl.store(idx_ptr + base + part_at, other, mask=part)
        tl.store(full_idx_ptr + base + full_at, other, mask=full)
        n_part += tl.sum(part_i, 1)
        n_full += tl.sum(full_i, 1)
    tl.store(num_ptr + rows, n_part, mask=row_ok)
    tl.store(full_num_ptr + rows, n_full, mask=row_ok)
    # The rest of each row: zeros, each column written once (never both a value and a zero).
    zero = tl.zeros([ROWS, ROW_CHUNK], dtype=tl.int32)
    for c0 in range(0, num_blocks, ROW_CHUNK):
        col = c0 + tl.arange(0, ROW_CHUNK)[None, :]
        inside = row_ok[:, None] & (col < num_blocks)
        tl.store(idx_ptr + base + col, zero, mask=inside & (col >= n_part[:, None]))
        tl.store(full_idx_ptr + base + col, zero, mask=inside & (col >= n_full[:, None]))


@triton.jit(do_not_specialize=["num_blocks", "reach", "max_attn_len", "tail", "global_len"])
def _pairs_kernel(
    stats_ptr, kv_num_ptr, kv_idx_ptr, full_kv_num_ptr, full_kv_idx_ptr,
    q_num_ptr, q_idx_ptr, full_q_num_ptr, full_q_idx_ptr,
    num_blocks, reach, max_attn_len, tail, global_len,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TAIL: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, ROWS: tl.constexpr, PAIR_CHUNK: tl.constexpr,
    ROW_CHUNK: tl.constexpr,
):
    """Programs [0, n): ROWS query blocks each (kv tables); [n, 2n): ROWS key blocks each (the
    transposed q tables)."""
    pid = tl.program_id(0)
    per_side = tl.cdiv(num_blocks, ROWS)
    if pid < per_side:
        _pair_rows(
            stats_ptr, kv_num_ptr, kv_idx_ptr, full_kv_num_ptr, full_kv_idx_ptr, pid * ROWS,
            num_blocks, reach, max_attn_len, tail, global_len, False, CAUSAL, HAS_WINDOW,
            HAS_TAIL, HAS_GLOBAL, ROWS, PAIR_CHUNK, ROW_CHUNK,
        )
    else:
        _pair_rows(
            stats_ptr, q_num_ptr, q_idx_ptr, full_q_num_ptr, full_q_idx_ptr,
            (pid - per_side) * ROWS, num_blocks, reach, max_attn_len, tail, global_len, True,
            CAUSAL, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, ROWS, PAIR_CHUNK, ROW_CHUNK,
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
    """:func:`flexgr.masks.band.band_tables` in two launches (same arguments, same tensors)."""
    band, _ = _launch(
        offsets, num_targets, None, None, total_len, padded_len, contextual_len,
        max_attn_len, full_attn_tail, max_len, block_size, with_bias=False,
        global_len=global_len, semi_local=semi_local,
    )
    return band


def band_and_bias_tables(
    offsets: Tensor,
    num_targets: Tensor | None,
    timestamps: Tensor | None,
    query_time: Tensor | None,
    total_len: int,
    padded_len: int,
    contextual_len: int,
    max_attn_len: int,
    full_attn_tail: int,
    max_len: int,
    block_size: int,
) -> tuple[BandTables, BiasInputs]:
    """:func:`band_tables` plus HSTU's per-token bias inputs from the same two launches:
    positions (``pos_id[:T]`` as int64), timestamps as int64 (zeros without any), their
    :func:`flexgr.ops.rab.next_timestamps`, and the positions padded to ``P`` as int32."""
    band, bias = _launch(
        offsets, num_targets, timestamps, query_time, total_len, padded_len, contextual_len,
        max_attn_len, full_attn_tail, max_len, block_size, with_bias=True,
    )
    assert bias is not None
    return band, bias


def hstu_mask_and_bias(
    offsets: Tensor,
    *,
    num_targets: Tensor | None,
    timestamps: Tensor | None,
    query_time: Tensor | None,
    contextual_len: int,
    max_attn_len: int,
    full_attn_tail: int,
    total_len: int,
    max_len: int,
) -> tuple[HSTUMask, BiasInputs]:
    """``build_hstu_mask(offsets, ..., max_len=max_len)`` and HSTU's per-token bias inputs
    (:func:`band_and_bias_tables`) from the same two launches, on the default block size and
    padded length."""
    from flexgr.masks.block import BLOCK_SIZE, mask_of_band, mask_spec, padded_length

    padded_len = padded_length(total_len, offsets.device, BLOCK_SIZE)
    spec = mask_spec(num_targets, contextual_len, max_attn_len, full_attn_tail)
    band, bias = band_and_bias_tables(
        offsets, num_targets, timestamps, query_time, total_len, padded_len, contextual_len,
        max_attn_len, spec.full_attn_tail, max_len, BLOCK_SIZE,
    )
    mask = mask_of_band(
        band, offsets, spec, max_attn_len=max_attn_len, full_attn_tail=full_attn_tail,
        total_len=total_len, padded_len=padded_len, block_size=BLOCK_SIZE,
    )
    return mask, bias


def kernel_tables(
    mask: HSTUMask,
    bias: BiasInputs,
    *,
    rel_bias: bool,
    rab_n: int = 0,
    num_buckets: int = 0,
    bucket_divisor: float = 1.0,
) -> MaskTables:
    """The attention kernel's tables of a mask built from :func:`band_and_bias_tables`, as
    ``launch.bias_tables`` gives them but without its conversions (the tensors already have
    the kernel's dtypes and the padded positions). Without a relative bias the kernel reads
    neither timestamp table (``launch`` puts a one-element placeholder there).

    With kernel.rab_tiles (and the bias) the tables also carry the bias tiles' slot tables
    (``rab_tiles.build``: torch ops and one host sync, for the number of visited block pairs)."""
    from flexgr.ops.kernel_options import kernel_options
    from flexgr.ops.triton_hstu import rab_tiles
    from flexgr.ops.triton_hstu.launch import MaskTables

    lay, bm = mask.layout, mask.block_mask
    assert mask.spec is not None and bm.full_kv_num_blocks is not None
    assert bm.q_num_blocks is not None and bm.full_q_num_blocks is not None
    mbq, mbkv = bm.BLOCK_SIZE
    tab = MaskTables(
        seq_id=lay.seq_id,
        pos_id=lay.pos_id,
        max_id=lay.max_id,
        local=bias.padded_positions if rel_bias else lay.local,
        ts=bias.timestamps,
        next_ts=bias.next_timestamps,
        kv_num=bm.kv_num_blocks[0, 0],
        kv_idx=bm.kv_indices[0, 0],
        full_kv_num=bm.full_kv_num_blocks[0, 0],
        full_kv_idx=bm.full_kv_indices[0, 0],
        q_num=bm.q_num_blocks[0, 0],
        q_idx=bm.q_indices[0, 0],
        full_q_num=bm.full_q_num_blocks[0, 0],
        full_q_idx=bm.full_q_indices[0, 0],
        mask_block_q=int(mbq),
        mask_block_kv=int(mbkv),
        total_len=mask.total_len,
        padded_len=mask.padded_len,
        spec=mask.spec,
        rab_n=rab_n if rel_bias else 1,
        num_buckets=num_buckets if rel_bias else 0,
        inv_bucket_div=float(np.float32(1.0) / np.float32(bucket_divisor)) if rel_bias else 1.0,
    )
    if rel_bias and kernel_options().rab_tiles:
        tab = dataclasses.replace(tab, rab_tiles=rab_tiles.build(tab))
    return tab


def _launch(
    offsets: Tensor,
    num_targets: Tensor | None,
    timestamps: Tensor | None,
    query_time: Tensor | None,
    total_len: int,
    padded_len: int,
    contextual_len: int,
    max_attn_len: int,
    full_attn_tail: int,
    max_len: int,
    block_size: int,
    *,
    with_bias: bool,
    global_len: int = 0,
    semi_local: bool = False,
) -> tuple[BandTables, BiasInputs | None]:
    if not supports_block_size(block_size):
        raise ValueError(f"block_size must be a power of two in 16..1024, got {block_size}")
    if padded_len % block_size:
        raise ValueError(f"padded length {padded_len} is not a multiple of block_size {block_size}")
    num_seqs = offsets.numel() - 1
    if num_seqs < 1:
        raise ValueError("offsets must hold at least one sequence ([B + 1] with B >= 1)")
    device = offsets.device
    offsets = offsets.contiguous()
    P, T, nb = padded_len, total_len, padded_len // block_size
    i32 = dict(dtype=torch.int32, device=device)
    seq_id, local, seq_len, pos_id, max_id = (torch.empty(P, **i32) for _ in range(5))
    is_target = torch.empty(P, dtype=torch.bool, device=device)
    stats = torch.empty(_STATS * nb, **i32)
    kv_num, full_kv_num, q_num, full_q_num = (torch.empty(nb, **i32) for _ in range(4))
    kv_idx, full_kv_idx, q_idx, full_q_idx = (torch.empty(nb, nb, **i32) for _ in range(4))
    nt = num_targets.to(device).contiguous() if num_targets is not None else offsets

    bias: BiasInputs | None = None
    ts_in = qt = ts_out = positions = next_ts = padded = seq_id  # never read: placeholders
    write_ts = False
    if with_bias:
        i64 = dict(dtype=torch.int64, device=device)
        positions, next_ts = (_tokens(T, i64) for _ in range(2))
        padded = torch.empty(P, **i32)
        if timestamps is not None:
            if timestamps.dtype.is_floating_point:
                timestamps = timestamps.to(torch.int64)  # the cast torch's .to() does
            ts_in = timestamps.contiguous()
        write_ts = timestamps is None or timestamps.dtype != torch.int64
        ts_out = _tokens(T, i64) if write_ts else ts_in
        if query_time is not None:
            qt = query_time.to(device).contiguous()
        bias = BiasInputs(positions, ts_out, next_ts, padded)
    band = BandTables(
        seq_id, local, seq_len, pos_id, max_id, is_target,
        kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx,
    )
    if nb == 0:
        return band, bias
    causal = contextual_len == 0
    window = max_attn_len > 0 or semi_local
    with _on(device):
        rows = max(1, _TOKENS // block_size)
        _token_kernel[(triton.cdiv(nb, rows),)](
            offsets, nt, ts_in, qt,
            seq_id, local, seq_len, pos_id, max_id, is_target.view(torch.uint8), stats,
            positions, ts_out, next_ts, padded,
            num_seqs, T, nb, contextual_len, num_seqs.bit_length(),
            BLOCK=block_size, ROWS=rows, HAS_TARGETS=num_targets is not None,
            HAS_CONTEXT=contextual_len > 0, WITH_BIAS=with_bias,
            HAS_TS=timestamps is not None, WRITE_TS=write_ts,
            HAS_QUERY_TIME=query_time is not None,
            num_warps=4,
        )
        _pairs_kernel[(2 * triton.cdiv(nb, _ROWS),)](
            stats, kv_num, kv_idx, full_kv_num, full_kv_idx,
            q_num, q_idx, full_q_num, full_q_idx,
            nb, band_width(max_len, block_size), max_attn_len, full_attn_tail, global_len,
            CAUSAL=causal, HAS_WINDOW=window, HAS_TAIL=window and full_attn_tail > 0,
            HAS_GLOBAL=window and global_len > 0, ROWS=_ROWS, PAIR_CHUNK=_PAIR_CHUNK,
            ROW_CHUNK=_ROW_CHUNK, num_warps=4,
        )
    return band, bias


def _tokens(T: int, kind: dict) -> Tensor:
    """[T] int64; an empty batch's still gets memory (a null pointer is no valid argument)."""
    return torch.empty(T, **kind) if T else torch.empty(1, **kind)[:0]


def _on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The tensors' CUDA device for the launch (Triton launches on the current one)."""
    if device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        return torch.cuda.device(device)
    return contextlib.nullcontext()
