"""What the server computes, apart from HTTP: requests checked and turned into jobs (on the
event loop, cheap), and batches of jobs run on the model (in the batcher's thread).

Scoring is the retrieval model's: the user's state (the model's output at the last history
position) dotted with the L2-normalised item embeddings, exactly what ``Recommender.scores``
and offline evaluation compute. ``/score`` scores given candidates the same way. Ranking
models (per-task predictions, M-FALCON) are served by :mod:`flexgr.serve.ranking` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flexgr.data import DataError, InteractionData
from flexgr.export import Recommender, UnknownItemError
from flexgr.serve.ann import ApproximateIndex
from flexgr.serve.errors import RequestError, bad_request, unknown_item, unknown_user
from flexgr.serve.schemas import HistoryQuery, RawId, RecommendRequest, ScoreRequest
from flexgr.serve.topk import exact_top_k

# Timestamps go into int64 tensors; this keeps gaps between them from overflowing too.
_TIME_LIMIT = 2**62
SCORE_METHOD = "retrieval: dot product of the user state and the candidates' item embeddings"


@dataclass(frozen=True)
class Query:
    """A checked history: item indices and timestamps of the events the model reads."""

    ids: Tensor  # [n] int64, 1..num_items, the most recent max_seq_len events
    timestamps: Tensor  # [n] int64
    query_time: int


@dataclass(frozen=True)
class RecommendJob:
    query: Query
    k: int
    excluded: Tensor  # [m] int64 item indices left out of the result


@dataclass(frozen=True)
class ScoreJob:
    query: Query
    candidates: Tensor  # [c] int64 item indices


Job = RecommendJob | ScoreJob


@dataclass
class Limits:
    max_k: int = 1000
    max_candidates: int = 10_000
    # Tokens per model call when a batch is encoded (0: the whole batch at once).
    max_batch_tokens: int = 0


@dataclass
class DatasetUsers:
    """The run's dataset, for requests by user id: each user's whole history (oldest first),
    with item indices translated to the model's."""

    data: InteractionData
    to_model: np.ndarray  # dataset item index -> model item index (0: the model lacks it)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.data.name

    @classmethod
    def of(cls, data: InteractionData, recommender: Recommender) -> DatasetUsers:
        known = recommender.item_ids
        if known[: data.num_items] == data.item_ids:
            to_model = np.arange(data.num_items + 1, dtype=np.int64)
        else:
            index = {raw: i for i, raw in enumerate(known, start=1)}
            to_model = np.array([0, *(index.get(raw, 0) for raw in data.item_ids)], np.int64)
        return cls(data, to_model)

    @property
    def count(self) -> int:
        return self.data.num_users

    def history(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        """(model item indices, timestamps) of every event of ``user``, oldest first."""
        try:
            index = self.data.user_index(user)
        except DataError as err:
            raise unknown_user(str(err)) from None
        events = self.data.events_of(index)
        items = self.to_model[self.data.items[events]]
        return items[items > 0], self.data.timestamps[events][items > 0]


class Service:
    """The model, its item table, optionally the dataset's users and an approximate index."""

    def __init__(
        self,
        recommender: Recommender,
        *,
        users: DatasetUsers | None = None,
        limits: Limits | None = None,
        ann: ApproximateIndex | None = None,
        weights: str = "model",
    ) -> None:
        self.recommender = recommender
        self.users = users
        self.limits = limits or Limits()
        self.ann = ann
        self.weights = weights
        with torch.no_grad():
            # Normalised once: the table does not change while serving.
            self.table = recommender.model.item_embeddings().float().contiguous()
        self.num_items = recommender.num_items
        self.max_seq_len = recommender.max_seq_len

    # ------------------------------------------------------------ requests -> jobs

    def recommend_job(self, request: RecommendRequest) -> RecommendJob:
        top = min(self.limits.max_k, self.num_items)
        if not 1 <= request.k <= top:
            raise RequestError(
                422, "k_out_of_range", f"k must be between 1 and {top:,}, got {request.k:,}"
            )
        query, seen = self._query(request)
        excluded = set(self._indices(request.exclude, "exclude"))
        if request.exclude_history:
            excluded.update(seen)
        return RecommendJob(query, request.k, torch.tensor(sorted(excluded), dtype=torch.int64))

    def score_job(self, request: ScoreRequest) -> ScoreJob:
        count = len(request.candidates)
        if not 1 <= count <= self.limits.max_candidates:
            raise bad_request(
                f"candidates must hold 1 to {self.limits.max_candidates:,} item ids, got {count:,}"
            )
        query, _ = self._query(request)
        candidates = torch.tensor(self._indices(request.candidates, "candidates"))
        return ScoreJob(query, candidates)

    def _query(self, request: HistoryQuery) -> tuple[Query, list[int]]:
        """The checked query and every item index of the user's history (for exclusion)."""
        if (request.user is None) == (request.history is None):
            raise bad_request("give either user (a user of the run's dataset) or history")
        if request.user is not None:
            if request.timestamps is not None:
                raise bad_request("timestamps go with history; a dataset user brings its own")
            if self.users is None:
                raise RequestError(
                    404, "no_users", "this server has no dataset users; send a history instead"
                )
            items, times = self.users.history(str(request.user))
            if len(items) == 0:
                raise bad_request(f"user {request.user!r} has no events the model knows")
            ids = torch.from_numpy(items)
            timestamps = torch.from_numpy(np.ascontiguousarray(times, dtype=np.int64))
        else:
            assert request.history is not None
            if not request.history:
                raise bad_request("history is empty: the model needs at least one item")
            ids = torch.tensor(self._indices(request.history, "history"), dtype=torch.int64)
            timestamps = self._timestamps(request.timestamps, len(ids))
        seen = ids.unique().tolist()
        recent = slice(max(0, len(ids) - self.max_seq_len), len(ids))
        ids, timestamps = ids[recent].contiguous(), timestamps[recent].contiguous()
        query_time = checked_query_time(request.query_time, int(timestamps[-1]))
        return Query(ids, timestamps, query_time), seen

    def _timestamps(self, values: list[int] | None, count: int) -> Tensor:
        return checked_timestamps(values, count)

    def _indices(self, raw_ids: Sequence[RawId], field_name: str) -> list[int]:
        try:
            return [self.recommender.item_index(str(raw)) for raw in raw_ids]
        except UnknownItemError as err:
            raise unknown_item(f"{field_name}: {err}") from None

    def warm_up(self, max_batch: int) -> int:
        """Run the model once per batch size 1, 2, 4, ... up to ``max_batch`` at short and full
        history lengths, so first requests do not pay for kernel compilation (on CUDA each new
        kernel specialisation compiles on first use). Returns the number of batches run."""
        runs = 0
        lengths = sorted({1, max(1, self.max_seq_len // 2), self.max_seq_len})
        size = 1
        while True:
            for length in lengths:
                ids = torch.ones(length, dtype=torch.int64)
                times = torch.arange(length, dtype=torch.int64)
                query = Query(ids, times, length)
                job = RecommendJob(query, 1, torch.empty(0, dtype=torch.int64))
                self.run_batch([job] * min(size, max_batch))
                runs += 1
            if size >= max_batch:
                return runs
            size *= 2

    # ------------------------------------------------------------ batches (worker thread)

    @torch.no_grad()
    def run_batch(self, jobs: Sequence[Job]) -> list[Any]:
        """One model call (or a few, by max_batch_tokens) for every job's user state, then
        each job's items or scores."""
        states = self.recommender.embed(
            [(j.query.ids, j.query.timestamps, j.query.query_time) for j in jobs],
            chunk_tokens=self.limits.max_batch_tokens,
        ).float()
        results: list[Any] = [None] * len(jobs)
        wanted = [i for i, job in enumerate(jobs) if isinstance(job, RecommendJob)]
        if wanted:
            picked = [jobs[i] for i in wanted]
            for i, items in zip(wanted, self._top(states[wanted], picked), strict=True):
                results[i] = items
        for i, job in enumerate(jobs):
            if isinstance(job, ScoreJob):
                results[i] = self._score(states[i], job)
        return results

    def _top(self, users: Tensor, jobs: Sequence[RecommendJob]) -> list[list[tuple[int, float]]]:
        k = max(job.k for job in jobs)
        excluded = [job.excluded for job in jobs]
        if self.ann is not None:
            scores, items = self.ann.search(users, k, excluded)
        else:
            scores, items = exact_top_k(users, self.table[1:], k, excluded)
        out = []
        for row, job in enumerate(jobs):
            pairs = zip(items[row, : job.k].tolist(), scores[row, : job.k].tolist(), strict=True)
            out.append([(i, s) for i, s in pairs if s != float("-inf") and i > 0])
        return out

    def _score(self, user: Tensor, job: ScoreJob) -> list[float]:
        # The retrieval score; ranking models are flexgr.serve.ranking.RankingService's.
        return (self.table[job.candidates.to(self.table.device)] @ user).tolist()

    # ------------------------------------------------------------ responses

    def item_id(self, index: int) -> str:
        return self.recommender.item_ids[index - 1]

    def metadata(self) -> dict[str, Any]:
        rec = self.recommender
        return {
            "task": "retrieval",
            "arch": rec.arch,
            "num_items": self.num_items,
            "max_seq_len": self.max_seq_len,
            "weights": self.weights,
            "dataset": self.users.name if self.users is not None else None,
            "users": self.users.count if self.users is not None else None,
            "limits": {
                "max_k": min(self.limits.max_k, self.num_items),
                "max_candidates": self.limits.max_candidates,
            },
            "score": SCORE_METHOD,
            "top_k": self.ann.describe() if self.ann is not None else {"method": "exact"},
            "device": str(rec.device),
            "config": rec.config,
            "model_metadata": rec.metadata,
        }


def checked_timestamps(values: list[int] | None, count: int) -> Tensor:
    """[count] int64 timestamps of a history (zeros when none are given: every event
    simultaneous); 422 for a count that does not match, a value out of range, or a decrease."""
    if values is None:
        return torch.zeros(count, dtype=torch.int64)  # every event simultaneous
    if len(values) != count:
        raise bad_request(f"{len(values):,} timestamps for {count:,} history items")
    if any(abs(t) >= _TIME_LIMIT for t in values):
        raise bad_request("a timestamp is out of range (|t| < 2**62)")
    times = torch.tensor(values, dtype=torch.int64)
    if count > 1 and bool((times[1:] < times[:-1]).any()):
        first = int((times[1:] < times[:-1]).nonzero()[0, 0]) + 1
        raise bad_request(
            f"timestamps must not decrease (history is oldest first): entry {first} "
            f"({values[first]}) is before entry {first - 1} ({values[first - 1]})"
        )
    return times


def checked_query_time(query_time: int | None, last: int) -> int:
    """The query time (default: ``last``, the last event's timestamp); 422 when it is out of
    range or before ``last``."""
    query_time = last if query_time is None else query_time
    if abs(query_time) >= _TIME_LIMIT:
        raise bad_request(f"query_time {query_time} is out of range")
    if query_time < last:
        raise bad_request(f"query_time {query_time} is before the last event's timestamp {last}")
    return query_time
