"""Bayes-optimal and baseline predictions of the synthetic ratings, from the generator's truth.

The rating of an event is ``1 + #{thresholds below m + eps}`` with ``eps ~ N(0, noise_sd^2)``
independent of everything else, so given the noiseless score m the rating's distribution is

    P(rating >= r | m) = Phi((m - thresholds[r - 2]) / noise_sd)        r = 2..5

and a prediction of ``like`` (rating >= like threshold) from this is the best any model can
make, whatever it reads: a trained model whose NE on the same events is below the oracle's is
a bug (a leak of the labels), not a better model.

The baselines know only part of the score, ``known`` (the item bias; the item and user
biases; the static score ``b_item + b_user + mu_u . v_i``, the best one fixed vector per user
and per item can hold), and take the rest, ``m - known + eps``, as Gaussian with the mean and
variance it has over all of the stream's events. They are the floor a history-aware model
should clear. The rest is a sum of independent parts, near Gaussian but not exactly (the
repeat boost is skewed), so their NE is a close approximation of the best calibration of the
same information; their AUC (a ranking by ``known``) is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flexgr.data.synthetic import SyntheticStream
from flexgr.data.synthetic_ratings import RatingTruth

_ERFC = np.frompyfunc(math.erfc, 1, 1)
BASELINES = ("static", "user+item bias", "item bias")


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Phi(x), float64, to double precision (erfc keeps the tails' relative accuracy)."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * _ERFC(-x / math.sqrt(2.0)).astype(np.float64)


@dataclass(frozen=True)
class RatingForecast:
    """Per event: the distribution of its rating over 1..5, and the tasks read from it."""

    probabilities: np.ndarray  # float64 [N, 5], P(rating = r), r = 1..5

    def at_least(self, threshold: float) -> np.ndarray:
        """P(rating >= threshold): ``like`` (3.5 reads as rating >= 4)."""
        ratings = np.arange(1, 6)
        return self.probabilities[:, ratings >= threshold].sum(axis=1)

    def at_most(self, threshold: float) -> np.ndarray:
        """P(rating <= threshold): ``dislike``."""
        ratings = np.arange(1, 6)
        return self.probabilities[:, ratings <= threshold].sum(axis=1)

    def expected(self) -> np.ndarray:
        """E[rating]: the prediction with the least squared error (``rating``)."""
        return self.probabilities @ np.arange(1.0, 6.0)


def forecast(mean: np.ndarray, thresholds: np.ndarray, sd: float | np.ndarray) -> RatingForecast:
    """The rating distribution of scores ``N(mean, sd^2)`` cut at ``thresholds``."""
    above = normal_cdf((np.asarray(mean)[:, None] - thresholds[None, :]) / np.reshape(sd, (-1, 1)))
    exceed = np.concatenate([np.ones((len(above), 1)), above, np.zeros((len(above), 1))], axis=1)
    return RatingForecast(np.clip(exceed[:, :-1] - exceed[:, 1:], 0.0, 1.0))


def truth_of(stream: SyntheticStream) -> RatingTruth:
    if stream.rating_truth is None:
        raise ValueError("the stream has no ratings (its generator's ratings are off)")
    return stream.rating_truth


def oracle(stream: SyntheticStream, events: np.ndarray) -> RatingForecast:
    """The Bayes-optimal forecast of ``events`` (indices into the stream) given the noiseless
    score."""
    truth = truth_of(stream)
    return forecast(truth.noiseless[events], truth.thresholds, truth.params.noise_sd)


def known_scores(stream: SyntheticStream, events: np.ndarray, baseline: str) -> np.ndarray:
    """The part of the score baseline ``baseline`` (one of :data:`BASELINES`) knows."""
    truth = truth_of(stream)
    users = _event_users(stream)[events]
    items = stream.events.items.cast("int64").to_numpy()[events]
    if baseline == "item bias":
        return truth.item_bias[items]
    if baseline == "user+item bias":
        return truth.item_bias[items] + truth.user_bias[users]
    if baseline == "static":
        return truth.static_score(users, items)
    raise ValueError(f"unknown baseline {baseline!r} (one of {', '.join(BASELINES)})")


def baseline(stream: SyntheticStream, events: np.ndarray, name: str) -> RatingForecast:
    """The forecast of a predictor that knows only ``known_scores(..., name)``; the rest of the
    score is N(mean, variance) of the rest over every event of the stream, noise included."""
    truth = truth_of(stream)
    everywhere = np.arange(len(truth.noiseless))
    rest = truth.noiseless - known_scores(stream, everywhere, name)
    spread = math.sqrt(float(rest.var()) + truth.params.noise_sd**2)
    mean = known_scores(stream, events, name) + float(rest.mean())
    return forecast(mean, truth.thresholds, spread)


def _event_users(stream: SyntheticStream) -> np.ndarray:
    return stream.events.users.cast("int64").to_numpy()
