"""Triton kernels around the bias as tiles (``kernel.rab_tiles``): fill a layer's fp32 bias
values per slot, and reduce the per-pair bias gradient into the two tables.

Both work on one slot (a visited (query mask-block row, key mask-block column) pair) per program
and compute rel and bucket from the per-token tables as the inline kernels do, with the same
helper (``rules.rab_index``), so the values are bit-identical to the inline path's: no per-batch
index tiles, no torch gathers, no histogram that reads its input's range to the host.

Padded tokens (index >= T) read their padded position from ``Local`` ([P]) and timestamp 0, as
the inline kernels' masked loads give them: in-range indices, like every other pair.
"""

import triton
import triton.language as tl

from flexgr.ops.triton_hstu.rules import rab_index


@triton.jit
def rab_fill_kernel(
    Bias, SlotRow, SlotCol, Local, Ts, NextTs, PosW, TsW,
    T, rab_n, num_buckets, bucket_div,
    MASK_BLOCK_Q: tl.constexpr, MASK_BLOCK_KV: tl.constexpr, ROWS: tl.constexpr,
):
    """Bias[s] = pos_w[rel] + ts_w[bucket] in fp32 ([S, MASK_BLOCK_Q, MASK_BLOCK_KV]), ROWS query
    rows at a time; the two reads are widened to fp32 before the sum, as the inline path."""
    slot = tl.program_id(0).to(tl.int64)
    row0 = tl.load(SlotRow + slot) * MASK_BLOCK_Q  # first query and key token of the slot
    col0 = tl.load(SlotCol + slot) * MASK_BLOCK_KV
    offs_kv = tl.arange(0, MASK_BLOCK_KV)
    offs_n = col0 + offs_kv
    k_local = tl.load(Local + offs_n)
    k_ts = tl.load(Ts + offs_n, mask=offs_n < T, other=0)
    out = Bias + slot * (MASK_BLOCK_Q * MASK_BLOCK_KV)
    for r in range(0, MASK_BLOCK_Q, ROWS):
        rows = r + tl.arange(0, ROWS)
        offs_m = row0 + rows
        q_local = tl.load(Local + offs_m)
        q_next_ts = tl.load(NextTs + offs_m, mask=offs_m < T, other=0)
        rel, bucket = rab_index(
            q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets, bucket_div, False
        )
        bias = tl.load(PosW + rel).to(tl.float32) + tl.load(TsW + bucket).to(tl.float32)
        tl.store(out + rows[:, None] * MASK_BLOCK_KV + offs_kv[None, :], bias)


