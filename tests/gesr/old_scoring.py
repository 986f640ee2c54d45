"""A frozen copy of GESR's scoring computation before it was made sync-free (commit a8c1638):
the match join keyed by the data's value range, the cross layouts sized by the batch's pair count
and longest lengths, and the forward over them. Only the equality tests read it
(tests/gesr/test_sync_free.py): the sync-free path must give these logits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flexgr.gesr.model import GESRRanker
from flexgr.model.hstu.inputs import prepare as prepare_hstu
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.tokens import place, segments, token_batch, token_rows


def old_match_counts(hist_LF, h_off, cand_MF, c_off, weights_L=None, ignore_value=None):
    L, F_ = hist_LF.shape
    M = cand_MF.shape[0]
    if M == 0 or L == 0:
        return torch.zeros(M, F_, dtype=torch.float64)
    h_seq, _ = segments(h_off, L)
    c_seq, _ = segments(c_off, M)
    w = torch.ones(L, dtype=torch.float64) if weights_L is None else weights_L
    w = w.to(torch.float64)
    both = torch.cat([hist_LF, cand_MF]).long()
    lo_hi = torch.stack([both.min(), both.max()]).tolist()  # the host read
    low, span = lo_hi[0], lo_hi[1] - lo_hi[0] + 1
    out = torch.empty(M, F_, dtype=torch.float64)
    for f in range(F_):
        h_val, c_val = hist_LF[:, f].long(), cand_MF[:, f].long()
        w_f = w if ignore_value is None else w * (h_val != ignore_value)
        h_key = h_seq * span + (h_val - low)
        c_key = c_seq * span + (c_val - low)
        sorted_key, order = torch.sort(h_key)
        cum = torch.zeros(L + 1, dtype=torch.float64)
        cum[1:] = torch.cumsum(w_f[order], 0)
        left = torch.searchsorted(sorted_key, c_key, side="left")
        right = torch.searchsorted(sorted_key, c_key, side="right")
        count = (cum[right] - cum[left]).clamp_min(0)
        if ignore_value is not None:
            count = count * (c_val != ignore_value)
        out[:, f] = count
    return out


def old_match_features(model: GESRRanker, batch: RankingBatch) -> Tensor:
    cfg = model.cfg.match_config()
    weights = None
    if cfg.half_life is not None:
        seq, _ = segments(batch.history_offsets, batch.num_history)
        age = (batch.query_time[seq] - batch.history_timestamps).clamp_min(0).to(torch.float64)
        weights = torch.exp2(-age / cfg.half_life)
    counts = old_match_counts(
        batch.history_items.unsqueeze(1),
        batch.history_offsets,
        batch.candidates.unsqueeze(1),
        batch.candidate_offsets,
        weights,
        cfg.ignore_value,
    )
    if cfg.num_buckets:
        return torch.floor(torch.log2(1 + counts)).long().clamp(0, cfg.num_buckets - 1)
    return torch.log1p(counts)


@dataclass(frozen=True)
class OldPairs:
    candidate: Tensor
    history: Tensor


def old_pairs(h_off: Tensor, c_off: Tensor, M: int) -> OldPairs:
    c_seq, _ = segments(c_off, M)
    per_candidate = (h_off[1:] - h_off[:-1])[c_seq]
    P = int(per_candidate.sum())  # the host read
    pair_cand = torch.repeat_interleave(torch.arange(M), per_candidate, output_size=P)
    first_pair = torch.cumsum(per_candidate, 0) - per_candidate
    local = torch.arange(P) - first_pair[pair_cand]
    return OldPairs(pair_cand, h_off[c_seq][pair_cand] + local)


def old_jagged(q_MHD, k_LHD, v_LHD, pairs: OldPairs, activation, divisor):
    M, H, _ = q_MHD.shape
    scores_PH = (q_MHD[pairs.candidate] * k_LHD[pairs.history]).sum(-1)
    v_PHD = v_LHD[pairs.history]
    out = v_LHD.new_zeros(M, H, v_LHD.shape[-1])
    if activation == "silu":
        return out.index_add(0, pairs.candidate, F.silu(scores_PH).unsqueeze(-1) * v_PHD) / divisor
    scores_PH = scores_PH / math.sqrt(q_MHD.shape[-1])
    peak = scores_PH.new_full((M, H), -math.inf)
    index_PH = pairs.candidate.unsqueeze(1).expand(-1, H)
    peak = peak.scatter_reduce(0, index_PH, scores_PH.detach(), "amax")
    weights_PH = torch.exp(scores_PH - peak[pairs.candidate])
    total = scores_PH.new_zeros(M, H).index_add(0, pairs.candidate, weights_PH)
    out = out.index_add(0, pairs.candidate, weights_PH.unsqueeze(-1) * v_PHD)
    return out / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(-1)


def old_padded(q_MHD, k_LHD, v_LHD, h_off, c_off, activation, divisor):
    M, H, D = q_MHD.shape
    hist_len, cand_len = h_off[1:] - h_off[:-1], c_off[1:] - c_off[:-1]
    longest = torch.stack([hist_len.max(), cand_len.max()]).tolist()  # the host read
    slots = torch.arange(longest[0])
    valid_BL = slots < hist_len.unsqueeze(1)
    rows = torch.where(valid_BL, h_off[:-1].unsqueeze(1) + slots, 0)
    c_seq, c_slot = segments(c_off, M)
    B, L_max = rows.shape
    k_BLHD, v_BLHD = k_LHD[rows], v_LHD[rows]
    q_BMHD = q_MHD.new_zeros(B, longest[1], H, D).index_put((c_seq, c_slot), q_MHD)
    scores = torch.einsum("bmhd,blhd->bhml", q_BMHD, k_BLHD)
    keep = valid_BL[:, None, None, :]
    if activation == "silu":
        out = torch.einsum("bhml,blhe->bhme", F.silu(scores) * keep / divisor, v_BLHD)
    else:
        scores = (scores / math.sqrt(D)).masked_fill(~keep, -math.inf)
        peak = scores.detach().amax(-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, 0.0)
        weights = torch.exp(scores - peak)
        total = weights.sum(-1, keepdim=True)
        out = torch.einsum("bhml,blhe->bhme", weights, v_BLHD)
        out = out / total.clamp_min(torch.finfo(total.dtype).tiny)
    return out.permute(0, 2, 1, 3)[c_seq, c_slot]


@torch.no_grad()
def old_logits(model: GESRRanker, batch: RankingBatch) -> Tensor:
    """prepare + forward as they were, over the model's own modules (batches with a history)."""
    cfg = model.cfg
    h_seq, _ = segments(batch.history_offsets, batch.num_history)
    c_seq, _ = segments(batch.candidate_offsets, batch.num_candidates)
    user_CKd, item_CKd, history_Hd = model.towers.towers(batch, h_seq, c_seq)
    parts = []
    if model.match is not None:
        parts.append(model.match(old_match_features(model, batch)))
    candidates_Cd = model.towers.item_emb(batch.candidates)
    if model.cross is not None:
        cross = model.cross
        q = cross.queries(candidates_Cd)
        k, v = cross.keys_values(history_Hd)
        h_off, c_off, M = batch.history_offsets, batch.candidate_offsets, batch.num_candidates
        act, div = cross.cfg.activation, cross.cfg.divisor
        if cfg.cross_impl == "pairs":
            o = old_jagged(q, k, v, old_pairs(h_off, c_off, M), act, div)
        else:
            o = old_padded(q, k, v, h_off, c_off, act, div)
        parts.append(cross.out(o.reshape(o.shape[0], -1)))
    if model.encoder is not None:
        assert model.placeholder is not None
        rows = token_rows(batch, "merged")
        hstu = prepare_hstu(model.encoder, token_batch(rows, batch))
        x = place(
            [rows.item_rows, rows.candidate_rows],
            [history_Hd, candidates_Cd + model.placeholder],
            rows.num_tokens,
        )
        parts.append(model.encoder(x, hstu)[rows.candidate_rows])  # type: ignore[arg-type]
    return model.fused_logits(parts, user_CKd, item_CKd)
