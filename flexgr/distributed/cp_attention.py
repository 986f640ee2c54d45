"""HSTU attention under context parallelism: local queries against all-gathered keys and values.

HSTU attention is a plain sum over keys (no softmax), so a query's output over the full key set is
exactly what one call over the gathered keys returns: no log-sum-exp merge is needed.

K and V are exchanged with one all-gather per layer (backward: reduce-scatter) rather than a ring:
per-sequence head-tail shards make every rank's queries need keys from every other rank, the
gathered K/V of the model sizes here are small next to the O(T^2) attention work, and it keeps
one kernel call per layer that any backend can serve (docs/distributed.md has the cost model).

Backends: ``reference`` (dense per sequence, any device; the CPU/gloo path), ``flex``
(FlexAttention with Q_LEN = S and KV_LEN = C*S, masks and bias remapped to global indices) and
``triton`` when ``flexgr.ops.triton_backend`` provides ``hstu_attention_indexed`` (the contract is
in docs/distributed.md); otherwise triton falls back to flex with a one-time warning.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.nn.attention.flex_attention import AuxRequest

from flexgr.distributed.collectives import all_gather_tokens
from flexgr.distributed.cp_mask import CPMask, build_cp_mask
from flexgr.distributed.sharding import TokenShard
from flexgr.ops.attention import BACKENDS
from flexgr.ops.flex import SHIFT_C, _flex, cpu_needs_fallback
from flexgr.ops.jagged import to_jagged, to_padded
from flexgr.ops.rab import RelativeBias, time_bucket

_PAIR_BUDGET = 1 << 26  # score elements per chunk when recomputing bias-table gradients


# ---------------------------------------------------------------- backend choice


def _triton_indexed() -> Callable[..., Tensor] | None:
    """The triton backend's index-mapped entry point, when it has one and can run."""
    from flexgr.ops import triton_backend

    fn = getattr(triton_backend, "hstu_attention_indexed", None)
    if fn is None or not triton_backend.available():
        return None
    return fn


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def resolve_cp_backend(backend: str, device: torch.device, *tensors: Tensor | None) -> str:
    """The backend that will actually run a CP call (warning once when it is not the one asked)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        from flexgr.ops import triton_backend

        backend = "triton" if triton_backend.available() else "flex"
    if backend == "triton" and _triton_indexed() is None:
        _warn_once(
            "flexgr: the triton backend has no query-index map (hstu_attention_indexed) yet; "
            "context-parallel attention uses flex instead."
        )
        backend = "flex"
    if backend == "flex" and device.type != "cuda" and cpu_needs_fallback(*tensors):
        _warn_once(
            "flexgr: FlexAttention has no backward on CPU; context-parallel attention uses the "
            "dense reference instead (same result)."
        )
        backend = "reference"
    return backend


# ---------------------------------------------------------------- relative bias on global indices


def _global_tables(rab: RelativeBias, mask: CPMask) -> tuple[Tensor, Tensor, Tensor]:
    """positions, timestamps, next_timestamps of every global token, int64 [T]."""
    T = mask.shard.total_len
    pos = rab.positions.long() if rab.positions is not None else mask.layout.local[:T].long()
    return pos, rab.timestamps.long(), rab.next_timestamps.long()


def _bias(
    pos_w: Tensor,
    ts_w: Tensor,
    rab: RelativeBias,
    tables: tuple[Tensor, Tensor, Tensor],
    gq: Tensor,
    gk: Tensor,
) -> Tensor:
    """bias between global queries gq and global keys gk (broadcast shapes), as in rab.py."""
    pos, ts, nxt = tables
    N = rab.max_len
    rel = (N - 1 + pos[gk] - pos[gq]).clamp(0, 2 * N - 2)
    bucket = time_bucket(nxt[gq] - ts[gk], rab.num_buckets, rab.bucket_divisor)
    return pos_w[rel] + ts_w[bucket]


# ---------------------------------------------------------------- dense reference


def _dense(
    q: Tensor,
    k_all: Tensor,
    v_all: Tensor,
    mask: CPMask,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None,
    seqs: tuple[int, int] | None = None,
    rows: tuple[int, int] | None = None,
    tables: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Local queries of sequences [lo, hi) against those sequences' keys, padded per sequence;
    ``rows`` = (a, b) keeps only local query rows a..b-1 of a single sequence (hi = lo + 1).
    Returns [those local tokens, H, Dv]; differentiable in everything."""
    shard = mask.shard
    B = shard.offsets.numel() - 1
    lo, hi = seqs if seqs is not None else (0, B)
    off_g, off_l = shard.offsets[lo : hi + 1], shard.local_offsets[lo : hi + 1]
    g0, g1, l0, l1 = (
        int(x) for x in torch.stack([off_g[0], off_g[-1], off_l[0], off_l[-1]]).tolist()
    )
    if rows is not None:
        if hi != lo + 1:
            raise ValueError("rows selects query rows of a single sequence")
        l0, l1 = l0 + rows[0], l0 + rows[1]
        off_l = off_l.new_tensor([l0, l1])
    len_g, len_l = off_g[1:] - off_g[:-1], off_l[1:] - off_l[:-1]
    n_k = max(int(len_g.max()) if hi > lo else 0, 1)
    n_q = max(int(len_l.max()) if hi > lo else 0, 1)
    sub_g, sub_l = off_g - g0, off_l - l0

    k_glob = k_all[shard.slot_of_token[g0:g1]]  # back to global token order
    v_glob = v_all[shard.slot_of_token[g0:g1]]
    q_BNHD = to_padded(q[l0:l1], sub_l, n_q)
    k_BMHD = to_padded(k_glob, sub_g, n_k)
    v_BMHD = to_padded(v_glob, sub_g, n_k)
    gq_BN = to_padded(shard.local_index[l0:l1], sub_l, n_q)
    valid_q = torch.arange(n_q, device=q.device).view(1, -1) < len_l.view(-1, 1)
    col = torch.arange(n_k, device=q.device).view(1, -1)
    valid_k = col < len_g.view(-1, 1)
    gk_BM = (off_g[:-1].view(-1, 1) + col).clamp(max=max(shard.total_len - 1, 0))

    s_BHNM = torch.einsum("bnhd,bmhd->bhnm", q_BNHD, k_BMHD) * alpha
    gq3, gk3 = gq_BN.unsqueeze(2), gk_BM.unsqueeze(1)
    if rab is not None:
        tables = tables if tables is not None else _global_tables(rab, mask)
        bias = _bias(rab.pos_w, rab.ts_w, rab, tables, gq3, gk3)
        s_BHNM = s_BHNM + bias.unsqueeze(1).to(s_BHNM.dtype)
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    allowed = mask.global_mask_mod(zero, zero, gq3, gk3)
    allowed = allowed & valid_q.unsqueeze(2) & valid_k.unsqueeze(1)
    p_BHNM = F.silu(s_BHNM) * allowed.unsqueeze(1).to(s_BHNM.dtype) / max_seq_len
    o_BNHD = torch.einsum("bhnm,bmhd->bnhd", p_BHNM, v_BMHD)
    return to_jagged(o_BNHD, sub_l, l1 - l0)