@triton.jit
def rab_reduce_kernel(
    DBias, SlotRow, SlotCol, SeqId, Local, Ts, NextTs, DPosW, DTsW,
    T, rab_n, num_buckets, bucket_div,
    MASK_BLOCK_Q: tl.constexpr, MASK_BLOCK_KV: tl.constexpr, ROWS: tl.constexpr,
    DIAG: tl.constexpr, DIAG_ROWS: tl.constexpr, TS_COPIES: tl.constexpr,
):
    """DPosW[rel] += DBias[s], DTsW[bucket] += DBias[s] (``tl.atomic_add``, in no fixed order:
    not deterministic, exact up to rounding; DPosW fp32, DTsW fp64). Both must start at zero.

    Time buckets: along a query row the keys of one sequence come in time order, so the bucket
    of |next_ts[q] - ts[k]| changes only a few times (it is log-spaced): the row splits into
    runs of equal buckets. With the row's running sum c (float64), the last element e of each
    run adds +c[e] to its bucket and -c[e] to the next run's, so each bucket receives the sums
    of its runs: two atomics a run instead of one a pair, and no one-hot histogram
    (num_buckets operations a pair). That holds for any order (a shuffled history only has
    shorter runs). DTsW is float64, so the telescoping terms cancel without fp32 rounding. The
    next key's bucket is recomputed to find the ends. Every row ends a run at its last column,
    so each program adds at least MASK_BLOCK_Q times into the ~num_buckets addresses: DTsW
    holds TS_COPIES copies of the table ([TS_COPIES, num_buckets + 1], slot s adds into copy
    s % TS_COPIES), which the caller sums, so fewer programs contend for one address.

    Positions: DBias is zero on the pairs of two different sequences and on padding (the
    kernels add dS only where the mask holds), so only pairs of one sequence count. Where the
    query and the key have the same shift ``local[t] - t`` (consecutive positions inside one
    sequence: every pair of a causal history), rel is ``N - 1 + key - query`` clamped, one
    value along each diagonal of the tile: the program sums the tile's MASK_BLOCK_Q +
    MASK_BLOCK_KV - 1 diagonals over those pairs (a skewed load, DIAG_ROWS rows at a time) and
    adds one atomic per diagonal. Pairs of one sequence whose shifts differ (HSTU's shared
    target ids) add their own atomic at their own rel."""
    slot = tl.program_id(0).to(tl.int64)
    row0 = tl.load(SlotRow + slot) * MASK_BLOCK_Q
    col0 = tl.load(SlotCol + slot) * MASK_BLOCK_KV
    offs_kv = tl.arange(0, MASK_BLOCK_KV)
    offs_n = col0 + offs_kv
    k_local = tl.load(Local + offs_n)
    k_ts = tl.load(Ts + offs_n, mask=offs_n < T, other=0)
    # The next key's timestamp (the last column's is never used: a run ends there anyway).
    has_next = offs_kv < MASK_BLOCK_KV - 1
    k_next_ts = tl.load(Ts + offs_n + 1, mask=has_next & (offs_n + 1 < T), other=0)
    k_seq = tl.load(SeqId + offs_n)
    k_shift = k_local - offs_n
    grad = DBias + slot * (MASK_BLOCK_Q * MASK_BLOCK_KV)
    DTsW += (slot % TS_COPIES) * (num_buckets + 1)

    for r in range(0, MASK_BLOCK_Q, ROWS):
        rows = r + tl.arange(0, ROWS)
        offs_m = row0 + rows
        q_local = tl.load(Local + offs_m)
        q_next_ts = tl.load(NextTs + offs_m, mask=offs_m < T, other=0)
        q_seq = tl.load(SeqId + offs_m)
        rel, bucket = rab_index(
            q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets, bucket_div, False
        )
        _, next_bucket = rab_index(
            q_local, q_next_ts, k_local, k_next_ts, rab_n, num_buckets, bucket_div, False
        )
        g = tl.load(grad + rows[:, None] * MASK_BLOCK_KV + offs_kv[None, :])
        same = (q_seq[:, None] == k_seq[None, :]) & (q_seq[:, None] >= 0)
        off_diagonal = same & ((q_local - offs_m)[:, None] != k_shift[None, :])
        tl.atomic_add(DPosW + rel, g, mask=off_diagonal, sem="relaxed")
        running = tl.cumsum(g.to(tl.float64), axis=1)
        ends = (bucket != next_bucket) | ~has_next[None, :]
        tl.atomic_add(DTsW + bucket, running, mask=ends, sem="relaxed")
        tl.atomic_add(DTsW + next_bucket, -running, mask=ends & has_next[None, :], sem="relaxed")

    # Diagonal d holds the pairs jj - ii = d - (MASK_BLOCK_Q - 1); those of one shift have rel
    # N - 1 + (col0 + jj) - (row0 + ii), clamped as rab_index clamps. Pairs of two sequences
    # may be summed too: their gradient is zero.
    n_diag = MASK_BLOCK_Q + MASK_BLOCK_KV - 1
    d = tl.arange(0, DIAG)
    diag_sum = tl.zeros([DIAG], dtype=tl.float32)
    for r in range(0, MASK_BLOCK_Q, DIAG_ROWS):
        rows = r + tl.arange(0, DIAG_ROWS)
        q_tok = row0 + rows
        q_shift = tl.load(Local + q_tok) - q_tok
        jj = d[None, :] - (MASK_BLOCK_Q - 1) + rows[:, None]
        on_tile = (jj >= 0) & (jj < MASK_BLOCK_KV)
        k_tok = col0 + jj
        k_shift_d = tl.load(Local + k_tok, mask=on_tile, other=0) - k_tok
        keep = on_tile & (q_shift[:, None] == k_shift_d)
        at = grad + rows[:, None] * MASK_BLOCK_KV + jj
        diag_sum += tl.sum(tl.load(at, mask=keep, other=0.0), axis=0)
    rel_d = rab_n - 1 + col0 - row0 + d - (MASK_BLOCK_Q - 1)
    rel_d = tl.minimum(tl.maximum(rel_d, 0), 2 * rab_n - 2)
    tl.atomic_add(DPosW + rel_d, diag_sum, mask=d < n_diag, sem="relaxed")
