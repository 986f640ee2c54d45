"""Serving ``gesr-ranking``: a history encoded once per user, the item side once per model.

A GESR candidate meets its request's history in every expert without the history ever seeing
it, so everything that depends on the history alone can be computed once and kept across
scoring calls (:func:`encode_ranking_history`, a :class:`GESRHistoryCache`):

- the self expert's per-layer keys and values (M-FALCON, :mod:`flexgr.model.hstu.falcon`,
  whose ``encode_tokens`` and ``candidate_pass`` this reuses): a candidate then attends to the
  cached keys and to itself, never to another candidate, at the position and time it has in the
  normal forward;
- the user tower's output, and the cross attention's history keys and values;
- the history's items and timestamps, which the match join sorts once per scoring call (its
  microbatches then only look their candidates up).

Everything that depends on the item alone is computed once per loaded model for the whole
catalogue (:func:`item_side`, an :class:`ItemSide`): the item tower's outputs, the self
expert's candidate tokens (item plus the "no action yet" vector) and the cross attention's
queries. It is rebuilt when any tensor it was computed from changes (its storage or its
in-place version counter: ``load_state_dict``, an optimiser step, ``.to()``,
:func:`flexgr.gesr.quantise.quantise_linears`). Writes through ``param.data`` bypass the
version counter; call :func:`forget_item_side` after them.

:func:`candidate_logits` then runs only the per-candidate work, ``microbatch`` candidates at a
time: the match join, the cross attention's scores, the self expert's candidate rows and MLPG.
The four functions this module shares with :mod:`flexgr.ranking.falcon` (``falcon_unsupported``,
``encode_ranking_history``, ``candidate_logits``, ``history_content``) are what
:meth:`flexgr.ranking.scorer.Ranker.score` calls, so ``Ranker.score(..., cache_key=...)`` keeps
GESR histories in ``Ranker.history_cache`` as it does HSTU ones. ``tests/gesr/test_falcon.py``
checks the scores against the whole model run on ``history + candidates``.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flexgr.gesr.cross_layout import one_request_padding
from flexgr.gesr.matching import (
    HardMatchConfig,
    SortedHistory,
    candidate_counts,
    decay,
    features_of,
    one_history_join,
)
from flexgr.gesr.model import GESRRanker, self_expert_inputs
from flexgr.model.hstu.falcon import (
    HistoryCache,
    candidate_pass,
    check,
    encode_tokens,
    microbatches,
    unsupported,
)
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.falcon import content_bytes

# Items per item-tower pass when the item side is built: bounds the peak memory of a large
# catalogue without changing any value.
ITEM_SIDE_CHUNK = 65_536


@dataclass(frozen=True)
class GESRHistoryCache(HistoryCache):
    """One history's M-FALCON cache (the self expert's per-layer ``keys`` and ``values``, empty
    without that expert; ``timestamps`` [n]; ``length`` n) plus the other experts' history parts."""

    items: Tensor  # [n] history item ids: the match join's history side
    user: Tensor  # [K, d] the user tower's output
    cross_keys: Tensor | None  # [n, H, D] the cross attention's history keys
    cross_values: Tensor | None  # [n, H, D]

    def nbytes(self) -> int:
        extra = [self.items, self.user, self.cross_keys, self.cross_values]
        return super().nbytes() + sum(t.numel() * t.element_size() for t in extra if t is not None)


@dataclass(frozen=True)
class ItemSide:
    """Per-item inputs of every item index (row 0 is the padding id), for one set of weights."""

    item_tower: Tensor  # [N + 1, K, d] the item tower's outputs
    self_tokens: Tensor | None  # [N + 1, d] the self expert's candidate tokens
    cross_queries: Tensor | None  # [N + 1, H, D] the cross attention's queries
    version: tuple  # what the tensors were computed from (see item_side_version)

    def nbytes(self) -> int:
        parts = [self.item_tower, self.self_tokens, self.cross_queries]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def falcon_unsupported(model: GESRRanker) -> str | None:
    """Why the cached path cannot score this model, or None when it can."""
    return unsupported(model.encoder.cfg) if model.encoder is not None else None


