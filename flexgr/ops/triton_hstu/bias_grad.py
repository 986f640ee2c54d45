"""Adding one backward tile's d bias into the gradients of the two bias tables.

Every visited pair (key n, query m) contributes g[n, m] to d pos_w[rel[n, m]] and to
d ts_w[bucket[n, m]]. One fp32 atomic per pair and table is correct but slow: with millions of
pairs the atomics, not the matmuls, set the backward's time (BENCHMARKS.md). Two cheaper routes,
each taken only when the tile allows it, otherwise per-pair atomics (with lane copies):

- positional: when the keys' and the queries' positions are consecutive (one sequence, no shared
  candidate position), rel = c0 + n - m, so the tile only touches BLOCK_N + BLOCK_M - 1 entries.
  The rows are rotated (row n by n columns) with a register gather, which puts each diagonal in
  one column, and summed down the columns: ~2 BLOCK_M atomics instead of BLOCK_N x BLOCK_M.
- time: buckets are log-spaced, so away from the diagonal a tile spans a handful of them when a
  user's timestamps are sorted. When at most TS_LOOP buckets occur, one masked tile sum per
  bucket and one atomic each.
"""

import triton
import triton.language as tl


@triton.jit
def _pos_diagonal_sums(g, DPosW, c0, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    n = tl.arange(0, BLOCK_N)[:, None]
    t = tl.arange(0, BLOCK_M)[None, :]
    # Column t of the rotated tile holds g[n, (n + t) mod BLOCK_M]: diagonal n - m = w BLOCK_M - t
    # where w = (n + t) // BLOCK_M counts the wrap-arounds.
    rotated = tl.gather(g, (n + t) % BLOCK_M, axis=1)
    wraps = (n + t) // BLOCK_M
    cols = tl.arange(0, BLOCK_M)
    NUM_WRAPS: tl.constexpr = (BLOCK_N + BLOCK_M - 2) // BLOCK_M + 1
    for w in tl.static_range(NUM_WRAPS):
        sums = tl.sum(tl.where(wraps == w, rotated, 0.0), axis=0)
        diag = w * BLOCK_M - cols
        ok = (diag > -BLOCK_M) & (diag < BLOCK_N)
        tl.atomic_add(DPosW + c0 + diag, sums, mask=ok, sem="relaxed")


@triton.jit
def add_bias_grads(
    g, rel, bucket, valid, offs_n, offs_m, k_local, q_local, DPosW, DTsW, rab_n, num_buckets,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, IS_FULL: tl.constexpr,
    RAB_LANES: tl.constexpr, REDUCE: tl.constexpr, TS_LOOP: tl.constexpr,
):
    """g [BLOCK_N keys, BLOCK_M queries] is already zero on masked-off pairs; ``valid`` is only
    read when not IS_FULL (full tiles pass any tensor)."""
    pos_at = DPosW + rel
    ts_at = DTsW + bucket
    if RAB_LANES > 1:
        # Threads of one atomic instruction hold neighbouring rows and columns, which often
        # share a time bucket (and, a few rows apart, a diagonal): each (row mod L, column mod L)
        # gets its own copy, so one instruction never adds twice into one address. The copies
        # are summed after the launch.
        lane_n = (offs_n % RAB_LANES)[:, None]
        lane_m = (offs_m % RAB_LANES)[None, :]
        pos_at += lane_n * (2 * rab_n - 1)
        ts_at += (lane_n * RAB_LANES + lane_m) * (num_buckets + 1)
    if REDUCE:
        k_off = k_local - tl.arange(0, BLOCK_N)
        q_off = q_local - tl.arange(0, BLOCK_M)
        k_base = tl.min(k_off, 0)
        q_base = tl.min(q_off, 0)
        c0 = rab_n - 1 + k_base - q_base
        diagonal = (
            (tl.max(k_off, 0) == k_base)
            & (tl.max(q_off, 0) == q_base)
            & (c0 - (BLOCK_M - 1) >= 0)
            & (c0 + BLOCK_N - 1 <= 2 * rab_n - 2)
        )
        if diagonal:
            _pos_diagonal_sums(g, DPosW, c0, BLOCK_N, BLOCK_M)
        else:
            _pairwise(g, pos_at, valid, IS_FULL)
        if IS_FULL:
            lo = tl.min(tl.min(bucket, 1), 0)
            hi = tl.max(tl.max(bucket, 1), 0)
        else:
            lo = tl.min(tl.min(tl.where(valid, bucket, num_buckets), 1), 0)
            hi = tl.max(tl.max(tl.where(valid, bucket, 0), 1), 0)
        if hi - lo < TS_LOOP:
            for b in range(lo, hi + 1):
                tl.atomic_add(DTsW + b, tl.sum(tl.sum(tl.where(bucket == b, g, 0.0), 1), 0))
        else:
            _pairwise(g, ts_at, valid, IS_FULL)
    else:
        _pairwise(g, pos_at, valid, IS_FULL)
        _pairwise(g, ts_at, valid, IS_FULL)


@triton.jit
def _pairwise(g, at, valid, IS_FULL: tl.constexpr):
    if IS_FULL:
        tl.atomic_add(at, g, sem="relaxed")
    else:
        tl.atomic_add(at, g, mask=valid, sem="relaxed")
