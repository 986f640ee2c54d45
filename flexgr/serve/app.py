"""The HTTP API on FastAPI: /recommend, /score, /health, /metadata (docs/serving.md). A ranking
model's server answers /score with per-task predictions and refuses /recommend (422).

Every error is JSON, ``{"error": {"status", "type", "message"}}``: 400 for a body that is not
JSON, 404 for an unknown user or path, 405 for a wrong method, 413 for an oversize body, 422 for
a request that is well-formed but cannot be answered (unknown item ids, an empty history, k out
of range, a field of the wrong type), 503 while the queue is full or the server is stopping.
A 500 means a bug in flexgr, never a bad request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

import flexgr
from flexgr.serve.batcher import MicroBatcher, Overloaded
from flexgr.serve.errors import RequestError
from flexgr.serve.limits import BodyLimit, error_body
from flexgr.serve.ranking import RankingService
from flexgr.serve.schemas import RankScoreRequest, RecommendRequest, ScoreRequest
from flexgr.serve.service import SCORE_METHOD, Service

log = logging.getLogger("flexgr.serve")

_STATUS_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


def create_app(
    service: Service | RankingService,
    *,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
    max_queue: int = 1024,
    max_body_bytes: int = 1 << 20,
) -> ASGIApp:
    """The ASGI app serving ``service`` (retrieval, or a ranking model's
    :class:`~flexgr.serve.ranking.RankingService`); requests are batched across callers
    (``max_batch`` jobs, waiting at most ``max_wait_ms`` for a batch to fill)."""
    batcher: MicroBatcher[Any, Any] = MicroBatcher(
        service.run_batch, max_batch=max_batch, max_wait_s=max_wait_ms / 1000, max_queue=max_queue
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="flexgr", version=flexgr.__version__, lifespan=lifespan)
    app.state.service, app.state.batcher = service, batcher
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        ready = batcher.running
        return {"status": "ok" if ready else "starting", "num_items": service.num_items}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        stats = batcher.stats
        return {
            "flexgr_version": flexgr.__version__,
            **service.metadata(),
            "batching": {
                "max_batch": batcher.max_batch,
                "max_wait_ms": batcher.max_wait_s * 1000,
                "batches": stats.batches,
                "requests": stats.jobs,
                "mean_batch": round(stats.mean_batch, 3),
                "largest_batch": stats.largest,
            },
        }

    if isinstance(service, RankingService):
        _add_ranking_endpoints(app, service, batcher)
    else:
        _add_retrieval_endpoints(app, service, batcher)
    return BodyLimit(app, max_body_bytes)


def _add_retrieval_endpoints(app: FastAPI, service: Service, batcher: MicroBatcher) -> None:
    # Answers are plain JSON of str/int/float: JSONResponse directly, skipping FastAPI's
    # jsonable_encoder walk, which costs more than the rest of a small request.
    @app.post("/recommend", response_class=JSONResponse)
    async def recommend(request: RecommendRequest) -> JSONResponse:
        job = service.recommend_job(request)
        found = await batcher.submit(job)
        return JSONResponse(
            {
                "items": [{"item": service.item_id(i), "score": s} for i, s in found],
                "k": job.k,
                "returned": len(found),
                "excluded": len(job.excluded),
                "num_items": service.num_items,
                "history_used": len(job.query.ids),
                "approximate": service.ann is not None,
            }
        )

    @app.post("/score", response_class=JSONResponse)
    async def score(request: ScoreRequest) -> JSONResponse:
        job = service.score_job(request)
        scores = await batcher.submit(job)
        pairs = zip(request.candidates, scores, strict=True)
        return JSONResponse(
            {
                "scores": [{"item": str(raw), "score": s} for raw, s in pairs],
                "method": SCORE_METHOD,
                "history_used": len(job.query.ids),
            }
        )


def _add_ranking_endpoints(app: FastAPI, service: RankingService, batcher: MicroBatcher) -> None:
    @app.post("/recommend", response_class=JSONResponse)
    async def recommend() -> JSONResponse:
        service.recommend_job(None)  # always refuses: a ranking model has no top-k

    @app.post("/score", response_class=JSONResponse)
    async def score(request: RankScoreRequest) -> JSONResponse:
        job = service.score_job(request)
        result = await batcher.submit(job)
        if isinstance(result, RequestError):  # the model refused this job's input
            raise result
        return JSONResponse(service.response(job, result))


def _add_error_handlers(app: FastAPI) -> None:
    def reply(status: int, kind: str, message: str) -> JSONResponse:
        return JSONResponse(error_body(status, kind, message), status_code=status)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        return reply(err.status, err.kind, err.message)

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, err: Overloaded) -> JSONResponse:
        return reply(503, "unavailable", str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return reply(400, "bad_json", "the request body is not valid JSON")
        return reply(422, "invalid_request", "; ".join(_describe(p) for p in problems[:5]))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        kind = _STATUS_KINDS.get(err.status_code, "http_error")
        return reply(err.status_code, kind, str(err.detail))

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception) -> JSONResponse:
        log.exception("internal error")
        return reply(500, "internal_error", f"internal error ({type(err).__name__}); see the log")


def _describe(problem: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    return f"{where or 'body'}: {problem.get('msg', 'invalid')}"