@torch.no_grad()
def encode_ranking_history(
    model: GESRRanker, items: Tensor, actions: Tensor, timestamps: Tensor, query_time: int
) -> GESRHistoryCache:
    """One history (items [n], action codes [n, A], timestamps [n], oldest first) through the
    history side of the towers and the experts. Candidates are scored at ``query_time``."""
    n = items.shape[0]
    if model.encoder is not None:
        check(model.encoder.cfg, model.training, n)
    elif model.training:
        raise ValueError("cached GESR scoring runs in eval mode (model.eval())")
    elif n == 0:
        raise ValueError("the history is empty: the model needs at least one event")
    device = items.device
    timestamps = timestamps.to(torch.int64)
    # The offsets and the query time are made on the device (arange, full), not copied from
    # host memory: a copy from pageable memory waits for the device queue on CUDA.
    batch = RankingBatch(
        items,
        actions,
        timestamps,
        torch.arange(2, device=device) * n,  # [0, n]
        torch.zeros(0, dtype=torch.int64, device=device),  # no candidates: the history alone
        torch.zeros(2, dtype=torch.int64, device=device),
        torch.full((1,), int(query_time), dtype=torch.int64, device=device),
    )
    # candidate_seq [0]: one row of the user tower, that of the only sequence.
    first = torch.zeros(1, dtype=torch.int64, device=device)
    user_1Kd, _, history_nd = model.towers.towers(batch, torch.zeros_like(items), first)
    cross_keys = cross_values = None
    if model.cross is not None:
        cross_keys, cross_values = model.cross.keys_values(history_nd)
    keys: list[Tensor] = []
    values: list[Tensor] = []
    candidate_bias: list[Tensor | None] = []
    if model.encoder is not None:
        # One history and no candidates: its merged token rows are 0..n-1, the history tokens.
        rows, hstu = self_expert_inputs(model.encoder, batch)
        stack = model.encoder
        encoded = encode_tokens(
            stack.input, stack.layers, history_nd, hstu, rows.timestamps, query_time
        )
        keys, values, candidate_bias = encoded.keys, encoded.values, encoded.candidate_bias
    return GESRHistoryCache(
        keys,
        values,
        timestamps,
        int(query_time),
        n,
        items,
        user_1Kd[0],
        cross_keys,
        cross_values,
        candidate_bias=candidate_bias,
    )


def item_side_modules(model: GESRRanker) -> list[nn.Module | nn.Parameter]:
    """What the item side is computed from: the item table and tower, the placeholder action
    and the cross attention's query projection."""
    parts: list[nn.Module | nn.Parameter] = [model.towers.item_emb, model.towers.item_tower]
    if model.placeholder is not None:
        parts.append(model.placeholder)
    if model.cross is not None:
        parts.append(model.cross.q)
    return parts


def _tensors(part: nn.Module | nn.Parameter) -> Iterator[Tensor]:
    if isinstance(part, nn.Parameter):
        return iter([part])
    return itertools.chain(part.parameters(), part.buffers())


