"""QLA's Triton kernels, one program per (chunk, head, d_v block); ``qla_triton`` launches them.

Every kernel reads its chunk's rows from ``Bounds [3, slots]`` (first row, end row, first
candidate row of the chunk's sequence; an unused slot is all zero, so it has no rows) and keeps
a ``BLOCK_DK x DV_BLOCK`` slice of the state in registers. ``States`` and ``Grads`` are
``[slots, H, BLOCK_DK, DV_PAD]`` per-chunk buffers; the d_v block ``vb`` owns columns
``vb * DV_BLOCK ...``. Scale is a one-element tensor in the compute dtype (a float argument
would be fp32 in Triton and cost fp64 runs 1e-8 of error).

Row loops load with column masks only (they walk the chunk's rows) and call no jit helper: the
interpreter re-patches the language on every helper call, about 3 ms each. Helpers run once per
program, outside those loops.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chunk(Bounds, n_slots, c, BLOCK_T: tl.constexpr):
    """Chunk c's first row, end (exclusive, within its sequence) and first candidate row."""
    row0 = tl.load(Bounds + c)
    chunk_end = tl.minimum(row0 + BLOCK_T, tl.load(Bounds + n_slots + c))
    return row0, chunk_end, tl.load(Bounds + 2 * n_slots + c)


