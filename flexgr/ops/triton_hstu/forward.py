"""Forward kernel: one program per (head, BLOCK_M query tile).

The tile visits only the KV blocks that the BlockMask lists for its mask row: first the partial
blocks (element mask evaluated inline), then the full ones (no mask). A mask block of
MASK_BLOCK_KV columns is walked in MASK_BLOCK_KV // BLOCK_N sub-tiles; BLOCK_M divides
MASK_BLOCK_Q, so a query tile lies inside one mask row. Tiles are launched heaviest first
(``TileOrder``), which shortens the tail of jagged batches.

With RAB_TILES (kernel.rab_tiles) the bias comes as precomputed values per visited mask block
(``Bias``, [slots, MASK_BLOCK_Q, MASK_BLOCK_KV] fp32; the slot of each listed block in
``KvSlot`` / ``FullKvSlot``, aligned with the kv lists): one plain 2-D load per sub-tile instead
of the index arithmetic and two per-element table reads.
"""

import triton
import triton.language as tl

from flexgr.ops.triton_hstu.rules import (
    hstu_valid, load_rows, query_bias_tile, rab_index, score_scale, silu,
)


@triton.jit
def _fwd_visit(
    acc, q, offs_m, q_seq, q_pos, q_max, q_local, q_next_ts,
    K, V, stride_kt, stride_vt, SeqId, PosId, Local, Ts, PosW, TsW, Bias, slot_list,
    block_list, num_blocks, T, alpha, window, tail, global_len, rab_n, num_buckets, bucket_div,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_BLOCK_Q: tl.constexpr, MASK_BLOCK_KV: tl.constexpr,
    IS_FULL: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_TILES: tl.constexpr, FAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    SUB: tl.constexpr = MASK_BLOCK_KV // BLOCK_N
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    scale = score_scale(alpha, FAST)
    bias_scale = score_scale(1.0, FAST)
    for t in range(0, num_blocks * SUB):
        blk = tl.load(block_list + t // SUB)
        offs_n = blk * MASK_BLOCK_KV + (t % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        # Full blocks hold no padding tokens (padding is masked out): no row bound there.
        row_ok = offs_n < T
        k = load_rows(
            K + offs_n[:, None] * stride_kt + offs_dk[None, :], row_ok, offs_dk,
            DQK, BLOCK_DQK, IS_FULL,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if HAS_RAB:
            if RAB_TILES:
                bias = query_bias_tile(
                    Bias, slot_list, t, offs_m, SUB, BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV
                )
            else:
                k_local = tl.load(Local + offs_n)
                k_ts = tl.load(Ts + offs_n, mask=row_ok, other=0)
                rel, bucket = rab_index(
                    q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets, bucket_div, False
                )
                bias = tl.load(PosW + rel).to(tl.float32) + tl.load(TsW + bucket).to(tl.float32)
            s += bias * bias_scale
        p = silu(s, FAST)
        if not IS_FULL:
            k_seq = tl.load(SeqId + offs_n)
            k_pos = tl.load(PosId + offs_n)
            valid = hstu_valid(
                offs_m, q_seq, q_pos, q_max, offs_n, k_seq, k_pos, window, tail, global_len,
                HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, False,
            )
            p = tl.where(valid, p, 0.0)
        v = load_rows(
            V + offs_n[:, None] * stride_vt + offs_dv[None, :], row_ok, offs_dv,
            DV, BLOCK_DV, IS_FULL,
        )
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def hstu_fwd_kernel(
    Q, K, V, Out,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    SeqId, PosId, MaxId, Local, Ts, NextTs, PosW, TsW, Bias, KvSlot, FullKvSlot,
    KvNum, KvIdx, FullKvNum, FullKvIdx, kv_idx_stride, TileOrder,
    T, alpha, out_scale, window, tail, global_len, rab_n, num_buckets, bucket_div,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCK_Q: tl.constexpr, MASK_BLOCK_KV: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_TILES: tl.constexpr, FAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    pid_m = tl.load(TileOrder + tl.program_id(1))
    start_m = pid_m * BLOCK_M
    mask_row = start_m // MASK_BLOCK_Q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh
    Out += head * stride_oh
    q = load_rows(
        Q + offs_m[:, None] * stride_qt + offs_dk[None, :], row_ok, offs_dk, DQK, BLOCK_DQK, False
    )
    q_seq = tl.load(SeqId + offs_m)
    q_pos = tl.load(PosId + offs_m)
    q_max = tl.load(MaxId + offs_m)
    if HAS_RAB and not RAB_TILES:
        q_local = tl.load(Local + offs_m)
        q_next_ts = tl.load(NextTs + offs_m, mask=row_ok, other=0)
    else:
        q_local = q_pos
        q_next_ts = q_pos
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    num_partial = tl.load(KvNum + mask_row)
    acc = _fwd_visit(
        acc, q, offs_m, q_seq, q_pos, q_max, q_local, q_next_ts,
        K, V, stride_kt, stride_vt, SeqId, PosId, Local, Ts, PosW, TsW,
        Bias, KvSlot + mask_row * kv_idx_stride,
        KvIdx + mask_row * kv_idx_stride, num_partial, T, alpha, window, tail, global_len,
        rab_n, num_buckets, bucket_div,
        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV, False,
        HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, FAST,
        DOT_PRECISION,
    )
    num_full = tl.load(FullKvNum + mask_row)
    acc = _fwd_visit(
        acc, q, offs_m, q_seq, q_pos, q_max, q_local, q_next_ts,
        K, V, stride_kt, stride_vt, SeqId, PosId, Local, Ts, PosW, TsW,
        Bias, FullKvSlot + mask_row * kv_idx_stride,
        FullKvIdx + mask_row * kv_idx_stride, num_full, T, alpha, window, tail, global_len,
        rab_n, num_buckets, bucket_div,
        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV, True,
        HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, FAST,
        DOT_PRECISION,
    )
    out = acc * out_scale
    if DV == BLOCK_DV:
        out_mask = row_ok[:, None]
    else:
        out_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    tl.store(
        Out + offs_m[:, None] * stride_ot + offs_dv[None, :], out.to(Out.dtype.element_ty),
        mask=out_mask,
    )
