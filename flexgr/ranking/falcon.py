"""M-FALCON for the HSTU ranking model: the history encoded once, candidates in microbatches.

A ranking candidate is a target of its history (it sees the history and itself, the history
never sees it), so, as for retrieval (:mod:`flexgr.model.hstu.falcon`, whose pieces this
reuses), the history's tokens (``interleaved``: item and action tokens, 2 per event;
``merged``: one per event) go through the layer stack once and each layer's keys and values
are kept (:func:`encode_ranking_history`). :func:`candidate_logits` then runs only the
candidates' tokens, ``microbatch`` at a time, each attending to the cached keys plus its own
key at the history's end position and the query time (as the normal forward places targets),
and reads the multi-task head. ``tests/ranking/test_falcon.py`` checks every candidate against
the normal forward on ``history + [candidate]``. On CUDA a reused cache can replay the
candidate pass as a CUDA graph (``cuda_graph=True``; :mod:`flexgr.ranking.cuda_graphs`).

:func:`history_content` is the bytes a :class:`~flexgr.model.hstu.falcon.HistoryStore` entry
is checked against: the events, their actions and timestamps, and the query time when the model
has the time bias (the last history token reads it, so every later layer's keys depend on it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexgr.model.hstu.falcon import (
    HistoryCache,
    candidate_pass,
    check,
    encode_tokens,
    microbatches,
    unsupported,
)
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.cuda_graphs import graphed_passes
from flexgr.ranking.hstu import HSTURanker, prepare


def falcon_unsupported(model: HSTURanker) -> str | None:
    """Why M-FALCON cannot score this ranking model, or None when it can."""
    return unsupported(model.encoder.cfg)


@torch.no_grad()
def encode_ranking_history(
    model: HSTURanker, items: Tensor, actions: Tensor, timestamps: Tensor, query_time: int
) -> HistoryCache:
    """One history (items [n], action codes [n, A], timestamps [n], oldest first) through the
    model's stack, each layer's keys and values kept. Candidates are scored at ``query_time``."""
    n = items.shape[0]
    per_event = 2 if model.cfg.layout == "interleaved" else 1
    check(model.encoder.cfg, model.training, per_event * n)
    device = items.device
    batch = RankingBatch(
        items,
        actions,
        timestamps.to(torch.int64),
        torch.tensor([0, n], device=device),
        torch.zeros(0, dtype=torch.int64, device=device),  # no candidates: the history alone
        torch.zeros(2, dtype=torch.int64, device=device),
        torch.tensor([query_time], dtype=torch.int64, device=device),
    )
    inputs = prepare(model, batch)
    stack = model.encoder
    tokens = model.tokens(batch, inputs.rows)
    return encode_tokens(
        stack.input, stack.layers, tokens, inputs.hstu, inputs.rows.timestamps, query_time
    )


@torch.no_grad()
def candidate_logits(
    model: HSTURanker, cache: HistoryCache, candidates: Tensor, *, microbatch: int = 1024,
    cuda_graph: bool = False,
) -> Tensor:
    """[M, K] task logits (BCE) or values (MSE) of ``candidates`` (item ids [M]) after
    ``cache``'s history, ``microbatch`` candidates per pass. ``cuda_graph``: on CUDA, replay
    a captured pass kept on the cache (:mod:`flexgr.ranking.cuda_graphs`; worth it when the
    cache is reused)."""
    stack = model.encoder

    def run(ids: Tensor) -> Tensor:
        tokens = model.candidate_tokens(ids)
        return model.head(candidate_pass(stack.input, stack.layers, tokens, cache))

    if cuda_graph:
        graphed = graphed_passes(run, cache.graphs, candidates, microbatch, "hstu-ranking")
        if graphed is not None:
            return graphed
    parts = microbatches(candidates.numel(), microbatch)
    return torch.cat([run(candidates[part]) for part in parts])


def history_content(
    model: HSTURanker, items: Tensor, actions: Tensor, timestamps: Tensor, query_time: int
) -> bytes:
    """What a cached history is checked against before it is reused: the inputs its keys and
    values depend on (the query time only where the relative bias reads it)."""
    return content_bytes(items, actions, timestamps, query_time if model.cfg.rel_bias else None)


def content_bytes(
    items: Tensor, actions: Tensor, timestamps: Tensor, query_time: int | None
) -> bytes:
    """The bytes of a history's items, actions and timestamps, their shape, and the query time
    (None: a model that does not read it, so any time matches)."""
    parts = [t.detach().to("cpu", torch.int64).contiguous() for t in (items, actions, timestamps)]
    shape = torch.tensor([items.shape[0], actions.shape[-1]], dtype=torch.int64)
    when = torch.tensor([0 if query_time is None else query_time], dtype=torch.int64)
    return b"".join(t.numpy().tobytes() for t in (shape, when, *parts))
