"""A loaded ranking model: candidates after a history with actions in, per-task predictions out.

``flexgr.load(path)`` returns a :class:`Ranker` for ranking models. Histories are raw item ids,
oldest first, with each event's actions (for MovieLens its rating); every candidate is scored as
a target of the history (it sees the history and itself, never another candidate), so scores do
not depend on which other candidates are asked for, and candidates go through in microbatches.

HSTU ranking models score with M-FALCON (:mod:`flexgr.ranking.falcon`): the history's keys and
values are computed once per request, and, with ``cache_key``, kept across requests in
:attr:`Ranker.history_cache` (an LRU :class:`~flexgr.model.hstu.falcon.HistoryStore`).
GESR ranking models take the same path (:mod:`flexgr.gesr.falcon`: the history side of the
towers and experts cached the same way, the item side once per model).
The SASRec and two-tower rankers (whose candidates meet the history only in the head) keep
running the whole model per microbatch.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Mapping, Sequence
from functools import cache, cached_property
from types import ModuleType

import numpy as np
import torch

from flexgr.export.recommender import LoadedModel
from flexgr.model.hstu.falcon import HistoryCache, HistoryStore
from flexgr.model.registry import spec_of
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.modules import check_codes
from flexgr.ranking.tasks import predictions, rating_codes

Actions = Sequence[float] | Mapping[str, Sequence[float]]
HISTORY_CACHE_ENTRIES = 64  # Ranker.history_cache's default bound (replace it to change)


@cache
def _takes_cuda_graph(module: ModuleType) -> bool:
    """Whether a falcon module's ``candidate_logits`` can replay CUDA graphs (read once per
    module, not on every request)."""
    return "cuda_graph" in inspect.signature(module.candidate_logits).parameters


def falcon_module(arch: str) -> ModuleType | None:
    """The module with the cached path's functions for ``arch`` (``falcon_unsupported``,
    ``encode_ranking_history``, ``candidate_logits``, ``history_content``), or None."""
    if arch == "hstu-ranking":
        import flexgr.ranking.falcon as module
    elif arch == "gesr-ranking":
        import flexgr.gesr.falcon as module
    else:
        return None
    return module


class Ranker(LoadedModel):
    """A ranking model (see :class:`~flexgr.export.recommender.LoadedModel`). ``tasks`` are the
    model's outputs; BCE tasks give probabilities, MSE tasks values (a rating)."""

    @property
    def tasks(self) -> list[str]:
        return list(self.model.cfg.tasks)

    @property
    def action_inputs(self) -> list[str]:
        return list(self.model.cfg.action_inputs)

    @property
    def max_seq_len(self) -> int:
        return int(self.model.cfg.max_seq_len)

    @cached_property
    def history_cache(self) -> HistoryStore:
        """The histories kept across :meth:`score` calls that pass ``cache_key`` (LRU, at most
        ``HISTORY_CACHE_ENTRIES``); assign ``HistoryStore(max_entries=..., max_bytes=...)``
        for other bounds. ``.stats`` counts hits, misses, stale keys and evictions."""
        return HistoryStore(max_entries=HISTORY_CACHE_ENTRIES)

    @property
    def falcon_unsupported(self) -> str | None:
        """Why :meth:`score` does not use M-FALCON for this model, or None when it does."""
        module = falcon_module(spec_of(self.model).name)
        if module is None:
            return f"{self.arch} has no cached path (hstu-ranking and gesr-ranking have)"
        return module.falcon_unsupported(self.model)

    def _codes(self, actions: Actions | None, n: int) -> np.ndarray:
        """int64 [n, A] action codes of the history, checked against the model's tables."""
        names = self.action_inputs
        if actions is None:
            raise ValueError(
                f"a ranking model reads each history event's actions ({', '.join(names)}); "
                "pass actions=[...] (one value per event) or a dict by name"
            )
        columns = dict(actions) if isinstance(actions, Mapping) else None
        if columns is None:
            if len(names) != 1:
                raise ValueError(f"the model reads {len(names)} actions; pass a dict {names}")
            columns = {names[0]: actions}  # type: ignore[dict-item]
        missing = [name for name in names if name not in columns]
        if missing:
            raise ValueError(f"actions lack {', '.join(map(repr, missing))} (need {names})")
        codes = np.zeros((n, len(names)), dtype=np.int64)
        for a, name in enumerate(names):
            values = np.asarray(list(columns[name]), dtype=np.float64)
            if len(values) != n:
                raise ValueError(f"{len(values)} {name!r} actions for {n} history items")
            if name == "rating":
                known = values[~np.isnan(values)]
                if ((known < 0.5) | (known > 5.0)).any():
                    raise ValueError("rating actions must be in 0.5 .. 5 (NaN for unknown)")
                codes[:, a] = rating_codes(values)
            else:
                if (values != np.floor(values)).any() or (values < 0).any():
                    raise ValueError(f"action {name!r} values must be non-negative integers")
                codes[:, a] = values.astype(np.int64)
        cfg = self.model.cfg
        bits = [cfg.action_encoding == "bits" and name != "rating" for name in names]
        check_codes(torch.from_numpy(codes), list(cfg.action_vocab), bits, names)
        return codes

    @torch.no_grad()
    def score(
        self,
        history: Sequence[str],
        candidates: Sequence[str],
        *,
        actions: Actions | None = None,
        timestamps: Sequence[int] | None = None,
        query_time: int | None = None,
        microbatch: int = 1024,
        truncate: bool = False,
        cache_key: Hashable | None = None,
        falcon: bool = True,
        cuda_graphs: bool = True,
    ) -> list[tuple[str, dict[str, float]]]:
        """(raw id, {task: prediction}) for every candidate, in the order given.

        ``actions``: each history event's action inputs (one list for a single input such as
        the rating, else a dict by name). ``timestamps`` (seconds) feed the time bias; the query
        time defaults to the last event's. A history longer than the model's ``max_seq_len`` is
        an error unless ``truncate=True`` (then its most recent events are read).

        HSTU and GESR ranking models score with M-FALCON (``falcon=True``, the default; see
        :attr:`falcon_unsupported`): the history's per-layer keys and values once, then
        ``microbatch`` candidates per pass over them. ``cache_key`` (e.g. the user id, or
        (user, history version)) keeps that history in :attr:`history_cache`: a later call
        with the same key and the same history, actions, timestamps (and query time, which the
        time bias reads) skips the history; a key reused for another history is encoded again.
        ``falcon=False``, and the other rankers: every microbatch runs the whole model on
        ``history + microbatch`` (the same predictions; ``cache_key`` is then ignored).
        ``cuda_graphs``: on CUDA, a cache hit of an HSTU ranking model replays its candidate
        pass as a CUDA graph captured on the first hit (:mod:`flexgr.ranking.cuda_graphs`)."""
        if len(candidates) == 0:
            raise ValueError("no candidates to score")
        if len(history) == 0:
            raise ValueError("history is empty: the model needs at least one event")
        if microbatch < 1:
            raise ValueError(f"microbatch must be >= 1, got {microbatch}")
        if timestamps is not None and len(timestamps) != len(history):
            raise ValueError(f"{len(timestamps)} timestamps for {len(history)} history items")
        codes = self._codes(actions, len(history))
        n = len(history)
        if n > self.max_seq_len:
            if not truncate:
                raise ValueError(
                    f"history has {n} events, the model reads at most {self.max_seq_len}; pass "
                    f"truncate=True to score after the most recent {self.max_seq_len}"
                )
            keep = slice(n - self.max_seq_len, n)
            history, codes = list(history)[keep], codes[keep]
            timestamps = list(timestamps)[keep] if timestamps is not None else None
        items = torch.tensor([self.item_index(raw) for raw in history], dtype=torch.int64)
        cands = torch.tensor([self.item_index(raw) for raw in candidates], dtype=torch.int64)
        ts = torch.zeros_like(items) if timestamps is None else torch.tensor(list(timestamps))
        qt = int(ts[-1]) if query_time is None else int(query_time)
        ts = ts.to(torch.int64)
        actions_NA = torch.from_numpy(codes)
        kinds = list(self.model.cfg.task_kinds)
        if falcon and self.falcon_unsupported is None:
            logits = self._falcon_logits(
                items, actions_NA, ts, qt, cands, microbatch, cache_key, cuda_graphs
            )
            out = [predictions(logits.float(), kinds).cpu()]
        else:
            out = [
                predictions(logits.float(), kinds).cpu()
                for logits in self._target_logits(items, actions_NA, ts, qt, cands, microbatch)
            ]
        values = torch.cat(out).tolist()
        names = self.tasks
        return [
            (raw, dict(zip(names, row, strict=True)))
            for raw, row in zip(candidates, values, strict=True)
        ]

    def _falcon_logits(
        self,
        items: torch.Tensor,
        actions: torch.Tensor,
        timestamps: torch.Tensor,
        query_time: int,
        candidates: torch.Tensor,
        microbatch: int,
        cache_key: Hashable | None,
        cuda_graphs: bool,
    ) -> torch.Tensor:
        module = falcon_module(spec_of(self.model).name)
        assert module is not None  # falcon_unsupported said the model has the path
        device = self.device
        cache: HistoryCache | None = None
        if cache_key is not None:
            content = module.history_content(self.model, items, actions, timestamps, query_time)
            cache = self.history_cache.get(cache_key, content)
        # A reused history replays a captured pass (captured on its first reuse).
        graph = cuda_graphs and cache is not None and device.type == "cuda" and (
            _takes_cuda_graph(module)
        )
        extra = {"cuda_graph": True} if graph else {}
        if cache is None:
            history = (items.to(device), actions.to(device), timestamps.to(device))
            cache = module.encode_ranking_history(self.model, *history, query_time)
            if cache_key is not None:
                self.history_cache.put(cache_key, content, cache)
        return module.candidate_logits(
            self.model, cache, candidates.to(device), microbatch=microbatch, **extra
        )

    def _target_logits(
        self,
        items: torch.Tensor,
        actions: torch.Tensor,
        timestamps: torch.Tensor,
        query_time: int,
        candidates: torch.Tensor,
        microbatch: int,
    ) -> list[torch.Tensor]:
        """Each microbatch as the targets of one sequence, the whole model run on it."""
        spec, out = spec_of(self.model), []
        for start in range(0, len(candidates), microbatch):
            chunk = candidates[start : start + microbatch]
            batch = RankingBatch(
                items,
                actions,
                timestamps,
                torch.tensor([0, len(items)]),
                chunk,
                torch.tensor([0, len(chunk)]),
                torch.tensor([query_time]),
            ).to(self.device)
            out.append(self.model(batch, spec.prepare(self.model, batch)))
        return out

    def __repr__(self) -> str:
        return f"Ranker(arch={self.arch!r}, tasks={self.tasks}, items={len(self.item_ids)})"
