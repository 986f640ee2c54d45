"""M-FALCON inference for HSTU: many candidates over one history, history keys and values cached.

A candidate appended to a history as a target sees the whole history and itself, and no
history row sees it, so the history's layer inputs, keys and values do not depend on the
candidates. :func:`encode_history` runs the history once and keeps, per layer, its keys and
values (:class:`HistoryCache`); :func:`candidate_states` then runs only the candidates'
tokens, ``microbatch`` at a time, each layer attending to the cached keys plus the candidate's
own (candidates never see each other). Every candidate sits at the target position for the
position bias (position id = history length) and at the query time for the time bias, exactly
as if it were scored alone on ``history + [candidate]`` with the query time as its timestamp;
``tests/model/test_falcon.py`` checks that equality for every microbatch size.

The candidate step is plain PyTorch over [m, H, L] scores (eval mode: no dropout). A Triton
delta-query kernel (a few query rows against the cached keys) is not written yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flexgr.batch import JaggedBatch
from flexgr.model.embedding import l2_normalize
from flexgr.model.hstu.inputs import prepare
from flexgr.model.hstu.model import HSTU, HSTULayer
from flexgr.ops.rab import time_bucket


@dataclass(frozen=True)
class HistoryCache:
    """One history's per-layer keys and values and the tables the candidates' bias needs."""

    keys: list[Tensor]  # per layer [L, H, Dqk]
    values: list[Tensor]  # per layer [L, H, Dv]
    timestamps: Tensor  # [L] int64
    query_time: int
    length: int  # L: the candidates' position id

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _projections(layer: HSTULayer, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = layer.cfg
    T, H = x_TD.shape[0], cfg.num_heads
    u, v, q, k = torch.split(layer.project(x_TD), layer.splits, dim=-1)
    return u, v.reshape(T, H, cfg.dv), q.reshape(T, H, cfg.dqk), k.reshape(T, H, cfg.dqk)


@torch.no_grad()
def encode_history(
    model: HSTU, item_ids: Tensor, timestamps: Tensor, query_time: int
) -> HistoryCache:
    """Run one history (item ids and timestamps [L], oldest first) and cache its keys and
    values per layer. The history's last token reads ``query_time`` as its next timestamp."""
    if model.training:
        raise ValueError("M-FALCON scoring runs in eval mode (model.eval())")
    if model.cfg.truncate_after > 0 and model.cfg.truncate_len > 0:
        raise ValueError("M-FALCON does not support attention truncation yet")
    if model.cfg.mot_streams > 1:
        raise ValueError("M-FALCON does not support a mixture of transducers yet")
    if model.cfg.attention != "silu":
        raise ValueError("M-FALCON's cached scoring is for pointwise (silu) attention only")
    L = item_ids.shape[0]
    if L == 0:
        raise ValueError("the history is empty: M-FALCON needs at least one event")
    if L + 1 > model.cfg.attn_len:
        raise ValueError(
            f"a history of {L} events plus a candidate exceeds the model's {model.cfg.attn_len}"
        )
    device = item_ids.device
    offsets = torch.tensor([0, L], device=device)
    batch = JaggedBatch(item_ids, offsets, timestamps, torch.tensor([query_time], device=device))
    inputs = prepare(model, batch)
    x = model.input(model.item_emb(item_ids), inputs.positions)
    keys, values = [], []
    for layer in model.layers:
        _, v, _, k = _projections(layer, x)
        keys.append(k)
        values.append(v)
        x = layer(x, inputs)
    return HistoryCache(keys, values, timestamps.to(torch.int64), int(query_time), L)


def _candidate_layer(layer: HSTULayer, x_MD: Tensor, cache: HistoryCache, index: int) -> Tensor:
    cfg = layer.cfg
    M = x_MD.shape[0]
    alpha = 1.0 if cfg.alpha is None else cfg.alpha
    u, v_c, q_c, k_c = _projections(layer, x_MD)
    k_h, v_h = cache.keys[index], cache.values[index]
    acc = torch.promote_types(q_c.dtype, torch.float32)  # fp32 at least, as the kernels sum
    # [M, H, L]: candidate m against history key j; [M, H]: against itself.
    s_hist = alpha * torch.einsum("mhd,lhd->mhl", q_c.to(acc), k_h.to(acc))
    s_self = alpha * (q_c.to(acc) * k_c.to(acc)).sum(-1)
    if layer.rab is not None:
        pos_w, ts_w = layer.rab()
        N, L = cfg.attn_len, cache.length
        pos = torch.arange(L, device=x_MD.device)
        rel = (N - 1 + pos - L).clamp(0, 2 * N - 2)
        buckets = time_bucket(cache.query_time - cache.timestamps, ts_w.numel() - 1)
        s_hist = s_hist + (pos_w[rel] + ts_w[buckets]).to(acc)
        # itself: relative position 0, time difference 0 (its timestamp is the query time)
        zero = torch.zeros(1, dtype=torch.int64, device=x_MD.device)
        s_self = s_self + (pos_w[N - 1] + ts_w[time_bucket(zero, ts_w.numel() - 1)]).to(acc)
    attn = torch.einsum("mhl,lhd->mhd", F.silu(s_hist), v_h.to(acc))
    attn = (attn + F.silu(s_self).unsqueeze(-1) * v_c.to(acc)) / cfg.attn_len
    attn = attn.to(v_c.dtype).reshape(M, cfg.num_heads * cfg.dv)
    gated = u * layer.attn_norm(attn)
    if cfg.concat_ua:
        gated = torch.cat([u, attn, gated], dim=-1)
    return layer.output(x_MD, gated)


@torch.no_grad()
def candidate_states(
    model: HSTU, cache: HistoryCache, candidates: Tensor, *, microbatch: int = 1024
) -> Tensor:
    """[M, d] L2-normalised output states of ``candidates`` (item ids [M]) after ``cache``'s
    history, ``microbatch`` candidates per pass."""
    if microbatch < 1:
        raise ValueError(f"microbatch must be >= 1, got {microbatch}")
    if candidates.numel() == 0:
        raise ValueError("no candidates to score")
    out = []
    position = torch.tensor(cache.length, device=candidates.device)
    for start in range(0, candidates.numel(), microbatch):
        ids = candidates[start : start + microbatch]
        x = model.input(model.item_emb(ids), position.expand(ids.numel()))
        for index, layer in enumerate(model.layers):
            x = _candidate_layer(layer, x, cache, index)
        out.append(l2_normalize(x))
    return torch.cat(out)


@torch.no_grad()
def score_candidates(
    model: HSTU,
    item_ids: Tensor,
    timestamps: Tensor,
    query_time: int,
    candidates: Tensor,
    *,
    microbatch: int = 1024,
    cache: HistoryCache | None = None,
) -> tuple[Tensor, HistoryCache]:
    """(scores [M], the history cache): each candidate's output state dotted with its own item
    embedding, the target-aware score of a retrieval-trained model. Pass ``cache`` back in to
    score more candidates of the same history without running it again."""
    if cache is None:
        cache = encode_history(model, item_ids, timestamps, query_time)
    states = candidate_states(model, cache, candidates, microbatch=microbatch)
    acc = torch.promote_types(states.dtype, torch.float32)
    return (states.to(acc) * model.item_embeddings(candidates).to(acc)).sum(-1), cache
