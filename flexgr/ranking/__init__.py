"""Ranking: histories with actions, candidates as targets, multi-task heads (docs/ranking.md).

Models (registered as ``model.arch``): ``hstu-ranking`` (interleaved or merged action tokens),
``sasrec-ranking`` and ``two-tower-ranking`` baselines. Requests group a user's events into
examples (ROO); :mod:`flexgr.ranking.train` trains them through ``flexgr train``.
"""

# flexgr.model first: its registry imports flexgr.ranking.spec, which needs the model modules.
import flexgr.model  # noqa: F401  isort: skip
from flexgr.ranking.baselines import (
    SASRecRanker,
    SASRecRankingConfig,
    TwoTowerConfig,
    TwoTowerRanker,
)
from flexgr.ranking.batch import RankingBatch, RankingEvents, impression_batch, request_batch
from flexgr.ranking.config import RankingConfig
from flexgr.ranking.hstu import HSTURanker, HSTURankingConfig
from flexgr.ranking.requests import Requests, build_requests, split_requests

__all__ = [
    "HSTURanker",
    "HSTURankingConfig",
    "RankingBatch",
    "RankingConfig",
    "RankingEvents",
    "Requests",
    "SASRecRanker",
    "SASRecRankingConfig",
    "TwoTowerConfig",
    "TwoTowerRanker",
    "build_requests",
    "impression_batch",
    "request_batch",
    "split_requests",
]
