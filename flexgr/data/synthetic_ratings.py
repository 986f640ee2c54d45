"""A latent-score rating model for the synthetic streams: history-dependent explicit feedback.

Event j of user u, on item i, gets the latent score

    s = b_item[i] + b_user[u] + t_{u,j} . v_i + e_{u,i} + gamma * log1p(c_{u,j}) + eps

and the rating ``1 + #{thresholds below s}`` (1..5). The parts, and why each is there:

- **Biases.** ``b_item ~ N(0, item_bias_sd^2)`` per item, ``b_user ~ N(0, user_bias_sd^2)``
  per user: what a static model (one vector per user and per item) learns first.
- **Drifting taste.** ``t_{u,j} = mu_u + x_{u,j}``: a persistent taste ``mu_u ~ N(0,
  taste_sd^2 I_k)`` plus a drift that is an AR(1) process over the user's events (not over
  time, so its pace does not depend on the gaps): ``x_{u,0} ~ N(0, drift_sd^2 I_k)`` and
  ``x_{u,j} = rho x_{u,j-1} + sqrt(1 - rho^2) drift_sd z`` (stationary at every step), rho =
  ``drift_memory``. Item factors ``v_i ~ N(0, I_k / k)``, so the taste term has variance
  ``taste_sd^2 + drift_sd^2`` whatever k is. Two events L apart share a drift correlated by
  rho^L: the recent history tells the current taste better than the old one, which a static
  user vector (the best of which is ``mu_u``) cannot follow.
- **Persistent opinion.** ``e_{u,i} ~ N(0, opinion_sd^2)``, drawn once per (user, item) and
  shared by every repeat of that item in that user's stream. The Dirichlet-process urn makes
  items recur, so an earlier rating of the candidate's own item is informative: what
  attention over the history, and GESR's hard matching, can use.
- **Repeat boost.** ``gamma * log1p(c)`` with c the count of item i in u's earlier events
  (``repeat_boost``; negative would be fatigue): read from the history by counting.
- **Noise.** ``eps ~ N(0, noise_sd^2)``, independent per event: nobody can predict it.

**Thresholds** are the empirical quantiles of s over the whole generated stream at the
cumulative shares of :data:`RATING_SHARES`, ML-1M's rating histogram, so the ratings follow it
up to ties (with continuous s, exactly up to one event). They depend on every event, so a
different ``users`` moves them slightly; the stream keeps them (:class:`RatingTruth`).

**Draws.** Six child generators of the rating model's own SeedSequence (the stream's fifth
child; the urn's four are unchanged), one per part: item biases, item factors, user biases
and tastes, drifts, opinions, noise. Every part is a standard normal draw times its scale, so
changing one scale leaves the other parts' draws as they were.

The noiseless part of the score (everything but eps) is kept per event, with the parameters
that made it, so that the Bayes-optimal prediction given it is a normal CDF
(:mod:`flexgr.data.synthetic_oracle`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# ML-1M's rating shares for 1..5 (its 1,000,209 ratings); sum 1.0.
RATING_SHARES = (0.056, 0.108, 0.261, 0.349, 0.226)
# Part of the generator's digest when ratings are on: bump when the ratings for some
# parameters change, so prepared copies are rebuilt.
RATING_MODEL_VERSION = 1


@dataclass(frozen=True)
class RatingParams:
    factors: int = 8  # k, dimensions of the taste and item factors
    item_bias_sd: float = 0.5
    user_bias_sd: float = 0.5
    taste_sd: float = 0.7  # persistent taste mu_u, per coordinate
    drift_sd: float = 0.7  # stationary sd of the AR(1) drift x, per coordinate
    drift_memory: float = 0.995  # rho per event: half-life ln 2 / -ln rho, 138 events
    opinion_sd: float = 1.0  # e_{u,i}
    repeat_boost: float = 0.3  # gamma
    noise_sd: float = 1.0  # eps


def check_rating_params(p: RatingParams, need: Callable[[bool, str, str], None]) -> None:
    """Range checks; ``need(ok, key, rule)`` raises the caller's one-line error."""
    need(p.factors >= 1, "factors", ">= 1")
    for key in ("item_bias_sd", "user_bias_sd", "taste_sd", "drift_sd", "opinion_sd"):
        need(getattr(p, key) >= 0.0, key, ">= 0")
    need(0.0 <= p.drift_memory <= 1.0, "drift_memory", "in [0, 1]")
    need(bool(np.isfinite(p.repeat_boost)), "repeat_boost", "finite")
    # The oracle divides by it, and ties between events need a continuous score.
    need(p.noise_sd > 0.0, "noise_sd", "> 0")