@triton.jit
def _program(
    Bounds, n_slots, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
    DV_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """This program's (chunk, head, d_v block), its chunk's rows (``_chunk``), the d_k offsets
    and d_v block columns with their masks: every kernel's opening, once per program."""
    c, h, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0, chunk_end, hist_end = _chunk(Bounds, n_slots, c, BLOCK_T)
    offs_dk = tl.arange(0, BLOCK_DK)
    cols_v = vb * DV_BLOCK + tl.arange(0, DV_BLOCK)
    return c, h, vb, row0, chunk_end, hist_end, offs_dk, cols_v, offs_dk < DK, cols_v < DV


@triton.jit
def _tile(ptr, rows, row_end, cols, D: tl.constexpr, stride_t):
    mask = (rows[:, None] < row_end) & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _state_ptrs(States, c, h, stride_sc, stride_sh, stride_sk, offs_dk, cols_v):
    """Chunk c's, head h's state slice: rows offs_dk, the d_v block's columns cols_v."""
    base = States + c * stride_sc + h * stride_sh
    return base + offs_dk[:, None] * stride_sk + cols_v[None, :]


@triton.jit
def _chunk_sums(
    Q, K, V, DO, States, Sums, Bounds, n_slots, stride_qt, stride_qh, stride_vt, stride_vh,
    stride_sc, stride_sh, stride_sk, Scale, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, DV_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
    PSI_SILU: tl.constexpr, GRAD: tl.constexpr,
):  # fmt: skip
    """Per chunk: the forward's ``scale * sum fk_j^T v_j`` over its history rows, or (GRAD) the
    backward's ``sum dS_i``, ``dS_i = fq_i^T do_i * psi'(S_i)``, its rows' states S_i rebuilt
    from the chunk's start state in States. K shares q's strides, DO v's; Sums, States' layout."""
    c, h, _, row0, chunk_end, hist_end, offs_dk, cols_v, mk, mv = _program(
        Bounds, n_slots, DK, DV, BLOCK_DK, DV_BLOCK, BLOCK_T
    )
    q_ptr, k_ptr = Q + h * stride_qh, K + h * stride_qh
    v_ptr, do_ptr = V + h * stride_vh, DO + h * stride_vh
    scale = tl.load(Scale)
    zero = scale * 0.0
    s_ptrs = _state_ptrs(Sums, c, h, stride_sc, stride_sh, stride_sk, offs_dk, cols_v)
    if not GRAD:
        rows = row0 + tl.arange(0, BLOCK_T)
        k = _tile(k_ptr, rows, tl.minimum(chunk_end, hist_end), offs_dk, DK, stride_qt) * scale
        v = _tile(v_ptr, rows, chunk_end, cols_v, DV, stride_vt)
        total = tl.dot(tl.trans(k), v, input_precision="ieee")
    elif PSI_SILU:  # psi' depends on each row's state: walk the rows, state in registers
        state = tl.load(_state_ptrs(States, c, h, stride_sc, stride_sh, stride_sk, offs_dk, cols_v))
        total = tl.zeros((BLOCK_DK, DV_BLOCK), dtype=state.dtype)
        for r in range(chunk_end - row0):
            row = row0 + r
            hist_scale = tl.where(row < hist_end, scale, zero)
            k = tl.load(k_ptr + row * stride_qt + offs_dk, mask=mk, other=0.0) * hist_scale
            v = tl.load(v_ptr + row * stride_vt + cols_v, mask=mv, other=0.0)
            state += k[:, None] * v[None, :]
            q = tl.load(q_ptr + row * stride_qt + offs_dk, mask=mk, other=0.0)
            do = tl.load(do_ptr + row * stride_vt + cols_v, mask=mv, other=0.0)
            sig = 1.0 / (1.0 + tl.exp(-state))
            total += q[:, None] * do[None, :] * (sig * (1.0 + state * (1.0 - sig)))
    else:
        rows = row0 + tl.arange(0, BLOCK_T)
        q = _tile(q_ptr, rows, chunk_end, offs_dk, DK, stride_qt)
        do = _tile(do_ptr, rows, chunk_end, cols_v, DV, stride_vt)
        total = tl.dot(tl.trans(q), do, input_precision="ieee")
    tl.store(s_ptrs, total)


@triton.jit
def _exclusive_scan(
    Sums, ChunkOffsets, stride_sc, stride_sh, stride_sk,
    BLOCK_DK: tl.constexpr, DV_BLOCK: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    """In place, per (sequence, head, d_v block): each chunk's sum becomes the sum of the
    sequence's earlier (REVERSE: later) chunks, added forwards (never a total minus a part)."""
    b, h, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c0, c1 = tl.load(ChunkOffsets + b), tl.load(ChunkOffsets + b + 1)
    offs_dk, cols_v = tl.arange(0, BLOCK_DK), vb * DV_BLOCK + tl.arange(0, DV_BLOCK)
    running = tl.zeros((BLOCK_DK, DV_BLOCK), dtype=Sums.dtype.element_ty)
    for i in range(c1 - c0):
        c = c1 - 1 - i if REVERSE else c0 + i
        ptrs = _state_ptrs(Sums, c, h, stride_sc, stride_sh, stride_sk, offs_dk, cols_v)
        chunk_sum = tl.load(ptrs)
        tl.store(ptrs, running)
        running += chunk_sum


@triton.jit
def _qla_fwd(
    Q, K, V, O, States, Bounds, n_slots, stride_qt, stride_qh, stride_vt, stride_vh,
    stride_sc, stride_sh, stride_sk, Scale, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, DV_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
    PSI_SILU: tl.constexpr,
):  # fmt: skip
    """A chunk's outputs for one d_v block from its start state. O shares v's strides."""
    c, h, _, row0, chunk_end, hist_end, offs_dk, cols_v, mk, mv = _program(
        Bounds, n_slots, DK, DV, BLOCK_DK, DV_BLOCK, BLOCK_T
    )
    q_ptr, k_ptr = Q + h * stride_qh, K + h * stride_qh
    v_ptr, o_ptr = V + h * stride_vh, O + h * stride_vh
    scale = tl.load(Scale)
    zero = scale * 0.0
    s_ptrs = _state_ptrs(States, c, h, stride_sc, stride_sh, stride_sk, offs_dk, cols_v)
    state = tl.load(s_ptrs)
    if PSI_SILU:  # psi(S_i) is not a sum of per-key terms: one row at a time
        for r in range(chunk_end - row0):
            row = row0 + r
            q = tl.load(q_ptr + row * stride_qt + offs_dk, mask=mk, other=0.0)
            k = tl.load(k_ptr + row * stride_qt + offs_dk, mask=mk, other=0.0)
            v = tl.load(v_ptr + row * stride_vt + cols_v, mask=mv, other=0.0)
            hist_scale = tl.where(row < hist_end, scale, zero)
            state += (k * hist_scale)[:, None] * v[None, :]
            out = tl.sum(q[:, None] * (state / (1.0 + tl.exp(-state))), axis=0)
            diag = tl.where(row < hist_end, zero, tl.sum(q * k) * scale)
            tl.store(o_ptr + row * stride_vt + cols_v, out + diag * v, mask=mv)
    else:  # linear in the rows: the tile product of linear attention
        rows = row0 + tl.arange(0, BLOCK_T)
        is_hist = rows < hist_end
        q = _tile(q_ptr, rows, chunk_end, offs_dk, DK, stride_qt)
        k = _tile(k_ptr, rows, chunk_end, offs_dk, DK, stride_qt)
        v = _tile(v_ptr, rows, chunk_end, cols_v, DV, stride_vt)
        kh = tl.where(is_hist[:, None], k, 0.0) * scale
        causal = tl.arange(0, BLOCK_T)[:, None] >= tl.arange(0, BLOCK_T)[None, :]
        qk = tl.where(causal, tl.dot(q, tl.trans(kh), input_precision="ieee"), 0.0)
        out = tl.dot(q, state, input_precision="ieee")
        out += tl.dot(qk.to(state.dtype), v, input_precision="ieee")
        diag = tl.where(is_hist, 0.0, tl.sum(q * k, axis=1) * scale)
        out += diag[:, None] * v
        mask = (rows[:, None] < chunk_end) & (cols_v[None, :] < DV)
        tl.store(o_ptr + rows[:, None] * stride_vt + cols_v[None, :], out, mask=mask)


@triton.jit
def _qla_bwd(
    Q, K, V, DO, DQP, DKP, DV_, States, Grads, Bounds, n_slots, stride_qt, stride_qh,
    stride_vt, stride_vh, stride_pb, stride_sc, stride_sh, stride_sk, Scale,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, DV_BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr, SUB_T: tl.constexpr, PSI_SILU: tl.constexpr,
):  # fmt: skip
    """A chunk's gradients for one d_v block, from its start state S and G, the sum of dS over
    the sequence's later chunks. dq, dk sum over d_v, so DQP, DKP ([d_v blocks, T, H, dk], q's
    row strides, block stride stride_pb) take this block's part; DV_ shares v's strides."""
    c, h, vb, row0, chunk_end, hist_end, offs_dk, cols_v, mk, mv = _program(
        Bounds, n_slots, DK, DV, BLOCK_DK, DV_BLOCK, BLOCK_T
    )
    q_ptr, k_ptr = Q + h * stride_qh, K + h * stride_qh
    v_ptr, do_ptr, dv_ptr = V + h * stride_vh, DO + h * stride_vh, DV_ + h * stride_vh
    dq_ptr, dk_ptr = DQP + vb * stride_pb + h * stride_qh, DKP + vb * stride_pb + h * stride_qh
    scale = tl.load(Scale)
    zero = scale * 0.0
    start = tl.load(_state_ptrs(States, c, h, stride_sc, stride_sh, stride_sk, offs_dk, cols_v))
    g = tl.load(_state_ptrs(Grads, c, h, stride_sc, stride_sh, stride_sk, offs_dk, cols_v))
    hist_end_c = tl.minimum(chunk_end, hist_end)
    if PSI_SILU:
        # Rows last to first, G growing by each row's dS. A row's state is recomputed from the
        # chunk start (a sub-block start by one masked product over the chunk, then the row by
        # one over its sub-block), never recovered as a later state minus rows.
        rows_c = row0 + tl.arange(0, BLOCK_T)
        offs_s = tl.arange(0, SUB_T)
        num_sub = tl.cdiv(chunk_end - row0, SUB_T)
        for sb in range(num_sub):
            s0 = row0 + (num_sub - 1 - sb) * SUB_T
            k_c = _tile(k_ptr, rows_c, tl.minimum(hist_end_c, s0), offs_dk, DK, stride_qt)
            v_c = _tile(v_ptr, rows_c, chunk_end, cols_v, DV, stride_vt)
            sub_start = start + tl.dot(tl.trans(k_c * scale), v_c, input_precision="ieee")
            k_s = _tile(k_ptr, s0 + offs_s, hist_end_c, offs_dk, DK, stride_qt) * scale
            v_s = _tile(v_ptr, s0 + offs_s, chunk_end, cols_v, DV, stride_vt)
            n_rows = tl.minimum(chunk_end - s0, SUB_T)
            for rr in range(n_rows):
                r = n_rows - 1 - rr
                row = s0 + r
                k_upto = tl.where(offs_s[:, None] <= r, k_s, 0.0)
                state = sub_start + tl.dot(tl.trans(k_upto), v_s, input_precision="ieee")
                q = tl.load(q_ptr + row * stride_qt + offs_dk, mask=mk, other=0.0)
                k = tl.load(k_ptr + row * stride_qt + offs_dk, mask=mk, other=0.0)
                v = tl.load(v_ptr + row * stride_vt + cols_v, mask=mv, other=0.0)
                do = tl.load(do_ptr + row * stride_vt + cols_v, mask=mv, other=0.0)
                sig = 1.0 / (1.0 + tl.exp(-state))
                g += q[:, None] * do[None, :] * (sig * (1.0 + state * (1.0 - sig)))
                hist_scale = tl.where(row < hist_end, scale, zero)
                cand_scale = scale - hist_scale
                vdo = tl.sum(v * do) * cand_scale  # candidates' diagonal terms
                dq = tl.sum((state * sig) * do[None, :], axis=1) + vdo * k
                dk = tl.sum(g * v[None, :], axis=1) * hist_scale + vdo * q
                dv = tl.sum(g * k[:, None], axis=0) * hist_scale + tl.sum(q * k) * cand_scale * do
                tl.store(dq_ptr + row * stride_qt + offs_dk, dq, mask=mk)
                tl.store(dk_ptr + row * stride_qt + offs_dk, dk, mask=mk)
                tl.store(dv_ptr + row * stride_vt + cols_v, dv, mask=mv)
    else:  # linear in the rows: tile products with a causal mask
        rows = row0 + tl.arange(0, BLOCK_T)
        is_hist = rows < hist_end
        dt = start.dtype
        q = _tile(q_ptr, rows, chunk_end, offs_dk, DK, stride_qt)
        k = _tile(k_ptr, rows, chunk_end, offs_dk, DK, stride_qt)
        v = _tile(v_ptr, rows, chunk_end, cols_v, DV, stride_vt)
        do = _tile(do_ptr, rows, chunk_end, cols_v, DV, stride_vt)
        hist_scale = tl.where(is_hist, scale, zero)[:, None]
        kh = k * hist_scale
        causal = tl.arange(0, BLOCK_T)[:, None] >= tl.arange(0, BLOCK_T)[None, :]  # row i reads j
        dov = tl.where(causal, tl.dot(do, tl.trans(v), input_precision="ieee"), 0.0)
        dq = tl.dot(do, tl.trans(start), input_precision="ieee")
        dq += tl.dot(dov.to(dt), kh, input_precision="ieee")
        dk = tl.dot(v, tl.trans(g), input_precision="ieee")
        dk += tl.dot(tl.trans(dov).to(dt), q, input_precision="ieee")
        dk = dk * hist_scale
        qk = tl.where(causal, tl.dot(q, tl.trans(kh), input_precision="ieee"), 0.0)
        dv = tl.dot(kh, g, input_precision="ieee")
        dv += tl.dot(tl.trans(qk).to(dt), do, input_precision="ieee")
        cand_scale = scale - hist_scale
        vdo = tl.sum(v * do, axis=1)[:, None] * cand_scale
        dq += vdo * k
        dk += vdo * q
        dv += tl.sum(q * k, axis=1)[:, None] * cand_scale * do
        mk = (rows[:, None] < chunk_end) & (offs_dk[None, :] < DK)
        mv = (rows[:, None] < chunk_end) & (cols_v[None, :] < DV)
        q_off = rows[:, None] * stride_qt + offs_dk[None, :]
        tl.store(dq_ptr + q_off, dq, mask=mk)
        tl.store(dk_ptr + q_off, dk, mask=mk)
        tl.store(dv_ptr + rows[:, None] * stride_vt + cols_v[None, :], dv, mask=mv)
