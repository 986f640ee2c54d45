"""Ranking metrics from per-impression predictions: NE, log loss, AUC, GAUC, MSE.

- NE (normalised entropy): the mean log loss divided by the entropy of the evaluated labels'
  base rate, so 1.0 is "predict the average" and lower is better (HSTU paper's E-/C-NE).
- AUC: the probability that a random positive scores above a random negative (ties count one
  half), from average ranks (Mann-Whitney U).
- GAUC: the impression-weighted mean of per-user AUCs over users that have both labels.
"""

from __future__ import annotations

import math

import numpy as np


def log_loss(p: np.ndarray, y: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(p.astype(np.float64), eps, 1 - eps)
    y = y.astype(np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else math.nan


def base_entropy(rate: float) -> float:
    """Entropy (nats) of a Bernoulli(rate) label: the NE denominator."""
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def normalized_entropy(p: np.ndarray, y: np.ndarray) -> float:
    """Log loss over the entropy of the labels' base rate; NaN when every label is the same."""
    if len(y) == 0:
        return math.nan
    h = base_entropy(float(np.mean(y)))
    return log_loss(p, y) / h if h > 0 else math.nan


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, tied scores sharing their mean rank."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    n = len(scores)
    starts = np.flatnonzero(np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]]))
    ends = np.append(starts[1:], n)
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC with ties as one half; NaN without both a positive and a negative."""
    y = y.astype(bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = _average_ranks(scores.astype(np.float64))
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def gauc(scores: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Per-group AUC weighted by the group's impressions, over groups with both labels."""
    if len(y) == 0:
        return math.nan
    order = np.argsort(groups, kind="mergesort")
    groups, scores, y = groups[order], scores[order], y[order].astype(bool)
    cuts = np.flatnonzero(groups[1:] != groups[:-1]) + 1
    total, weight = 0.0, 0
    for part_scores, part_y in zip(np.split(scores, cuts), np.split(y, cuts), strict=True):
        value = auc(part_scores, part_y)
        if not math.isnan(value):
            total += value * len(part_y)
            weight += len(part_y)
    return total / weight if weight else math.nan


def task_metrics(
    name: str,
    kind: str,
    predictions: np.ndarray,
    labels: np.ndarray,
    known: np.ndarray,
    users: np.ndarray,
) -> dict[str, float]:
    """The metrics of one task over the impressions that have its label, keyed PREFIX:name."""
    p, y, g = predictions[known], labels[known], users[known]
    if kind == "bce":
        return {
            f"ne:{name}": normalized_entropy(p, y),
            f"logloss:{name}": log_loss(p, y),
            f"auc:{name}": auc(p, y),
            f"gauc:{name}": gauc(p, y, g),
            f"rate:{name}": float(np.mean(y)) if len(y) else math.nan,
        }
    return {f"mse:{name}": float(np.mean((p - y) ** 2)) if len(y) else math.nan}