@dataclass(frozen=True)
class RatingTruth:
    """The rating model's ground truth for one stream (events in the stream's order)."""

    params: RatingParams
    thresholds: np.ndarray  # float64 [4]: rating r + 1 above thresholds[r - 1]
    item_bias: np.ndarray  # float64 [items], by release rank
    user_bias: np.ndarray  # float64 [users]
    user_taste: np.ndarray  # float64 [users, k], mu_u
    item_factors: np.ndarray  # float64 [items, k], v_i
    taste_score: np.ndarray  # float64 [E], t_{u,j} . v_i (persistent and drifting taste)
    opinion: np.ndarray  # float64 [E], e_{u,i} of the event's pair
    prior_count: np.ndarray  # int64 [E], earlier events of the user on the same item
    noiseless: np.ndarray  # float64 [E], s - eps
    ratings: np.ndarray  # float32 [E], 1..5

    def static_score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float64 [N]: ``b_item + b_user + mu_u . v_i``, the best a static model can know."""
        taste = np.einsum("nk,nk->n", self.user_taste[users], self.item_factors[items])
        return self.item_bias[items] + self.user_bias[users] + taste


def rate(
    p: RatingParams,
    seed: np.random.SeedSequence,
    num_items: int,
    users: np.ndarray,
    items: np.ndarray,
    lengths: np.ndarray,
    starts: np.ndarray,
) -> RatingTruth:
    """Ratings of the urn's events (``users``/``items`` int64 [E], user-major, time order)."""
    item_rng, factor_rng, user_rng, drift_rng, opinion_rng, noise_rng = (
        np.random.default_rng(child) for child in seed.spawn(6)
    )
    num_users, k = len(lengths), p.factors
    item_bias = p.item_bias_sd * item_rng.standard_normal(num_items)
    item_factors = factor_rng.standard_normal((num_items, k)) / np.sqrt(k)
    user_bias = p.user_bias_sd * user_rng.standard_normal(num_users)
    user_taste = p.taste_sd * user_rng.standard_normal((num_users, k))
    taste_score = _taste_scores(p, drift_rng, user_taste, item_factors, items, lengths, starts)
    opinion, prior_count = _pairs(p, opinion_rng, users, items, num_items)
    noiseless = (
        item_bias[items]
        + user_bias[users]
        + taste_score
        + opinion
        + p.repeat_boost * np.log1p(prior_count)
    )
    score = noiseless + p.noise_sd * noise_rng.standard_normal(len(items))
    thresholds = np.quantile(score, np.cumsum(RATING_SHARES)[:-1]) if len(score) else np.zeros(4)
    ratings = (1 + np.searchsorted(thresholds, score, side="left")).astype(np.float32)
    return RatingTruth(
        params=p,
        thresholds=np.asarray(thresholds, dtype=np.float64),
        item_bias=item_bias,
        user_bias=user_bias,
        user_taste=user_taste,
        item_factors=item_factors,
        taste_score=taste_score,
        opinion=opinion,
        prior_count=prior_count,
        noiseless=noiseless,
        ratings=ratings,
    )


def _taste_scores(
    p: RatingParams,
    rng: np.random.Generator,
    user_taste: np.ndarray,
    item_factors: np.ndarray,
    items: np.ndarray,
    lengths: np.ndarray,
    starts: np.ndarray,
) -> np.ndarray:
    """t_{u,j} . v_i of every event, the AR(1) drift advanced one step for all users at once
    (the per-event taste vectors, [E, k], are never held)."""
    out = np.empty(len(items), dtype=np.float64)
    if not len(items):
        return out
    # Users sorted longest first, so the ones still drawing at step j are a prefix (as the urn).
    order = np.argsort(-lengths, kind="stable")
    row_start, mu = starts[:-1][order], user_taste[order]
    still_drawing = np.searchsorted(-lengths[order], -np.arange(int(lengths.max())), side="left")
    innovation = np.sqrt(max(1.0 - p.drift_memory**2, 0.0)) * p.drift_sd
    drift = p.drift_sd * rng.standard_normal(mu.shape)  # stationary from the first event
    for step in range(len(still_drawing)):
        rows = int(still_drawing[step])
        if step:
            shock = rng.standard_normal((rows, p.factors))
            drift[:rows] = p.drift_memory * drift[:rows] + innovation * shock
        at = row_start[:rows] + step
        out[at] = np.einsum("nk,nk->n", mu[:rows] + drift[:rows], item_factors[items[at]])
    return out


def _pairs(
    p: RatingParams,
    rng: np.random.Generator,
    users: np.ndarray,
    items: np.ndarray,
    num_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(e_{u,i} per event, count of the same (user, item) among the user's earlier events)."""
    pair = users * num_items + items
    unique, which = np.unique(pair, return_inverse=True)
    opinion = p.opinion_sd * rng.standard_normal(len(unique))[which]
    # A stable sort by pair keeps each pair's events in time order (events are user-major and
    # in time order), so an event's rank inside its pair is its prior count.
    order = np.argsort(pair, kind="stable")
    sorted_pair = pair[order]
    first = np.flatnonzero(np.r_[True, sorted_pair[1:] != sorted_pair[:-1]])
    group_start = np.repeat(first, np.diff(np.r_[first, len(pair)]))
    prior_count = np.empty(len(pair), dtype=np.int64)
    prior_count[order] = np.arange(len(pair)) - group_start
    return opinion, prior_count
