"""Backward kernels.

s = alpha q.k + bias, p = silu(s) m / N, o = p v; with sg = sigmoid(s):
  dv_j = sum_i p_ij do_i
  ds_ij = (do_i . v_j) * sg (1 + s (1 - sg)) m / N
  dk_j = alpha sum_i ds_ij q_i,  dq_i = alpha sum_j ds_ij k_j,  d bias_ij = ds_ij
There is no softmax, so no row statistics are saved: both kernels recompute s from q and k.

``_dkdv_program``: one program per (head, BLOCK_N key tile), walking the query blocks of its mask
column (the BlockMask's transposed q_* lists). With FUSE_DQ it also adds each tile's dq
contribution into an fp32 buffer with atomics; otherwise ``_dq_program`` (one program per query
tile, like the forward) computes dq. They run as two kernels (``split``), or as one launch
(``hstu_bwd_merged_kernel``). The bias-table gradients are accumulated by the dk/dv programs with
fp32 atomics.

With RAB_TILES (kernel.rab_tiles) both kinds of program read the bias as precomputed tiles
(``Bias``, [slots, MASK_BLOCK_Q, MASK_BLOCK_KV] fp32, the slot of each listed block in the slot
tables aligned with the block lists), and the dk/dv programs add each pair's dS into ``DBias``
(same layout: only the H heads' programs add into one address) instead of the table
gradients; ``launch`` reduces it into dpos_w / dts_w with ``rab_tile_kernels.rab_reduce_kernel``.
"""

import triton
import triton.language as tl

from flexgr.ops.triton_hstu.rules import (
    hstu_valid, load_rows, query_bias_tile, rab_index, score_scale, silu_and_slope,
)