def item_side_version(model: GESRRanker) -> tuple:
    """Storage, in-place version, dtype and device of every tensor the item side reads: any
    weight change (in place or by replacement) and any move or cast gives another value."""
    return tuple(
        (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
        for part in item_side_modules(model)
        for t in _tensors(part)
    )


@torch.no_grad()
def item_rows(model: GESRRanker, items: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(item tower [M, K, d], self tokens [M, d] or None, cross queries [M, H, D] or None) of
    item ids [M]: the per-item work of the forward, for any set of items."""
    towers = model.towers
    K, d = len(model.cfg.tasks), model.cfg.d_model
    emb_Md = towers.item_emb(items)
    tower_MKd = towers.item_tower(emb_Md).view(-1, K, d)
    tokens = emb_Md + model.placeholder if model.placeholder is not None else None
    queries = model.cross.queries(emb_Md) if model.cross is not None else None
    return tower_MKd, tokens, queries


_ITEM_SIDES: weakref.WeakKeyDictionary[GESRRanker, ItemSide] = weakref.WeakKeyDictionary()
_ITEM_SIDES_LOCK = threading.Lock()


@torch.no_grad()
def item_side(model: GESRRanker) -> ItemSide:
    """The model's item side for its current weights: built on first use (eval mode), kept
    while the model lives, rebuilt when :func:`item_side_version` changes."""
    if model.training:
        raise ValueError("the item side is built in eval mode (model.eval())")
    version = item_side_version(model)
    with _ITEM_SIDES_LOCK:
        kept = _ITEM_SIDES.get(model)
        if kept is not None and kept.version == version:
            return kept
        ids = torch.arange(model.cfg.num_items + 1, device=model.towers.item_emb.weight.device)
        chunks = [item_rows(model, part) for part in ids.split(ITEM_SIDE_CHUNK)]
        tower, tokens, queries = (
            torch.cat(column) if column[0] is not None else None  # type: ignore[arg-type]
            for column in zip(*chunks, strict=True)
        )
        assert tower is not None
        built = ItemSide(tower, tokens, queries, version)
        _ITEM_SIDES[model] = built
        return built


def forget_item_side(model: GESRRanker) -> None:
    """Drop the model's item side (the next call rebuilds it)."""
    with _ITEM_SIDES_LOCK:
        _ITEM_SIDES.pop(model, None)


@torch.no_grad()
def candidate_logits(
    model: GESRRanker,
    cache: GESRHistoryCache,
    candidates: Tensor,
    *,
    microbatch: int = 1024,
    use_item_side: bool = True,
) -> Tensor:
    """[M, K] task logits (BCE) or values (MSE) of ``candidates`` (item ids [M]) after
    ``cache``'s history, ``microbatch`` candidates per pass. ``use_item_side=False`` computes
    the per-item inputs for these candidates instead of reading :func:`item_side`."""
    n, device = cache.length, candidates.device
    table = item_side(model) if use_item_side else None
    match_cfg = model.cfg.match_config()
    join = history_join(match_cfg, cache) if model.match is not None else None
    out = []
    for part in microbatches(candidates.numel(), microbatch):
        chunk = candidates[part]
        m = chunk.numel()
        if table is None:
            tower_mKd, tokens, queries = item_rows(model, chunk)
        else:
            tower_mKd = table.item_tower[chunk]
            tokens = table.self_tokens[chunk] if table.self_tokens is not None else None
            queries = table.cross_queries[chunk] if table.cross_queries is not None else None
        parts: list[Tensor] = []  # in EXPERTS order, as GESRRanker.experts
        if model.match is not None:
            assert join is not None
            values = chunk.long()
            counts = candidate_counts(join, values, values, match_cfg.ignore_value)
            parts.append(model.match(features_of(match_cfg, counts).unsqueeze(1)))
        if model.cross is not None:
            # One request: the padded layout has no padding, whatever model.cross_impl says.
            assert queries is not None and cache.cross_keys is not None
            assert cache.cross_values is not None
            layout = one_request_padding(n, m, device)
            parts.append(model.cross.attend(queries, cache.cross_keys, cache.cross_values, layout))
        if model.encoder is not None:
            assert tokens is not None
            stack = model.encoder
            parts.append(candidate_pass(stack.input, stack.layers, tokens, cache))
        user_mKd = cache.user.unsqueeze(0).expand(m, -1, -1)
        out.append(model.fused_logits(parts, user_mKd, tower_mKd))
    return torch.cat(out)


def history_join(cfg: HardMatchConfig, cache: GESRHistoryCache) -> SortedHistory:
    """The match join's history side, once per scoring call: the history's items sorted (one
    request: the items are the keys), weighted by recency at the cache's query time."""
    weights = None
    if cfg.half_life is not None:
        weights = decay(cache.query_time - cache.timestamps, cfg.half_life)
    return one_history_join(cache.items, weights, cfg.ignore_value)


def history_content(
    model: GESRRanker, items: Tensor, actions: Tensor, timestamps: Tensor, query_time: int
) -> bytes:
    """What a cached history is checked against before it is reused: the inputs it depends on.
    The query time counts only where something reads it: the self expert's time bias (the last
    history token reads it) or the match expert's recency weights."""
    cfg = model.cfg
    reads_time = (model.encoder is not None and cfg.self_rel_bias) or (
        model.match is not None and cfg.match_half_life is not None
    )
    return content_bytes(items, actions, timestamps, query_time if reads_time else None)
