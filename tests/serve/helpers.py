from __future__ import annotations

from pathlib import Path

from flexgr.cli.runs import Weights, load_recommender, open_run

from flexgr.serve import DatasetUsers, Limits, RankingOptions, RankingService, RankingUsers, Service
from flexgr.serve.app import create_app
from flexgr.serve.server import BackgroundServer
from flexgr.train.setup import load_dataset


def service_for(run_dir: Path, weights: Weights = Weights.model, **limits: int) -> Service:
    """What ``flexgr serve`` builds: the run's model and its dataset's users."""
    run, cfg = open_run(run_dir)
    data = load_dataset(cfg)
    recommender = load_recommender(run, cfg, weights, data)
    users = DatasetUsers.of(data, recommender)
    return Service(recommender, users=users, limits=Limits(**limits), weights=weights.value)


def server_for(service: Service | RankingService, **options: object) -> BackgroundServer:
    return BackgroundServer(create_app(service, **options))  # type: ignore[arg-type]


def ranking_service_for(run_dir: Path, users: bool = True, **options: int) -> RankingService:
    """What ``flexgr serve`` builds for a ranking run."""
    run, cfg = open_run(run_dir)
    data = load_dataset(cfg)
    ranker = load_recommender(run, cfg, Weights.model, data)
    return RankingService(
        ranker,  # type: ignore[arg-type]
        users=RankingUsers(data, ranker) if users else None,  # type: ignore[arg-type]
        options=RankingOptions(**options),
    )