def attend_gathered_reference(
    q: Tensor,
    k_all: Tensor,
    v_all: Tensor,
    mask: CPMask,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
) -> Tensor:
    return _dense(q, k_all, v_all, mask, max_seq_len=max_seq_len, alpha=alpha, rab=rab)


# ---------------------------------------------------------------- flex


def _chunks(
    len_q: list[int], len_k: list[int], heads: int, budget: int
) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
    """(lo, hi, rows) work items whose padded score block stays within ``budget`` elements:
    runs of whole sequences, or blocks of query rows of one sequence too long to fit alone."""
    B, start = len(len_q), 0
    while start < B:
        if heads * len_q[start] * len_k[start] > budget:
            step = max(1, budget // (heads * len_k[start]))
            for a in range(0, len_q[start], step):
                yield start, start + 1, (a, min(a + step, len_q[start]))
            start += 1
            continue
        stop, wq, wk = start, 0, 0
        while stop < B:
            wq2, wk2 = max(wq, len_q[stop]), max(wk, len_k[stop])
            if stop > start and (stop + 1 - start) * heads * wq2 * wk2 > budget:
                break
            wq, wk, stop = wq2, wk2, stop + 1
        yield start, stop, None
        start = stop


class _TableGrad(torch.autograd.Function):
    """Adds a zero whose backward is the gradient of the bias tables (flex reads them detached:
    its captured-buffer backward does not compile for these gathers on torch 2.11). The gradient
    is recomputed densely in fp32, in chunks of bounded size (see ``_chunks``)."""

    @staticmethod
    def forward(ctx, pos_w, ts_w, q, k_all, v_all, mask, rab, alpha, max_seq_len):  # type: ignore[override]
        ctx.save_for_backward(q, k_all, v_all)
        ctx.args = (mask, rab, alpha, max_seq_len, pos_w, ts_w)
        return v_all.new_zeros((q.shape[0], *v_all.shape[1:]))

    @staticmethod
    def backward(ctx, g_THD):  # type: ignore[override]
        q, k_all, v_all = ctx.saved_tensors
        mask, rab, alpha, max_seq_len, pos_w, ts_w = ctx.args
        pw = pos_w.detach().float().requires_grad_(True)
        tw = ts_w.detach().float().requires_grad_(True)
        d_pos, d_ts = torch.zeros_like(pw), torch.zeros_like(tw)
        rab_f = dataclasses.replace(rab, pos_w=pw, ts_w=tw)
        tables = _global_tables(rab, mask)
        shard = mask.shard
        len_k = (shard.offsets[1:] - shard.offsets[:-1]).tolist()
        len_q = (shard.local_offsets[1:] - shard.local_offsets[:-1]).tolist()
        l_off = shard.local_offsets.tolist()
        qf, kf, vf, gf = q.float(), k_all.float(), v_all.float(), g_THD.float()
        with torch.enable_grad():
            for lo, hi, rows in _chunks(len_q, len_k, q.shape[1], _PAIR_BUDGET):
                r0, r1 = (
                    (l_off[lo], l_off[hi])
                    if rows is None
                    else (l_off[lo] + rows[0], l_off[lo] + rows[1])
                )
                if r1 == r0:
                    continue
                out = _dense(
                    qf,
                    kf,
                    vf,
                    mask,
                    max_seq_len=max_seq_len,
                    alpha=alpha,
                    rab=rab_f,
                    seqs=(lo, hi),
                    rows=rows,
                    tables=tables,
                )
                gp, gt = torch.autograd.grad(out, (pw, tw), gf[r0:r1])
                d_pos += gp
                d_ts += gt
        return d_pos.to(pos_w.dtype), d_ts.to(ts_w.dtype), None, None, None, None, None, None, None


def _flex_bias_fn(
    rab: RelativeBias | None, mask: CPMask
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    if rab is None:
        return lambda s, q, kv: s
    pos, ts, nxt = _global_tables(rab, mask)
    qi, ki = mask.q_index.clamp(min=0), mask.kv_index.clamp(min=0)
    # Gathered once per call into per-slot tables, so the kernel does one lookup per side.
    pos_q, nxt_q, pos_k, ts_k = pos[qi], nxt[qi], pos[ki], ts[ki]
    pos_w, ts_w = rab.pos_w.detach().float(), rab.ts_w.detach().float()
    N, nb, div = rab.max_len, rab.num_buckets, rab.bucket_divisor

    def add_bias(s: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        rel = (N - 1 + pos_k[kv] - pos_q[q]).clamp(0, 2 * N - 2)
        mag = (nxt_q[q] - ts_k[kv]).abs().clamp(min=1).to(torch.float32)
        bucket = (torch.log(mag) / div).to(torch.int64).clamp(0, nb)
        return s + pos_w[rel] + ts_w[bucket]

    return add_bias


def _unnormalised(q4, k4, v4, score_mod, mask: CPMask, alpha: float, opts: dict | None) -> Tensor:
    out, aux = _flex(q4.device)(
        q4,
        k4,
        v4,
        score_mod=score_mod,
        block_mask=mask.block_mask,
        scale=alpha,
        return_aux=AuxRequest(lse=True),
        kernel_options=opts,
    )
    return out.float() * aux.lse.exp().unsqueeze(-1)


def attend_gathered_flex(
    q: Tensor,
    k_all: Tensor,
    v_all: Tensor,
    mask: CPMask,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
) -> Tensor:
    """The shift transform of ``flexgr.ops.flex`` with Q_LEN = S and KV_LEN = C*S."""
    if mask.block_mask is None:
        raise ValueError("the flex backend needs a CPMask built with with_block_mask=True")
    T_r, S = q.shape[0], mask.q_len
    q4 = F.pad(q, (0, 0, 0, 0, 0, S - T_r)).transpose(0, 1).unsqueeze(0)
    k4 = k_all.transpose(0, 1).unsqueeze(0)
    v4 = v_all.transpose(0, 1).unsqueeze(0)
    add_bias = _flex_bias_fn(rab, mask)
    opts = {"BLOCK_M": 64, "BLOCK_N": 64} if rab is not None and q.device.type == "cuda" else None

    def shift_mod(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        x = add_bias(s, qi, kv)
        return torch.log(x * torch.sigmoid(x) + SHIFT_C)

    def uniform_mod(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
        return s * 0.0

    acc = _unnormalised(q4, k4, v4, shift_mod, mask, alpha, opts)
    vsum = _unnormalised(q4.detach(), k4.detach(), v4, uniform_mod, mask, alpha, None)
    acc = acc - SHIFT_C * vsum
    out_THD = (acc[0].transpose(0, 1)[:T_r] / max_seq_len).to(v_all.dtype)
    if (
        rab is not None
        and torch.is_grad_enabled()
        and (rab.pos_w.requires_grad or rab.ts_w.requires_grad)
    ):
        zero = _TableGrad.apply(
            rab.pos_w,
            rab.ts_w,
            q.detach(),
            k_all.detach(),
            v_all.detach(),
            mask,
            rab,
            alpha,
            max_seq_len,
        )
        out_THD = out_THD + zero.to(out_THD.dtype)
    return out_THD


# ---------------------------------------------------------------- public entry points


def attend_gathered(
    q: Tensor,
    k_all: Tensor,
    v_all: Tensor,
    mask: CPMask,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
    backend: str = "auto",
) -> Tensor:
    """Backend-agnostic attention of local queries [T_r, H, D] against gathered keys and values
    [C*S, H, D] (slots as in ``mask.kv_index``). No communication: the all-gather is the caller's."""
    tensors = (q, k_all, v_all) + ((rab.pos_w, rab.ts_w) if rab is not None else ())
    backend = resolve_cp_backend(backend, q.device, *tensors)
    kw = dict(max_seq_len=max_seq_len, alpha=alpha, rab=rab)
    if backend == "reference":
        return attend_gathered_reference(q, k_all, v_all, mask, **kw)
    if backend == "triton":
        fn = _triton_indexed()
        assert fn is not None  # resolve_cp_backend checked
        return fn(q, k_all, v_all, mask, **kw)
    return attend_gathered_flex(q, k_all, v_all, mask, **kw)


def _check(q: Tensor, k: Tensor, v: Tensor, mask: CPMask, rab: RelativeBias | None) -> None:
    shard = mask.shard
    if not (q.shape[0] == k.shape[0] == v.shape[0] == shard.local_len):
        raise ValueError(
            f"q, k, v must hold this rank's {shard.local_len} tokens, got {q.shape[0]}, "
            f"{k.shape[0]}, {v.shape[0]}"
        )
    if rab is not None:
        T = shard.total_len
        for name, t in (
            ("timestamps", rab.timestamps),
            ("next_timestamps", rab.next_timestamps),
            ("positions", rab.positions),
        ):
            if t is not None and t.shape != (T,):
                raise ValueError(
                    f"under context parallelism rab.{name} must cover the GLOBAL batch [{T}], "
                    f"got shape {tuple(t.shape)}"
                )


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: CPMask,
    group: ProcessGroup,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
    backend: str = "auto",
) -> Tensor:
    """HSTU attention of this rank's tokens (q, k, v: [T_r, H, D], in ``mask.shard`` order).

    ``rab`` carries the GLOBAL per-token tables (timestamps, next_timestamps, positions: [T]);
    ``max_seq_len`` is the global divisor N. Returns [T_r, H, Dv]. Every rank of ``group`` must
    call it with the same batch (collective).
    """
    _check(q, k, v, mask, rab)
    pad = mask.shard.shard_len - q.shape[0]
    dqk = k.shape[-1]
    kv_SHX = F.pad(torch.cat([k, v], dim=-1), (0, 0, 0, 0, 0, pad))
    kv_all = all_gather_tokens(kv_SHX, group)  # one collective for K and V together
    k_all, v_all = kv_all[..., :dqk], kv_all[..., dqk:]
    return attend_gathered(
        q, k_all, v_all, mask, max_seq_len=max_seq_len, alpha=alpha, rab=rab, backend=backend
    )


def cp_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    shard: TokenShard,
    group: ProcessGroup,
    *,
    max_seq_len: int,
    alpha: float,
    num_targets: Tensor | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    full_attn_tail: int = 0,
    rab: RelativeBias | None = None,
    backend: str = "auto",
) -> Tensor:
    """``hstu_attention`` for one rank's shard: builds the CP mask, then
    :func:`context_parallel_attention`. Build the mask once with ``build_cp_mask`` when several
    layers share a batch."""
    tensors = (q, k, v) + ((rab.pos_w, rab.ts_w) if rab is not None else ())
    resolved = resolve_cp_backend(backend, q.device, *tensors)
    mask = build_cp_mask(
        shard,
        num_targets=num_targets,
        contextual_len=contextual_len,
        max_attn_len=max_attn_len,
        full_attn_tail=full_attn_tail,
        with_block_mask=resolved != "reference",
    )
    return context_parallel_attention(
        q, k, v, mask, group, max_seq_len=max_seq_len, alpha=alpha, rab=rab, backend=backend
    )
