"""Serving over HTTP: ``flexgr serve --run-dir DIR`` (docs/serving.md).

Needs the ``serve`` extra (``pip install 'flexgr[serve]'``: FastAPI, uvicorn). The pieces::

    import flexgr
    from flexgr.serve import Service, create_app
    service = Service(flexgr.load("runs/x"))     # users= DatasetUsers.of(data, rec) for user ids
    app = create_app(service, max_batch=32)      # an ASGI app; run it with any ASGI server

A ranking model (``flexgr.load`` gives a ``Ranker``) is served by ``RankingService(ranker,
users=RankingUsers(data, ranker))`` instead: ``/score`` answers per-task predictions.
"""

from typing import Any

from flexgr.serve.batcher import BatchStats, MicroBatcher, Overloaded
from flexgr.serve.errors import RequestError
from flexgr.serve.ranking import RankingOptions, RankingService, RankingUsers
from flexgr.serve.service import DatasetUsers, Limits, Service

INSTALL_HINT = "pip install 'flexgr[serve]'"


def create_app(service: Service | RankingService, **options: object) -> Any:
    """The FastAPI app (see :func:`flexgr.serve.app.create_app`); imported on first use so that
    the rest of this package works without FastAPI."""
    from flexgr.serve.app import create_app as create

    return create(service, **options)  # type: ignore[arg-type]


__all__ = [
    "INSTALL_HINT",
    "BatchStats",
    "DatasetUsers",
    "Limits",
    "MicroBatcher",
    "Overloaded",
    "RankingOptions",
    "RankingService",
    "RankingUsers",
    "RequestError",
    "Service",
    "create_app",
]
