from __future__ import annotations

from pathlib import Path

import torch

from tests.serve.helpers import service_for


def test_warm_up_runs_every_batch_size_and_leaves_answers_unchanged(served_run: Path) -> None:
    service = service_for(served_run)
    job = service.recommend_job(_request(service))
    before = service.run_batch([job])
    calls: list[int] = []
    run_batch = service.run_batch

    def counting(jobs):  # noqa: ANN001, ANN202 - the wrapped method's signature
        calls.append(len(jobs))
        return run_batch(jobs)

    service.run_batch = counting  # type: ignore[method-assign]
    runs = service.warm_up(5)
    # Sizes 1, 2, 4, 5 (capped) at three history lengths each.
    assert runs == len(calls) == 12
    assert sorted(set(calls)) == [1, 2, 4, 5]
    service.run_batch = run_batch  # type: ignore[method-assign]
    with torch.no_grad():
        assert service.run_batch([job]) == before


def _request(service):  # noqa: ANN001, ANN202
    from flexgr.serve.schemas import RecommendRequest

    first = service.item_id(1)
    return RecommendRequest(history=[first], k=3)
