"""Serving a VISTA ranking model from its summary cache (``flexgr serve --summaries DIR``).

A ``/score`` request that names a user (and optionally ``query_time``, the request time) reads
the user's newest stored summary at or before that time (:func:`flexgr.vista.cache.
latest_version`; the newest one when no time is given) and runs stage 2 only: target attention
over ``[summary; candidates]`` (:func:`flexgr.vista.cache.score_summaries`, which
``predict_cached`` scores through too), so the history is never read and no stage-1 work is
done per request. A request with an explicit history still runs the whole model
(:class:`~flexgr.serve.ranking.RankingService`).

A user with no summary at or before the request time is a 404 (``"no_summary"``), not a
fallback to the full model: the dataset's history of a user holds every logged event, those
after the request time included, so falling back would score from the future, and it would
silently cost a full stage 1. A caller who wants the full model sends the history.

Unlike ranking jobs on histories, summary jobs of a batch are packed into one stage-2 pass
(several users' ``[summary; candidates]`` sequences side by side, at most ``microbatch``
candidates a pass): a candidate sees only its own user's summary and itself, so packing
changes no score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flexgr.ranking.scorer import Ranker
from flexgr.serve.errors import RequestError, bad_request
from flexgr.vista.cache import (
    DirectorySummaryStore,
    dequantise,
    latest_version,
    score_summaries,
)
from flexgr.vista.model import VistaRanker

log = logging.getLogger(__name__)

TIME_LIMIT = 2**62  # as flexgr.serve.service's bound on timestamps


@dataclass(frozen=True)
class SummaryJob:
    user: str
    version: int  # the stored summary's version_ts: the newest event it read
    candidates: list[str]  # raw item ids, in the request's order
    candidate_index: list[int]  # the model's item index of each


@dataclass(frozen=True)
class SummaryResult:
    predictions: list[dict[str, float]]  # one {task: value} per candidate, in order
    bits: int  # of the stored summary: 8 (int8) or 4 (int4)


@dataclass
class SummaryCounts:
    requests: int = 0  # answered from a summary
    missing: int = 0  # 404: no summary at or before the request time


def no_summary(message: str) -> RequestError:
    return RequestError(404, "no_summary", message)


@dataclass
class SummaryServing:
    """``ranker``'s stage 2 on the summaries in ``store`` (a vista-ranking model's store, as
    ``flexgr vista export-summaries`` writes it)."""

    ranker: Ranker
    store: DirectorySummaryStore
    counts: SummaryCounts = field(default_factory=SummaryCounts)

    def __post_init__(self) -> None:
        model = self.ranker.model
        if not isinstance(model, VistaRanker):
            raise TypeError(
                f"summaries are served for vista-ranking models, not {self.ranker.arch}"
            )
        self.model: VistaRanker = model
        self.kinds = list(model.cfg.task_kinds)
        self.bits = self._check_store()

    def _check_store(self) -> list[int]:
        """The bits of the store's summaries; ValueError when it is empty or was written by a
        model of another summary shape (each user's newest summary is read once, at start)."""
        root = self.store.root
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        users = self.store.users()
        if not users:
            raise ValueError(
                f"{root} holds no summaries (write them with flexgr vista export-summaries)"
            )
        cfg, bits = self.model.cfg, set()
        want = (cfg.num_seeds, cfg.d_model)
        for user in users:
            versions = self.store.versions(user)
            if not versions:
                continue
            summary = self.store.get(user, versions[-1])
            if (summary.scales.shape[0], summary.dim) != want:
                raise ValueError(
                    f"{root}: the summary of user {user!r} is "
                    f"{(summary.scales.shape[0], summary.dim)}, the model reads {want} (a store "
                    "of another run?)"
                )
            bits.add(summary.bits)
        return sorted(bits)

    @property
    def method(self) -> str:
        return (
            "vista: stage 2 on the user's stored summary (target attention over [summary; "
            "candidates]; the history is not read)"
        )

    # ------------------------------------------------------------ requests -> jobs (event loop)

    def job(self, user: str, at: int | None, candidates: list[str]) -> SummaryJob:
        """The job of ``user`` at request time ``at`` (None: the newest summary); 404 when the
        user has no summary at or before it."""
        if at is not None and abs(at) >= TIME_LIMIT:
            raise bad_request(f"query_time {at} is out of range")
        versions = self.store.versions(user)
        if not versions:
            self.counts.missing += 1
            raise no_summary(f"user {user!r} has no stored summary in {self.store.root}")
        if at is None:
            version = versions[-1]
        else:
            try:
                version = latest_version(self.store, user, at)
            except KeyError:
                self.counts.missing += 1
                raise no_summary(
                    f"user {user!r} has no stored summary at or before query_time {at} (the "
                    f"earliest is {versions[0]}); send the history to score with the full model"
                ) from None
        index = [self.ranker.item_index(raw) for raw in candidates]
        return SummaryJob(user, version, candidates, index)

    # ------------------------------------------------------------ batches (worker thread)

    @torch.no_grad()
    def run(
        self, jobs: Sequence[SummaryJob], microbatch: int
    ) -> list[SummaryResult | RequestError]:
        """Every job's predictions, the jobs packed into stage-2 passes of at most
        ``microbatch`` candidates (a longer job is split over passes). A job whose summary
        cannot be read answers its own caller and leaves the others be."""
        cfg = self.model.cfg
        results: list[SummaryResult | RequestError | None] = [None] * len(jobs)
        summaries: dict[int, torch.Tensor] = {}
        bits: dict[int, int] = {}
        for j, job in enumerate(jobs):
            try:
                stored = self.store.get(job.user, job.version)
                summary_SD = dequantise(stored)
                if summary_SD.shape != (cfg.num_seeds, cfg.d_model):  # a refresh by another run
                    raise ValueError(
                        f"it is {summary_SD.shape}, the model reads {(cfg.num_seeds, cfg.d_model)}"
                    )
            except KeyError as err:  # removed since the request was checked
                results[j] = no_summary(str(err).strip("'\""))
                continue
            except (ValueError, OSError) as err:  # a torn, foreign or unreadable file
                log.error("summary of user %r at %d: %s", job.user, job.version, err)
                results[j] = RequestError(500, "bad_summary", f"cannot read the summary: {err}")
                continue
            summaries[j] = torch.from_numpy(summary_SD)[None]
            bits[j] = stored.bits
        rows: dict[int, list[list[float]]] = {j: [] for j in summaries}
        for group in candidate_passes(
            [len(jobs[j].candidates) if j in summaries else 0 for j in range(len(jobs))],
            microbatch,
        ):
            self._score_pass(jobs, summaries, group, rows)
        tasks = self.ranker.tasks
        for j, values in rows.items():
            predictions = [dict(zip(tasks, row, strict=True)) for row in values]
            results[j] = SummaryResult(predictions, bits[j])
            self.counts.requests += 1
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _score_pass(
        self,
        jobs: Sequence[SummaryJob],
        summaries: dict[int, torch.Tensor],
        group: list[tuple[int, int, int]],
        rows: dict[int, list[list[float]]],
    ) -> None:
        device = self.ranker.device
        summary_BSD = torch.cat([summaries[j] for j, _, _ in group]).to(device)
        chunks = [jobs[j].candidate_index[lo:hi] for j, lo, hi in group]
        candidates = torch.tensor([i for chunk in chunks for i in chunk], dtype=torch.int64)
        offsets = torch.zeros(len(group) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.tensor([len(c) for c in chunks]), 0)
        scored = score_summaries(
            self.model, summary_BSD, candidates.to(device), offsets.to(device), self.kinds
        )
        values = scored.cpu().tolist()
        for (j, _, _), lo, hi in zip(group, offsets[:-1].tolist(), offsets[1:].tolist()):
            rows[j].extend(values[lo:hi])

    def warm_up(self, widths: Sequence[int]) -> int:
        """One stage-2 pass per candidate count (CUDA compiles per shape); returns the passes."""
        cfg = self.model.cfg
        zero = torch.zeros(1, cfg.num_seeds, cfg.d_model, device=self.ranker.device)
        for width in widths:
            candidates = torch.ones(width, dtype=torch.int64, device=zero.device)
            offsets = torch.tensor([0, width], device=zero.device)
            with torch.no_grad():
                score_summaries(self.model, zero, candidates, offsets, self.kinds)
        return len(widths)

    # ------------------------------------------------------------ responses

    def response(self, job: SummaryJob, result: SummaryResult) -> dict[str, Any]:
        pairs = zip(job.candidates, result.predictions, strict=True)
        return {
            "tasks": self.ranker.tasks,
            "scores": [{"item": item, "predictions": p} for item, p in pairs],
            "method": self.method,
            "history_used": None,  # the summary stands for the history, which is not read
            "history_cache": "off",
            "summary": {"user": job.user, "version": job.version, "bits": result.bits},
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "served": True,
            "store": str(self.store.root),
            "kind": "directory",
            # Counted now: an export may be adding users while the server runs.
            "users": len(self.store.users()),
            "bits": self.bits,  # of each user's newest summary when the server started
            "num_seeds": self.model.cfg.num_seeds,
            "requests": self.counts.requests,
            "missing": self.counts.missing,
        }


def candidate_passes(counts: Sequence[int], microbatch: int) -> list[list[tuple[int, int, int]]]:
    """Jobs' candidates grouped into passes: each pass a list of (job, lo, hi), every job's
    candidates ``[0, counts[j])`` in chunks of at most ``microbatch``, each pass holding at most
    ``microbatch`` candidates in all (jobs of count 0 are left out)."""
    passes: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    filled = 0
    for j, count in enumerate(counts):
        for lo in range(0, count, microbatch):
            hi = min(count, lo + microbatch)
            if current and filled + hi - lo > microbatch:
                passes.append(current)
                current, filled = [], 0
            current.append((j, lo, hi))
            filled += hi - lo
    if current:
        passes.append(current)
    return passes