@triton.jit
def _dkdv_visit(
    dk, dv, k, v, offs_n, k_seq, k_pos, k_local, k_ts,
    Q, DO, DQacc, stride_qt, stride_dot, stride_dqt,
    SeqId, PosId, MaxId, Local, NextTs, PosW, TsW, DPosW, DTsW, Bias, DBias, slot_list,
    block_list, num_blocks, T, alpha, out_scale, dq_scale, window, tail, global_len,
    rab_n, num_buckets, bucket_div,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_BLOCK_Q: tl.constexpr,
    MASK_BLOCK_KV: tl.constexpr, IS_FULL: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_TILES: tl.constexpr, FUSE_DQ: tl.constexpr, FAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RAB_LANES: tl.constexpr,
):
    SUB: tl.constexpr = MASK_BLOCK_Q // BLOCK_M
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    scale = score_scale(alpha, FAST)
    bias_scale = score_scale(1.0, FAST)
    for t in range(0, num_blocks * SUB):
        blk = tl.load(block_list + t // SUB)
        offs_m = blk * MASK_BLOCK_Q + (t % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q = load_rows(
            Q + offs_m[:, None] * stride_qt + offs_dk[None, :], row_ok, offs_dk,
            DQK, BLOCK_DQK, IS_FULL,
        )
        do = load_rows(
            DO + offs_m[:, None] * stride_dot + offs_dv[None, :], row_ok, offs_dv,
            DV, BLOCK_DV, IS_FULL,
        )
        # Transposed tiles [keys, queries]: dk and dv then come out of plain dots.
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale
        if HAS_RAB:
            if RAB_TILES:
                # The transposed tile [keys, queries] of this block's slot: queries are its
                # rows, keys its columns (padded pairs hold finite values: no mask).
                # 64-bit slot base as a scalar, int32 offsets inside the block: the offsets
                # stay live until the dS atomics below, at one register an element, not two.
                slot = tl.load(slot_list + t // SUB).to(tl.int64)
                slot_at = slot * (MASK_BLOCK_Q * MASK_BLOCK_KV)
                q_in = (t % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
                in_block = q_in[None, :] * MASK_BLOCK_KV + (offs_n % MASK_BLOCK_KV)[:, None]
                bias = tl.load(Bias + slot_at + in_block)
            else:
                q_local = tl.load(Local + offs_m)
                q_next_ts = tl.load(NextTs + offs_m, mask=row_ok, other=0)
                rel, bucket = rab_index(
                    q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets, bucket_div, True
                )
                bias = tl.load(PosW + rel).to(tl.float32) + tl.load(TsW + bucket).to(tl.float32)
            sT += bias * bias_scale
        pT, slopeT = silu_and_slope(sT, FAST)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = dpT * slopeT
        if not IS_FULL:
            q_seq = tl.load(SeqId + offs_m)
            q_pos = tl.load(PosId + offs_m)
            q_max = tl.load(MaxId + offs_m)
            valid = hstu_valid(
                offs_m, q_seq, q_pos, q_max, offs_n, k_seq, k_pos, window, tail, global_len,
                HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, True,
            )
            pT = tl.where(valid, pT, 0.0)
            dsT = tl.where(valid, dsT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        ds_lo = dsT.to(q.dtype)
        dk = tl.dot(ds_lo, q, dk, input_precision=DOT_PRECISION)
        if FUSE_DQ:
            dq_part = tl.dot(tl.trans(ds_lo), k, input_precision=DOT_PRECISION) * dq_scale
            tl.atomic_add(
                DQacc + offs_m[:, None] * stride_dqt + offs_dk[None, :], dq_part,
                mask=row_ok[:, None] & (offs_dk[None, :] < DQK), sem="relaxed",
            )
        if HAS_RAB and RAB_TILES:
            # d bias = ds (with p's 1/N) into the pair's own address: only the H heads'
            # programs add there. Masked-off pairs send no atomics at all.
            g = dsT * out_scale
            if IS_FULL:
                tl.atomic_add(DBias + slot_at + in_block, g, sem="relaxed")
            else:
                tl.atomic_add(DBias + slot_at + in_block, g, mask=valid, sem="relaxed")
        elif HAS_RAB:
            # d bias = ds (with p's 1/N). Masked-off pairs send no atomics at all.
            g = dsT * out_scale
            pos_at = DPosW + rel
            ts_at = DTsW + bucket
            if RAB_LANES > 1:
                # Threads of one atomic instruction hold neighbouring rows and columns, which
                # often share a time bucket (and, a few rows apart, a diagonal): give each
                # (row mod L, column mod L) its own copy so one instruction never adds twice
                # into one address. The copies are summed after the launch.
                lane_n = (offs_n % RAB_LANES)[:, None]
                lane_m = (offs_m % RAB_LANES)[None, :]
                pos_at += lane_n * (2 * rab_n - 1)
                ts_at += (lane_n * RAB_LANES + lane_m) * (num_buckets + 1)
            if IS_FULL:
                tl.atomic_add(pos_at, g, sem="relaxed")
                tl.atomic_add(ts_at, g, sem="relaxed")
            else:
                tl.atomic_add(pos_at, g, mask=valid, sem="relaxed")
                tl.atomic_add(ts_at, g, mask=valid, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_program(
    pid_n, head,
    Q, K, V, DO, GradK, GradV, DQacc,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    SeqId, PosId, MaxId, Local, Ts, NextTs, PosW, TsW, DPosW, DTsW, Bias, DBias, QSlot, FullQSlot,
    QNum, QIdx, FullQNum, FullQIdx, q_idx_stride,
    T, alpha, out_scale, window, tail, global_len, rab_n, num_buckets, bucket_div,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCK_Q: tl.constexpr, MASK_BLOCK_KV: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_TILES: tl.constexpr, FUSE_DQ: tl.constexpr, FAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RAB_LANES: tl.constexpr,
):
    start_n = pid_n * BLOCK_N
    mask_col = start_n // MASK_BLOCK_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < T
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh
    DO += head * stride_doh
    GradK += head * stride_dkh
    GradV += head * stride_dvh
    DQacc += head * stride_dqh
    k = load_rows(
        K + offs_n[:, None] * stride_kt + offs_dk[None, :], col_ok, offs_dk, DQK, BLOCK_DQK, False
    )
    v = load_rows(
        V + offs_n[:, None] * stride_vt + offs_dv[None, :], col_ok, offs_dv, DV, BLOCK_DV, False
    )
    k_seq = tl.load(SeqId + offs_n)
    k_pos = tl.load(PosId + offs_n)
    if HAS_RAB and not RAB_TILES:
        k_local = tl.load(Local + offs_n)
        k_ts = tl.load(Ts + offs_n, mask=col_ok, other=0)
    else:
        k_local = k_pos
        k_ts = k_pos
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dq_scale = alpha * out_scale

    num_partial = tl.load(QNum + mask_col)
    dk, dv = _dkdv_visit(
        dk, dv, k, v, offs_n, k_seq, k_pos, k_local, k_ts,
        Q, DO, DQacc, stride_qt, stride_dot, stride_dqt,
        SeqId, PosId, MaxId, Local, NextTs, PosW, TsW, DPosW, DTsW,
        Bias, DBias, QSlot + mask_col * q_idx_stride,
        QIdx + mask_col * q_idx_stride, num_partial, T, alpha, out_scale, dq_scale, window, tail,
        global_len,
        rab_n, num_buckets, bucket_div,
        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV, False,
        HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, FUSE_DQ,
        FAST, DOT_PRECISION,
        RAB_LANES,
    )
    num_full = tl.load(FullQNum + mask_col)
    dk, dv = _dkdv_visit(
        dk, dv, k, v, offs_n, k_seq, k_pos, k_local, k_ts,
        Q, DO, DQacc, stride_qt, stride_dot, stride_dqt,
        SeqId, PosId, MaxId, Local, NextTs, PosW, TsW, DPosW, DTsW,
        Bias, DBias, FullQSlot + mask_col * q_idx_stride,
        FullQIdx + mask_col * q_idx_stride, num_full, T, alpha, out_scale, dq_scale, window, tail,
        global_len,
        rab_n, num_buckets, bucket_div,
        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV, True,
        HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, FUSE_DQ,
        FAST, DOT_PRECISION,
        RAB_LANES,
    )
    if DQK == BLOCK_DQK:
        dk_mask = col_ok[:, None]
    else:
        dk_mask = col_ok[:, None] & (offs_dk[None, :] < DQK)
    if DV == BLOCK_DV:
        dv_mask = col_ok[:, None]
    else:
        dv_mask = col_ok[:, None] & (offs_dv[None, :] < DV)
    tl.store(
        GradK + offs_n[:, None] * stride_dkt + offs_dk[None, :],
        (dk * dq_scale).to(GradK.dtype.element_ty), mask=dk_mask,
    )
    tl.store(
        GradV + offs_n[:, None] * stride_dvt + offs_dv[None, :],
        (dv * out_scale).to(GradV.dtype.element_ty), mask=dv_mask,
    )



@triton.jit
def hstu_bwd_dkdv_kernel(
    Q, K, V, DO, GradK, GradV, DQacc,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    SeqId, PosId, MaxId, Local, Ts, NextTs, PosW, TsW, DPosW, DTsW, Bias, DBias, QSlot, FullQSlot,
    QNum, QIdx, FullQNum, FullQIdx, q_idx_stride, TileOrder,
    T, alpha, out_scale, window, tail, global_len, rab_n, num_buckets, bucket_div,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCK_Q: tl.constexpr, MASK_BLOCK_KV: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_TILES: tl.constexpr, FUSE_DQ: tl.constexpr, FAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RAB_LANES: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    pid_n = tl.load(TileOrder + tl.program_id(1))
    _dkdv_program(
        pid_n, head, Q, K, V, DO, GradK, GradV, DQacc, stride_qt, stride_qh, stride_kt,
        stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh,
        stride_dvt, stride_dvh, stride_dqt, stride_dqh, SeqId, PosId, MaxId, Local, Ts,
        NextTs, PosW, TsW, DPosW, DTsW, Bias, DBias, QSlot, FullQSlot,
        QNum, QIdx, FullQNum, FullQIdx, q_idx_stride, T,
        alpha, out_scale, window, tail, global_len, rab_n, num_buckets, bucket_div, DQK, DV,
        BLOCK_DQK,
        BLOCK_DV, BLOCK_M, BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV, HAS_TARGETS, HAS_CONTEXT,
        HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, FUSE_DQ, FAST, DOT_PRECISION,
        RAB_LANES,
    )


@triton.jit
def _dq_visit(
    dq, q, do, offs_m, q_seq, q_pos, q_max, q_local, q_next_ts,
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
        row_ok = offs_n < T
        k = load_rows(
            K + offs_n[:, None] * stride_kt + offs_dk[None, :], row_ok, offs_dk,
            DQK, BLOCK_DQK, IS_FULL,
        )
        v = load_rows(
            V + offs_n[:, None] * stride_vt + offs_dv[None, :], row_ok, offs_dv,
            DV, BLOCK_DV, IS_FULL,
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
        _, slope = silu_and_slope(s, FAST)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = dp * slope
        if not IS_FULL:
            k_seq = tl.load(SeqId + offs_n)
            k_pos = tl.load(PosId + offs_n)
            valid = hstu_valid(
                offs_m, q_seq, q_pos, q_max, offs_n, k_seq, k_pos, window, tail, global_len,
                HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, False,
            )
            ds = tl.where(valid, ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_program(
    pid_m, head,
    Q, K, V, DO, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    SeqId, PosId, MaxId, Local, Ts, NextTs, PosW, TsW, Bias, KvSlot, FullKvSlot,
    KvNum, KvIdx, FullKvNum, FullKvIdx, kv_idx_stride,
    T, alpha, out_scale, window, tail, global_len, rab_n, num_buckets, bucket_div,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCK_Q: tl.constexpr, MASK_BLOCK_KV: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_TILES: tl.constexpr, FAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = pid_m * BLOCK_M
    mask_row = start_m // MASK_BLOCK_Q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh
    DO += head * stride_doh
    DQ += head * stride_dqh
    q = load_rows(
        Q + offs_m[:, None] * stride_qt + offs_dk[None, :], row_ok, offs_dk, DQK, BLOCK_DQK, False
    )
    do = load_rows(
        DO + offs_m[:, None] * stride_dot + offs_dv[None, :], row_ok, offs_dv, DV, BLOCK_DV, False
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
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)

    num_partial = tl.load(KvNum + mask_row)
    dq = _dq_visit(
        dq, q, do, offs_m, q_seq, q_pos, q_max, q_local, q_next_ts,
        K, V, stride_kt, stride_vt, SeqId, PosId, Local, Ts, PosW, TsW,
        Bias, KvSlot + mask_row * kv_idx_stride,
        KvIdx + mask_row * kv_idx_stride, num_partial, T, alpha, window, tail, global_len,
        rab_n, num_buckets, bucket_div,
        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV, False,
        HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, FAST,
        DOT_PRECISION,
    )
    num_full = tl.load(FullKvNum + mask_row)
    dq = _dq_visit(
        dq, q, do, offs_m, q_seq, q_pos, q_max, q_local, q_next_ts,
        K, V, stride_kt, stride_vt, SeqId, PosId, Local, Ts, PosW, TsW,
        Bias, FullKvSlot + mask_row * kv_idx_stride,
        FullKvIdx + mask_row * kv_idx_stride, num_full, T, alpha, window, tail, global_len,
        rab_n, num_buckets, bucket_div,
        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV, True,
        HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, FAST,
        DOT_PRECISION,
    )
    if DQK == BLOCK_DQK:
        dq_mask = row_ok[:, None]
    else:
        dq_mask = row_ok[:, None] & (offs_dk[None, :] < DQK)
    tl.store(
        DQ + offs_m[:, None] * stride_dqt + offs_dk[None, :],
        (dq * (alpha * out_scale)).to(DQ.dtype.element_ty), mask=dq_mask,
    )

@triton.jit
def hstu_bwd_dq_kernel(
    Q, K, V, DO, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
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
    _dq_program(
        pid_m, head, Q, K, V, DO, DQ, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
        stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh, SeqId, PosId, MaxId,
        Local, Ts, NextTs, PosW, TsW, Bias, KvSlot, FullKvSlot,
        KvNum, KvIdx, FullKvNum, FullKvIdx, kv_idx_stride, T,
        alpha, out_scale, window, tail, global_len, rab_n, num_buckets, bucket_div, DQK, DV,
        BLOCK_DQK,
        BLOCK_DV, BLOCK_M, BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV, HAS_TARGETS, HAS_CONTEXT,
        HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, FAST, DOT_PRECISION,
    )


@triton.jit
def hstu_bwd_merged_kernel(
    Q, K, V, DO, GradK, GradV, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    SeqId, PosId, MaxId, Local, Ts, NextTs, PosW, TsW, DPosW, DTsW,
    Bias, DBias, QSlot, FullQSlot, KvSlot, FullKvSlot,
    QNum, QIdx, FullQNum, FullQIdx, q_idx_stride,
    KvNum, KvIdx, FullKvNum, FullKvIdx, kv_idx_stride, MergedOrder, num_kv_tiles,
    T, alpha, out_scale, window, tail, global_len, rab_n, num_buckets, bucket_div,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    KV_BLOCK_M: tl.constexpr, KV_BLOCK_N: tl.constexpr,
    Q_BLOCK_M: tl.constexpr, Q_BLOCK_N: tl.constexpr,
    MASK_BLOCK_Q: tl.constexpr, MASK_BLOCK_KV: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_RAB: tl.constexpr, RAB_TILES: tl.constexpr, FAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RAB_LANES: tl.constexpr,
):
    """dk/dv programs and dq programs in one launch, heaviest first across both kinds, so the
    tail of one kernel no longer idles the GPU before the other starts."""
    head = tl.program_id(0).to(tl.int64)
    vid = tl.load(MergedOrder + tl.program_id(1))
    if vid < num_kv_tiles:
        _dkdv_program(
            vid, head, Q, K, V, DO, GradK, GradV, DQ,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
            stride_dqt, stride_dqh,
            SeqId, PosId, MaxId, Local, Ts, NextTs, PosW, TsW, DPosW, DTsW,
            Bias, DBias, QSlot, FullQSlot,
            QNum, QIdx, FullQNum, FullQIdx, q_idx_stride,
            T, alpha, out_scale, window, tail, global_len, rab_n, num_buckets, bucket_div,
            DQK, DV, BLOCK_DQK, BLOCK_DV, KV_BLOCK_M, KV_BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV,
            HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, False,
            FAST, DOT_PRECISION,
            RAB_LANES,
        )
    else:
        _dq_program(
            vid - num_kv_tiles, head, Q, K, V, DO, DQ,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            stride_dot, stride_doh, stride_dqt, stride_dqh,
            SeqId, PosId, MaxId, Local, Ts, NextTs, PosW, TsW, Bias, KvSlot, FullKvSlot,
            KvNum, KvIdx, FullKvNum, FullKvIdx, kv_idx_stride,
            T, alpha, out_scale, window, tail, global_len, rab_n, num_buckets, bucket_div,
            DQK, DV, BLOCK_DQK, BLOCK_DV, Q_BLOCK_M, Q_BLOCK_N, MASK_BLOCK_Q, MASK_BLOCK_KV,
            HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_TAIL, HAS_GLOBAL, HAS_RAB, RAB_TILES, FAST,
            DOT_PRECISION,
        )
