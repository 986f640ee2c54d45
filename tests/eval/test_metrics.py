from __future__ import annotations

import math

import pytest
import torch

from flexgr.eval import MetricAccumulator, metric_names, ranking_metrics


def test_metrics_against_hand_computed_values() -> None:
    ranks = torch.tensor([0, 1, 9, 10, 49, 199, 500])
    got = ranking_metrics(ranks, ks=[1, 10, 50, 200])
    n = 7
    assert got["hr@1"] == pytest.approx(1 / n)
    assert got["hr@10"] == pytest.approx(3 / n)
    assert got["hr@50"] == pytest.approx(5 / n)
    assert got["hr@200"] == pytest.approx(6 / n)
    assert got["ndcg@1"] == pytest.approx(1 / n)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / n)
    assert got["ndcg@50"] == pytest.approx(
        (1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12) + 1 / math.log2(51)) / n
    )
    assert got["ndcg@200"] == pytest.approx(
        (
            1
            + 1 / math.log2(3)
            + 1 / math.log2(11)
            + 1 / math.log2(12)
            + 1 / math.log2(51)
            + 1 / math.log2(201)
        )
        / n
    )
    assert got["mrr"] == pytest.approx(
        (1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 50 + 1 / 200 + 1 / 501) / n
    )


def test_a_perfect_ranking_scores_one_everywhere() -> None:
    got = ranking_metrics(torch.zeros(4, dtype=torch.int64), ks=[1, 10])
    assert all(value == 1.0 for value in got.values())


def test_accumulating_batches_equals_one_batch() -> None:
    ranks = torch.randint(0, 300, (101,), generator=torch.Generator().manual_seed(0))
    acc = MetricAccumulator([1, 10, 50])
    for part in ranks.split(13):
        acc.add(part)
    whole = ranking_metrics(ranks, [1, 10, 50])
    assert acc.result() == pytest.approx(whole, rel=1e-12)
    assert list(acc.result()) == metric_names([1, 10, 50])


def test_no_users_is_an_error() -> None:
    with pytest.raises(ValueError, match="no users"):
        MetricAccumulator([10]).result()
