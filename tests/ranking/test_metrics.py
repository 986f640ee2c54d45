"""NE, AUC and GAUC against their definitions (brute-force pairs, explicit loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flexgr.ranking.metrics import auc, gauc, log_loss, normalized_entropy, task_metrics


def _pairwise_auc(scores: np.ndarray, y: np.ndarray) -> float:
    pos, neg = scores[y == 1], scores[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_is_the_pairwise_win_rate_with_ties_as_half(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    scores = rng.integers(0, 5, n).astype(np.float64)  # many ties
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    assert auc(scores, y) == pytest.approx(_pairwise_auc(scores, y), abs=1e-12)


def test_auc_extremes_and_undefined() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(np.array([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert auc(np.array([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert auc(np.full(4, 0.5), y) == 0.5
    assert math.isnan(auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_ne_is_log_loss_over_the_base_rate_entropy() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(rng.random(200), 0.01, 0.99)
    loss = -np.mean([math.log(pi) if yi else math.log(1 - pi) for pi, yi in zip(p, y)])
    rate = y.mean()
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert log_loss(p, y) == pytest.approx(loss, rel=1e-12)
    assert normalized_entropy(p, y) == pytest.approx(loss / entropy, rel=1e-12)
    # Predicting the base rate everywhere scores exactly 1.
    assert normalized_entropy(np.full(200, rate), y) == pytest.approx(1.0, rel=1e-12)


def test_gauc_weights_each_users_auc_by_its_impressions() -> None:
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 7, 120)
    scores = rng.random(120)
    y = rng.integers(0, 2, 120)
    y[groups == 3] = 1  # one user with a single label: left out
    total = weight = 0.0
    for g in np.unique(groups):
        part = groups == g
        if 0 < y[part].sum() < part.sum():
            total += _pairwise_auc(scores[part], y[part]) * part.sum()
            weight += part.sum()
    assert gauc(scores, y, groups) == pytest.approx(total / weight, abs=1e-12)


def test_task_metrics_use_only_known_labels() -> None:
    p = np.array([0.9, 0.1, 0.8, 0.3])
    y = np.array([1.0, 0.0, 0.0, 1.0])
    known = np.array([True, True, False, True])
    users = np.zeros(4, dtype=np.int64)
    out = task_metrics("like", "bce", p, y, known, users)
    assert out["auc:like"] == pytest.approx(_pairwise_auc(p[known], y[known]))
    assert out["rate:like"] == pytest.approx(2 / 3)
    mse = task_metrics(
        "rating",
        "mse",
        np.array([3.0, 4.0]),
        np.array([5.0, 4.0]),
        np.array([True, True]),
        users[:2],
    )
    assert mse == {"mse:rating": pytest.approx(2.0)}
