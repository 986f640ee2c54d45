"""Per-tile pieces shared by the forward and backward kernels: the HSTU mask rule, the relative
bias and SiLU. Each takes row-side vectors (queries, length BLOCK_M) and column-side vectors
(keys, length BLOCK_N) and returns a [BLOCK_M, BLOCK_N] tile, so the dk/dv kernel, which works on
transposed tiles, calls them with the roles swapped through ``TRANSPOSED``.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # decided when triton decides, at import

    @triton.jit
    def _logf(x):
        return tl.log(x)  # numpy's log; the interpreter has no libdevice

else:

    @triton.jit
    def _logf(x):
        return libdevice.log(x)




@triton.jit
def hstu_valid(
    m_idx, q_seq, q_pos, q_max, n_idx, k_seq, k_pos, window, tail, global_len,
    HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_GLOBAL: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """The rule of ``flexgr.masks.mods.hstu_mask`` on global indices. Targets are the tokens whose
    position id equals their sequence's max_id (ids are clamped to it), so the key side needs no
    is_target table: inside one sequence the query's max_id is the key's too. Semi-local
    attention (``MaskSpec.semi_local``) is the window (possibly 0 wide) with either the tail
    rows (HAS_TAIL) or the global prefix keys, position id below ``global_len`` (HAS_GLOBAL),
    exempt from it."""
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
    # Causal in position ids, as the reference rule: contextual tokens share id 0 and targets
    # their sequence's max_id, so two of them see each other only through the contextual
    # clause below (targets never: HAS_TARGETS needs no term of its own). In token order
    # instead, a sequence shorter than its contextual prefix would attend causally where the
    # reference lets each token see itself only.
    valid = same & ((qp > kp) | (mi == ni))
    if HAS_WINDOW:
        near = (qp - kp) <= window
        if HAS_TAIL:
            near = near | (qp >= qm - tail)
        if HAS_GLOBAL:
            near = near | (kp < global_len)
        valid = valid & near
    if HAS_CONTEXT:
        valid = valid | (same & (qp == 0) & (kp < qm))
    return valid


@triton.jit
def rab_index(
    q_local, q_next_ts, k_local, k_ts, rab_n, num_buckets, inv_bucket_div, TRANSPOSED: tl.constexpr,
):
    """Gather indices into pos_w and ts_w (same formulas as flexgr.ops.rab, clamped in range).

    Buckets change where log(dt) / 0.301 crosses an integer, so the rounding must follow torch's
    CUDA path: libdevice's logf (tl.log is the faster lg2.approx, which moved some pairs into the
    neighbouring bucket), times the fp32 reciprocal of the divisor (torch's CUDA division by a
    Python scalar multiplies by it). torch on CPU divides instead, which can differ by an ulp."""
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
    bucket = (_logf(mag) * inv_bucket_div).to(tl.int32)
    bucket = tl.minimum(tl.maximum(bucket, 0), num_buckets)
    return rel, bucket


@triton.jit
def query_bias_tile(
    Bias, slot_list, t, offs_m, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCK_Q: tl.constexpr, MASK_BLOCK_KV: tl.constexpr,
):
    """kernel.rab_tiles: the [BLOCK_M, BLOCK_N] bias sub-tile of key sub-block t (queries
    offs_m as rows) from its slot's per-layer values, for the forward and dq programs. Row
    (query) and column (key) offsets inside the mask block; padded tokens have finite values
    there (weights of in-range indices), so no mask."""
    slot = tl.load(slot_list + t // SUB).to(tl.int64)
    in_block = (offs_m % MASK_BLOCK_Q)[:, None] * MASK_BLOCK_KV + (
        (t % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    )[None, :]
    return tl.load(Bias + slot * (MASK_BLOCK_Q * MASK_BLOCK_KV) + in_block)


@triton.jit
def _tanh_approx(x):
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def score_scale(alpha, FAST: tl.constexpr):
    """What q.k is multiplied by: alpha, or alpha / 2 in FAST mode, whose helpers below take
    h = s / 2 (one multiply per element saved)."""
    if FAST:
        return alpha * 0.5
    else:
        return alpha


@triton.jit
def silu(x, FAST: tl.constexpr):
    """silu(s) from x = s, or from x = s / 2 when FAST (16-bit inputs on a GPU): silu(s) =
    h + h tanh(h), one MUFU instruction per element instead of two (exp2 and a reciprocal);
    tanh.approx's ~5e-4 relative error stays far below the bf16/fp16 rounding of p."""
    if FAST:
        return x + x * _tanh_approx(x)
    else:
        return x / (1.0 + tl.exp2(x * -1.4426950408889634))


@triton.jit
def silu_and_slope(x, FAST: tl.constexpr):
    """(silu(s), silu'(s)), silu' = sg (1 + s (1 - sg)) with sg = sigmoid(s); x as in silu."""
    if FAST:
        t = _tanh_approx(x)
        return x + x * t, (0.5 + 0.5 * t) * (1.0 + x - x * t)
    else:
        sg = 1.0 / (1.0 + tl.exp2(x * -1.4426950408889634))
        return x * sg, sg * (1.0 + x * (1.0 - sg))


@triton.jit
def load_rows(ptrs, row_ok, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr, ALL_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, masking only what can be out of range: rows past T (never in
    full blocks) and padded head-dim columns. Unmasked loads vectorise fully."""
    if ALL_ROWS:
        if D == BLOCK_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    else:
        if D == BLOCK_D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
