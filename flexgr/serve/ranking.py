"""Serving a ranking model: ``/score`` answers each candidate's per-task predictions.

A request is checked on the event loop (ids, actions, timestamps, limits) and becomes a
:class:`RankJob`; the batch thread then runs the jobs of a batch one after the other through
``Ranker.score``. Ranking requests are not packed across users: M-FALCON already encodes a
history once for all of its candidates (and keeps it for the user's next request), and one pass
over several users' histories would need a jagged history cache that flexgr.ranking does not
have. The batcher still bounds the queue and keeps the model off the event loop.

The history cache is ``Ranker.history_cache`` (LRU): a dataset user is kept under its user id,
a raw history under the request's ``cache_key``; each entry is checked against the history's
content (events, actions, timestamps, query time), so a user whose history changed is encoded
again (``"stale"``), never scored from old keys and values.

With ``summaries`` (a VISTA model and its summary store, :mod:`flexgr.serve.summaries`), a
request that names a user is answered from the user's stored summary by stage 2 alone; a
request with a history still runs the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from flexgr.data import DataError, InteractionData
from flexgr.export import UnknownItemError
from flexgr.model.hstu.falcon import HistoryStore
from flexgr.ranking.scorer import Ranker
from flexgr.serve.errors import RequestError, bad_request, unknown_item, unknown_user
from flexgr.serve.schemas import RankScoreRequest, RawId
from flexgr.serve.service import checked_query_time, checked_timestamps
from flexgr.serve.summaries import SummaryJob, SummaryResult, SummaryServing

Actions = dict[str, list[float]]


@dataclass
class RankingOptions:
    max_candidates: int = 10_000  # candidates one request may send
    microbatch: int = 1024  # candidates per pass over the cached history (Ranker.score's)
    cache_entries: int = 64  # histories kept across requests (0: none kept)
    cache_bytes: int | None = None  # bound on their keys and values (None: entries only)


@dataclass(frozen=True)
class RankJob:
    history: list[str]  # raw item ids, oldest first: the most recent max_seq_len events
    actions: Actions  # input name -> one value per history event
    timestamps: list[int]
    query_time: int
    candidates: list[str]
    cache_key: Hashable | None  # None: this history is not kept


@dataclass(frozen=True)
class RankResult:
    predictions: list[dict[str, float]]  # one {task: value} per candidate, in order
    cache: str  # "hit", "miss", "stale" (the key's history changed) or "off" (not cached)


class RankingUsers:
    """The run's dataset, for requests by user id: each user's events with their actions."""

    def __init__(self, data: InteractionData, ranker: Ranker) -> None:
        lacking = [n for n in ranker.action_inputs if n != "rating" and n not in data.actions]
        if lacking:
            raise DataError(
                f"dataset {data.name!r} has no action column {', '.join(map(repr, lacking))}, "
                "which the model reads"
            )
        self.data = data
        self.name = data.name
        self.inputs = ranker.action_inputs
        known = set(ranker.item_ids)
        # Dataset item index -> whether the model has it (an export of another item set).
        self.known = np.array([False, *(raw in known for raw in data.item_ids)])

    @property
    def count(self) -> int:
        return self.data.num_users

    def history(self, user: str) -> tuple[list[str], Actions, list[int]]:
        """(raw item ids, actions, timestamps) of every event of ``user`` the model knows,
        oldest first."""
        data = self.data
        try:
            events = data.events_of(data.user_index(user))
        except DataError as err:
            raise unknown_user(str(err)) from None
        items = data.items[events]
        keep = self.known[items]
        columns = {
            name: (data.ratings if name == "rating" else data.actions[name])[events][keep]
            for name in self.inputs
        }
        raw = [data.item_ids[i - 1] for i in items[keep]]
        actions = {name: values.astype(np.float64).tolist() for name, values in columns.items()}
        return raw, actions, data.timestamps[events][keep].tolist()


class RankingService:
    """A ranking model behind ``/score``: what :class:`~flexgr.serve.service.Service` is for
    retrieval (requests -> jobs on the event loop, batches of jobs in the batch thread)."""

    def __init__(
        self,
        ranker: Ranker,
        *,
        users: RankingUsers | None = None,
        options: RankingOptions | None = None,
        weights: str = "model",
        summaries: SummaryServing | None = None,
    ) -> None:
        self.ranker = ranker
        self.users = users
        self.summaries = summaries
        self.options = options or RankingOptions()
        self.weights = weights
        self.num_items = len(ranker.item_ids)
        self.max_seq_len = ranker.max_seq_len
        self.falcon_unsupported = ranker.falcon_unsupported
        if self.options.cache_entries > 0:
            ranker.history_cache = HistoryStore(
                max_entries=self.options.cache_entries, max_bytes=self.options.cache_bytes
            )
        self.caching = self.options.cache_entries > 0 and self.falcon_unsupported is None

    @property
    def method(self) -> str:
        per = f"in microbatches of {self.options.microbatch}"
        if self.falcon_unsupported is None:
            return (
                "ranking: M-FALCON (the history's keys and values computed once, the candidates "
                f"{per} as targets of it)"
            )
        return f"ranking: the whole model on history + candidates {per} ({self.falcon_unsupported})"

    # ------------------------------------------------------------ requests -> jobs

    def score_job(self, request: RankScoreRequest) -> RankJob | SummaryJob:
        count, most = len(request.candidates), self.options.max_candidates
        if not 1 <= count <= most:
            raise bad_request(f"candidates must hold 1 to {most:,} item ids, got {count:,}")
        candidates = self._known(request.candidates, "candidates")
        if (request.user is None) == (request.history is None):
            raise bad_request("give either user (a user of the run's dataset) or history")
        if request.user is not None and self.summaries is not None:
            self._no_history_fields(request)
            return self.summaries.job(str(request.user), request.query_time, candidates)
        if request.user is not None:
            history, actions, times, key = self._user(request)
        else:
            history, actions, times, key = self._history(request)
        if len(history) > self.max_seq_len:
            recent = slice(len(history) - self.max_seq_len, len(history))
            history, times = history[recent], times[recent]
            actions = {name: values[recent] for name, values in actions.items()}
        query_time = checked_query_time(request.query_time, times[-1])
        return RankJob(history, actions, times, query_time, candidates, key)

    @staticmethod
    def _no_history_fields(request: RankScoreRequest) -> None:
        extra = [
            f for f in ("timestamps", "actions", "cache_key") if getattr(request, f) is not None
        ]
        if extra:
            raise bad_request(f"{', '.join(extra)} go with history; a dataset user brings its own")

    def _user(self, request: RankScoreRequest) -> tuple[list[str], Actions, list[int], Hashable]:
        self._no_history_fields(request)
        if self.users is None:
            raise RequestError(
                404, "no_users", "this server has no dataset users; send a history instead"
            )
        history, actions, times = self.users.history(str(request.user))
        if not history:
            raise bad_request(f"user {request.user!r} has no events the model knows")
        return history, actions, times, ("user", str(request.user))

    def _history(
        self, request: RankScoreRequest
    ) -> tuple[list[str], Actions, list[int], Hashable | None]:
        assert request.history is not None
        count = len(request.history)
        if count == 0:
            raise bad_request("history is empty: the model needs at least one event")
        history = self._known(request.history, "history")
        actions = self._actions(request.actions, count)
        times = checked_timestamps(request.timestamps, count).tolist()
        if count > self.max_seq_len and not request.truncate:
            raise bad_request(
                f"history has {count:,} events, the model reads at most {self.max_seq_len:,}: "
                "send the most recent ones, or truncate: true to have them picked"
            )
        key = None if request.cache_key is None else ("key", request.cache_key)
        return history, actions, times, key

    def _actions(self, given: list[float | None] | dict | None, count: int) -> Actions:
        names = self.ranker.action_inputs
        if given is None:
            raise bad_request(
                f"a ranking model reads each history event's actions ({', '.join(names)}): send "
                'actions: [...] (one value per event) or {"name": [...]} by input'
            )
        if isinstance(given, list):
            if len(names) != 1:
                raise bad_request(
                    f"the model reads {len(names)} action inputs; send actions as an object "
                    f"with {', '.join(names)}"
                )
            given = {names[0]: given}
        unknown = sorted(set(given) - set(names))
        missing = [name for name in names if name not in given]
        if unknown or missing:
            raise bad_request(
                f"actions must hold exactly {', '.join(names)}"
                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                + (f"; missing: {', '.join(missing)}" if missing else "")
            )
        out: Actions = {}
        for name in names:
            values = [math.nan if v is None else float(v) for v in given[name]]
            if len(values) != count:
                raise bad_request(f"{len(values):,} {name!r} actions for {count:,} history items")
            if any(math.isinf(v) for v in values):
                raise bad_request(f"action {name!r}: values must be finite")
            out[name] = values  # ranges are the model's to check (Ranker.score, in the batch)
        return out

    def _known(self, raw_ids: Sequence[RawId], field_name: str) -> list[str]:
        ids = [str(raw) for raw in raw_ids]
        try:
            for raw in ids:
                self.ranker.item_index(raw)
        except UnknownItemError as err:
            raise unknown_item(f"{field_name}: {err}") from None
        return ids

    def recommend_job(self, request: object) -> NoReturn:
        raise RequestError(
            422,
            "not_supported",
            f"this server serves a ranking model ({self.ranker.arch}); /recommend needs a "
            "retrieval model: send candidates to POST /score",
        )

    # ------------------------------------------------------------ batches (worker thread)

    def run_batch(
        self, jobs: Sequence[RankJob | SummaryJob]
    ) -> list[RankResult | SummaryResult | RequestError]:
        """Each history job alone (see the module docstring); the summary jobs together, packed
        into stage-2 passes. A job the model refuses (an action value out of its range) answers
        its own caller 422 and leaves the others of the batch be."""
        from_summaries = [job for job in jobs if isinstance(job, SummaryJob)]
        answered = iter(
            self.summaries.run(from_summaries, self.options.microbatch)
            if self.summaries is not None and from_summaries
            else []
        )
        return [next(answered) if isinstance(job, SummaryJob) else self._run(job) for job in jobs]

    def _run(self, job: RankJob) -> RankResult | RequestError:
        key = job.cache_key if self.caching else None
        stats = self.ranker.history_cache.stats
        hits, stale = stats.hits, stats.stale
        try:
            scored = self.ranker.score(
                job.history,
                job.candidates,
                actions=job.actions,
                timestamps=job.timestamps,
                query_time=job.query_time,
                microbatch=self.options.microbatch,
                cache_key=key,
            )
        except ValueError as err:  # the model's own checks of the actions
            return bad_request(str(err))
        if key is None:
            cache = "off"
        else:
            cache = "hit" if stats.hits > hits else "stale" if stats.stale > stale else "miss"
        return RankResult([predictions for _, predictions in scored], cache)

    def warm_up(self, max_batch: int) -> int:
        """Score once at short and full history lengths, with one candidate and a full
        microbatch, so first requests do not compile kernels (CUDA). Returns the calls run."""
        del max_batch  # jobs run one at a time: a batch of several is no new shape
        runs = 0
        value = {name: 4.0 if name == "rating" else 0.0 for name in self.ranker.action_inputs}
        item = self.ranker.item_ids[0]
        for length in sorted({1, max(1, self.max_seq_len // 2), self.max_seq_len}):
            for width in sorted({1, min(self.options.microbatch, self.options.max_candidates)}):
                actions = {name: [v] * length for name, v in value.items()}
                self.ranker.score(
                    [item] * length,
                    [item] * width,
                    actions=actions,
                    timestamps=list(range(length)),
                    microbatch=self.options.microbatch,
                )
                runs += 1
        if self.summaries is not None:
            runs += self.summaries.warm_up(
                sorted({1, min(self.options.microbatch, self.options.max_candidates)})
            )
        return runs

    # ------------------------------------------------------------ responses

    def response(
        self, job: RankJob | SummaryJob, result: RankResult | SummaryResult
    ) -> dict[str, Any]:
        if isinstance(job, SummaryJob):
            assert self.summaries is not None and isinstance(result, SummaryResult)
            return self.summaries.response(job, result)
        assert isinstance(result, RankResult)
        pairs = zip(job.candidates, result.predictions, strict=True)
        return {
            "tasks": self.ranker.tasks,
            "scores": [{"item": item, "predictions": p} for item, p in pairs],
            "method": self.method,
            "history_used": len(job.history),
            "history_cache": result.cache,
        }

    def metadata(self) -> dict[str, Any]:
        ranker, store = self.ranker, self.ranker.history_cache
        cfg = ranker.model.cfg
        kinds = list(cfg.task_kinds)
        stats = store.stats
        return {
            "task": "ranking",
            "arch": ranker.arch,
            "tasks": [
                {"name": name, "kind": kind, "output": "probability" if kind == "bce" else "value"}
                for name, kind in zip(ranker.tasks, kinds, strict=True)
            ],
            "action_inputs": ranker.action_inputs,
            "layout": getattr(cfg, "layout", None),
            "num_items": self.num_items,
            "max_seq_len": self.max_seq_len,
            "weights": self.weights,
            "dataset": self.users.name if self.users is not None else None,
            "users": self.users.count if self.users is not None else None,
            "limits": {"max_candidates": self.options.max_candidates},
            "score": self.method,
            "microbatch": self.options.microbatch,
            "history_cache": {
                "enabled": self.caching,
                "entries": len(store),
                "max_entries": store.max_entries,
                "bytes": store.nbytes(),
                "max_bytes": store.max_bytes,
                "hits": stats.hits,
                "misses": stats.misses,
                "stale": stats.stale,
                "evictions": stats.evictions,
            },
            "summaries": (
                self.summaries.metadata() if self.summaries is not None else {"served": False}
            ),
            "device": str(ranker.device),
            "config": ranker.config,
            "model_metadata": ranker.metadata,
        }
