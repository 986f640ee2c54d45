"""Per-tile pieces shared by the forward and backward kernels: the HSTU mask rule, the relative
bias and SiLU. Each takes row-side vectors (queries, length BLOCK_M) and column-side vectors
(keys, length BLOCK_N) and returns a [BLOCK_M, BLOCK_N] tile, so the dk/dv kernel, which works on
transposed tiles, calls them with the roles swapped through ``TRANSPOSED``.
"""

import triton
import triton.language as tl



@triton.jit
def hstu_valid(
    m_idx, q_seq, q_pos, q_max, n_idx, k_seq, k_pos, window, tail,
    HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """The rule of ``flexgr.masks.mods.hstu_mask`` on global indices. Targets are the tokens whose
    position id equals their sequence's max_id (ids are clamped to it), so the key side needs no
    is_target table: inside one sequence the query's max_id is the key's too."""
    if TRANSPOSED:  # tile is [keys, queries]
        mi = m_idx[None, :]
        qs = q_seq[None, :]
        qp = q_pos[None, :]
        qm = q_max[None, :]
        ni = n_idx[:, None]
        ks = k_seq[:, None]
        kp = k_pos[:, None]
    else:
        mi = m_idx[:, None]
        qs = q_seq[:, None]
        qp = q_pos[:, None]
        qm = q_max[:, None]
        ni = n_idx[None, :]
        ks = k_seq[None, :]
        kp = k_pos[None, :]
    same = (qs == ks) & (qs >= 0)
    valid = same & (mi >= ni)
    if HAS_TARGETS:
        valid = valid & (((qp != qm) | (kp != qm)) | (mi == ni))
    if HAS_WINDOW:
        near = (qp - kp) <= window
        if HAS_TAIL:
            near = near | (qp >= qm - tail)
        valid = valid & near
    if HAS_CONTEXT:
        valid = valid | (same & (qp == 0) & (kp < qm))
    return valid


@triton.jit
def rab_index(
    q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets, bucket_div, TRANSPOSED: tl.constexpr,
):
    """Gather indices into pos_w and ts_w (same formulas as flexgr.ops.rab, clamped in range)."""
    if TRANSPOSED:
        ql = q_local[None, :]
        qt = q_next_ts[None, :]
        kl = k_local[:, None]
        kt = k_ts[:, None]
    else:
        ql = q_local[:, None]
        qt = q_next_ts[:, None]
        kl = k_local[None, :]
        kt = k_ts[None, :]
    rel = rab_n - 1 + kl - ql
    rel = tl.minimum(tl.maximum(rel, 0), 2 * rab_n - 2)
    dt = qt - kt
    mag = tl.maximum(tl.where(dt < 0, -dt, dt), 1).to(tl.float32)
    bucket = (tl.log(mag) / bucket_div).to(tl.int32)
    bucket = tl.minimum(tl.maximum(bucket, 0), num_buckets)
    return rel, bucket


@triton.jit
def sigmoid_fast(s):
    # exp2 is one MUFU instruction; -1.4427 = -log2(e).
    return 1.0 / (1.0 + tl.exp2(s * -1.4426950408889634))
