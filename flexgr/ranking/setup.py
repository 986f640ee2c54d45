"""What a ranking run builds from its config and dataset: tasks, requests, split, a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from flexgr.data import InteractionData
from flexgr.model.registry import build_model
from flexgr.ranking.batch import RankingEvents
from flexgr.ranking.requests import Requests, RequestSplit, build_requests, split_requests
from flexgr.ranking.tasks import Task, action_vocab, parse_tasks


@dataclass(frozen=True, eq=False)
class RankingData:
    """A dataset seen as ranking examples: per-event arrays, requests and their split."""

    data: InteractionData
    tasks: list[Task]
    events: RankingEvents
    requests: Requests
    split: RequestSplit

    @property
    def kinds(self) -> list[str]:
        return [t.kind for t in self.tasks]


def ranking_data(cfg: Any, data: InteractionData) -> RankingData:
    """``cfg`` is a :class:`flexgr.train.config.Config` of a ranking arch."""
    r = cfg.ranking
    tasks = parse_tasks(r.tasks, r.like_threshold, r.dislike_threshold)
    events = RankingEvents.of(data, r.action_inputs, tasks)
    requests = build_requests(data, r, cfg.data.max_seq_len)
    return RankingData(data, tasks, events, requests, split_requests(requests, cfg.data.protocol))


def derived_options(cfg: Any, data: InteractionData, codes: np.ndarray | None = None) -> dict:
    """The model settings that come from the dataset, data.max_seq_len and [ranking]."""
    r = cfg.ranking
    tasks = parse_tasks(r.tasks, r.like_threshold, r.dislike_threshold)
    if codes is None:
        codes = RankingEvents.of(data, r.action_inputs, tasks).actions
    encoding = cfg.model_options().get("action_encoding", "categorical")
    return {
        "num_items": data.num_items,
        "max_seq_len": cfg.data.max_seq_len,
        "action_inputs": list(r.action_inputs),
        "action_vocab": action_vocab(r.action_inputs, codes, encoding),
        "tasks": [t.name for t in tasks],
        "task_kinds": [t.kind for t in tasks],
    }


def new_ranking_model(
    cfg: Any, data: InteractionData, codes: np.ndarray | None = None
) -> nn.Module:
    return build_model(cfg.model.arch, {**cfg.model_options(), **derived_options(cfg, data, codes)})
