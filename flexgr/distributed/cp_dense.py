"""Dense reference of context-parallel HSTU attention: per sequence, this rank's queries against
all of the sequence's keys (restored to global order), padded. Any device; the CPU/gloo path, and
the oracle that the flex path's bias-table gradient is recomputed with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flexgr.distributed.cp_mask import CPMask
from flexgr.ops.jagged import to_jagged, to_padded
from flexgr.ops.rab import RelativeBias, time_bucket


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
