"""The ceiling and floors of a synthetic ranking dataset, on a ranking run's own requests.

For a prepared dataset of a generator with ratings (``synthetic-ranking``), regenerate its
stream from meta.json (same digest, so the same events), take the impressions of the split's
requests exactly as training and evaluation do (:func:`flexgr.ranking.setup.ranking_data`),
and score them with the oracle and the baselines of :mod:`flexgr.data.synthetic_oracle`,
through the same metrics as a trained model (:func:`flexgr.ranking.metrics.task_metrics`).
A trained model's ``ne:like`` below the oracle's is a bug, not a result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flexgr.data import DataError, InteractionData
from flexgr.data.meta import DatasetMeta
from flexgr.data.synthetic import (
    GENERATORS,
    SyntheticStream,
    generate,
    params_from_options,
    source_digest,
)
from flexgr.data.synthetic_oracle import BASELINES, RatingForecast, baseline, oracle
from flexgr.ranking.metrics import task_metrics
from flexgr.ranking.requests import Which, impressions_of
from flexgr.ranking.setup import ranking_data
from flexgr.ranking.tasks import Task

PREDICTORS = ("oracle", *BASELINES)


def stream_of(meta: DatasetMeta) -> SyntheticStream:
    """The generated stream a prepared synthetic dataset was built from; DataError for any
    other dataset, or one without ratings."""
    name = meta.source.builtin
    if meta.source.kind != "synthetic" or name not in GENERATORS:
        raise DataError(f"dataset {meta.name!r} is not generated (source {meta.source.location})")
    params = params_from_options(name, meta.source.options)
    if source_digest(name, params) != meta.source.sha256:
        raise DataError(f"dataset {meta.name!r}: its meta.json options do not give its digest")
    if params.ratings is None:
        raise DataError(f"dataset {meta.name!r} ({name}) has no ratings; no oracle to compute")
    return generate(params)


def oracle_metrics(
    cfg: Any, data: InteractionData, stream: SyntheticStream, which: Which = "test"
) -> dict[str, dict[str, float]]:
    """{predictor: metrics} over the impressions of split ``which`` of a ranking config ``cfg``
    (a :class:`flexgr.train.config.Config`): ``ne:like``, ``auc:like``, ... as a run reports."""
    ranked = ranking_data(cfg, data)
    requests = ranked.requests.take(ranked.split.rows(which))
    rows, events = impressions_of(requests)
    _check_same_events(data, stream, events)
    labels, known = ranked.events.labels[events], ranked.events.known[events]
    users = requests.user[rows]
    forecasts = {"oracle": oracle(stream, events)}
    forecasts.update({name: baseline(stream, events, name) for name in BASELINES})
    out: dict[str, dict[str, float]] = {}
    for name, fc in forecasts.items():
        metrics: dict[str, float] = {"impressions": float(len(events))}
        for k, task in enumerate(ranked.tasks):
            p = _prediction(fc, task)
            metrics.update(task_metrics(task.name, task.kind, p, labels[:, k], known[:, k], users))
        out[name] = metrics
    return out


def candidates_in_history(cfg: Any, data: InteractionData, which: Which = "test") -> float:
    """Share of split ``which``'s impressions whose item occurs in the request's history (the
    last ``cfg.data.max_seq_len`` events before it): where an earlier rating of the same item, the
    persistent opinion's trace, is there to read."""
    ranked = ranking_data(cfg, data)
    requests = ranked.requests.take(ranked.split.rows(which))
    rows, events = impressions_of(requests)
    if not len(events):
        return float("nan")
    previous = _previous_occurrence(data)
    latest = previous[events]
    start = requests.start[rows]
    for _ in range(int(requests.sizes.max())):  # step back past earlier impressions
        inside = latest >= start
        if not inside.any():
            break
        latest = np.where(inside, previous[np.maximum(latest, 0)], latest)
    return float(np.mean(latest >= requests.history_start[rows]))


def _previous_occurrence(data: InteractionData) -> np.ndarray:
    """int64 [E]: the user's previous event on the same item, -1 for a first occurrence."""
    users = np.repeat(np.arange(data.num_users, dtype=np.int64), np.diff(data.user_offsets))
    pair = users * (data.num_catalog_items + 1) + data.items.astype(np.int64)
    order = np.argsort(pair, kind="stable")  # each pair's events in time order
    same = np.r_[False, pair[order][1:] == pair[order][:-1]]
    previous = np.full(len(pair), -1, dtype=np.int64)
    previous[order[same]] = order[np.flatnonzero(same) - 1]
    return previous


def _prediction(fc: RatingForecast, task: Task) -> np.ndarray:
    if task.source != "rating":
        raise DataError(f"task {task.name!r} reads {task.source!r}; the oracle knows ratings only")
    if task.rule == "at_least":
        return fc.at_least(task.threshold)
    if task.rule == "at_most":
        return fc.at_most(task.threshold)
    return fc.expected()


def _check_same_events(data: InteractionData, stream: SyntheticStream, events: np.ndarray) -> None:
    # Users are indexed by their numeric raw ids and a user's timestamps strictly increase, so
    # the prepared order is the generator's; checked on the evaluated events, not assumed.
    raw_items = np.asarray(data.pool_item_ids("catalog"))[data.items[events] - 1].astype(np.int64)
    generated = stream.events.items.cast("int64").to_numpy()[events]
    if len(data.items) != len(stream.events) or not np.array_equal(raw_items, generated):
        raise DataError(f"dataset {data.name!r}: events differ from its generator's stream")
