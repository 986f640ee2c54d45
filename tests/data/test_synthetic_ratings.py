"""synthetic-ranking's rating model: determinism, the rating histogram, each part of the latent
score as defined, the oracle's calibration, parameter errors, preparing.

Statistical checks use fixed seeds (so they cannot flake) and tolerances of about six standard
errors (so a wrong model, not noise, fails them); each says what a broken part would give.
"""

from __future__ import annotations

import itertools
import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from flexgr.cli.main import app
from typer.testing import CliRunner

from flexgr.data import DataError, load_prepared, prepare, read_meta
from flexgr.data.synthetic import (
    SyntheticStream,
    generate,
    params_as_options,
    params_from_options,
    source_digest,
    synthetic_params,
)
from flexgr.data.synthetic_oracle import baseline, normal_cdf, oracle
from flexgr.data.synthetic_ratings import RATING_SHARES, RatingTruth
from flexgr.ranking.metrics import auc

MEDIUM = {"users": 2_000, "items": 2_000, "categories": 20, "min_length": 64, "max_length": 512}


@cache
def medium_stream(**rating_overrides: float) -> SyntheticStream:
    return generate(synthetic_params("synthetic-ranking", {**MEDIUM, **rating_overrides}))


def truth(stream: SyntheticStream) -> RatingTruth:
    assert stream.rating_truth is not None
    return stream.rating_truth


def users_items(stream: SyntheticStream) -> tuple[np.ndarray, np.ndarray]:
    users = stream.events.users.cast("int64").to_numpy()
    return users, stream.events.items.cast("int64").to_numpy()


def repeat_pairs(stream: SyntheticStream) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, later) event indices of each repeat and the previous event of its pair."""
    users, items = users_items(stream)
    pair = users * (int(items.max()) + 1) + items
    order = np.argsort(pair, kind="stable")  # each pair's events in time order
    same = pair[order][1:] == pair[order][:-1]
    return order[:-1][same], order[1:][same]


def test_same_seed_same_ratings_and_the_urn_is_untouched() -> None:
    params = synthetic_params("synthetic-ranking", {**MEDIUM, "users": 50, "seed": 4})
    first, again = generate(params), generate(params)
    assert first.events.ratings.tobytes() == again.events.ratings.tobytes()
    assert np.array_equal(truth(first).noiseless, truth(again).noiseless)
    other = generate(synthetic_params("synthetic-ranking", {**MEDIUM, "users": 50, "seed": 5}))
    assert not np.array_equal(first.events.ratings[:500], other.events.ratings[:500])
    # The rating model draws from its own seed: the same urn parameters without ratings give
    # the same events (synthetic-long is the urn alone).
    implicit = generate(synthetic_params("synthetic-long", {**MEDIUM, "users": 50, "seed": 4}))
    assert np.array_equal(users_items(first)[1], users_items(implicit)[1])
    assert np.array_equal(first.events.timestamps, implicit.events.timestamps)
    assert np.isnan(implicit.events.ratings).all() and implicit.rating_truth is None


def test_ratings_are_1_to_5_with_ml1m_shares() -> None:
    ratings = medium_stream().events.ratings
    assert set(np.unique(ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    counts = np.bincount(ratings.astype(np.int64), minlength=6)[1:]
    # Thresholds are the score's quantiles: each share is ML-1M's up to an event or two.
    assert np.all(np.abs(counts - np.array(RATING_SHARES) * len(ratings)) <= 2)
    assert counts.sum() == len(ratings) and len(ratings) > 300_000


def test_the_scale_parameters_are_the_parts_spreads() -> None:
    t, p = truth(medium_stream()), truth(medium_stream()).params
    users, items = users_items(medium_stream())
    for values, sd in [(t.item_bias, p.item_bias_sd), (t.user_bias, p.user_bias_sd)]:
        assert abs(values.std() - sd) < 6 * sd / math.sqrt(2 * len(values))
    assert abs(t.user_taste.std() - p.taste_sd) < 0.02
    assert abs((t.item_factors**2).sum(axis=1).mean() - 1.0) < 0.02  # v ~ N(0, I / k)
    # The taste term has variance taste_sd^2 + drift_sd^2 whatever k is (0.98 at defaults).
    assert abs(t.taste_score.var() / (p.taste_sd**2 + p.drift_sd**2) - 1) < 0.05
    reassembled = (
        t.item_bias[items]
        + t.user_bias[users]
        + t.taste_score
        + t.opinion
        + p.repeat_boost * np.log1p(t.prior_count)
    )
    assert np.allclose(reassembled, t.noiseless)


def test_prior_count_counts_the_users_earlier_events_on_the_item() -> None:
    stream = medium_stream()
    users, items = users_items(stream)
    counts = truth(stream).prior_count
    for user in range(0, MEDIUM["users"], 211):
        rows = np.flatnonzero(users == user)
        seen: dict[int, int] = {}
        for row in rows:
            assert counts[row] == seen.get(int(items[row]), 0)
            seen[int(items[row])] = seen.get(int(items[row]), 0) + 1
    assert (counts > 0).mean() > 0.3  # the urn repeats items: a real test of the count


def test_repeats_share_the_opinion_and_so_their_ratings_correlate() -> None:
    stream = medium_stream()
    t = truth(stream)
    earlier, later = repeat_pairs(stream)
    assert len(earlier) > 50_000
    assert np.array_equal(t.opinion[earlier], t.opinion[later])
    ratings = stream.events.ratings.astype(np.float64)
    repeat_corr = np.corrcoef(ratings[earlier], ratings[later])[0, 1]
    # The same user's consecutive events, mostly on other items, for comparison.
    users, _ = users_items(stream)
    next_same_user = np.flatnonzero(users[1:] == users[:-1])
    other_corr = np.corrcoef(ratings[next_same_user], ratings[next_same_user + 1])[0, 1]
    assert repeat_corr > other_corr + 0.25  # about .63 against .07
    # Without the opinion, repeats share less (about .50 against .63): e_{u,i}'s part.
    quiet = medium_stream(opinion_sd=0.0)
    quiet_earlier, quiet_later = repeat_pairs(quiet)
    quiet_ratings = quiet.events.ratings.astype(np.float64)
    quiet_corr = np.corrcoef(quiet_ratings[quiet_earlier], quiet_ratings[quiet_later])[0, 1]
    assert repeat_corr > quiet_corr + 0.08


def test_taste_drifts_as_ar1_so_recent_ratings_tell_more() -> None:
    stream = medium_stream()
    t, p = truth(stream), truth(stream).params
    earlier, later = repeat_pairs(stream)
    lag = later - earlier  # events apart, inside one user's record
    ratings = stream.events.ratings.astype(np.float64)
    results = {}
    for name, low, high in [("recent", 1, 10), ("old", 300, 600)]:
        band = (lag >= low) & (lag <= high)
        assert band.sum() > 2_000
        # Same item, so cov(t_a . v, t_b . v) = taste_sd^2 + drift_sd^2 rho^L.
        expected = np.mean(
            (p.taste_sd**2 + p.drift_sd**2 * p.drift_memory ** lag[band])
            / (p.taste_sd**2 + p.drift_sd**2)
        )
        got = np.corrcoef(t.taste_score[earlier[band]], t.taste_score[later[band]])[0, 1]
        assert abs(got - expected) < 6 / math.sqrt(band.sum()), name
        results[name] = np.corrcoef(ratings[earlier[band]], ratings[later[band]])[0, 1]
    # .99 against about .60 for the taste term; the ratings (.66 against .56) by less.
    assert results["recent"] > results["old"] + 0.05


def test_oracle_is_calibrated_and_beats_the_baselines() -> None:
    stream = medium_stream()
    sample = np.random.default_rng(0).choice(len(stream.events), 200_000, replace=False)
    liked = stream.events.ratings[sample] >= 4
    p = oracle(stream, sample).at_least(3.5)
    standard_error = math.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(p.mean() - liked.mean()) < 4 * standard_error
    # Calibrated where it is confident too: each decile of the prediction.
    deciles = np.quantile(p, np.linspace(0, 1, 11))
    for low, high in itertools.pairwise(deciles):
        inside = (p >= low) & (p <= high)
        error = math.sqrt((p[inside] * (1 - p[inside])).sum()) / inside.sum()
        assert abs(p[inside].mean() - liked[inside].mean()) < 6 * error
    forecasts = {"oracle": p}
    for name in ("static", "user+item bias", "item bias"):
        forecasts[name] = baseline(stream, sample, name).at_least(3.5)
    aucs = {name: auc(values, liked) for name, values in forecasts.items()}
    assert aucs["oracle"] > aucs["static"] + 0.1 > aucs["user+item bias"] + 0.1
    assert aucs["user+item bias"] > aucs["item bias"] > 0.55
    # The baselines are calibrated on average as well (their rest is taken as Gaussian).
    assert abs(forecasts["item bias"].mean() - liked.mean()) < 0.01


def test_normal_cdf_and_the_forecast_distribution() -> None:
    assert normal_cdf(np.array([0.0]))[0] == 0.5
    assert normal_cdf(np.array([1.959963984540054]))[0] == pytest.approx(0.975, abs=1e-12)
    assert normal_cdf(np.array([-10.0]))[0] == pytest.approx(7.619853024160527e-24, rel=1e-9)
    fc = oracle(medium_stream(), np.arange(1_000))
    assert np.allclose(fc.probabilities.sum(axis=1), 1.0)
    assert np.allclose(fc.at_least(3.5) + fc.at_most(3.0), 1.0)
    assert np.all((fc.expected() >= 1) & (fc.expected() <= 5))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"noise_sd": 0.0}, "noise_sd must be > 0, got 0.0"),
        ({"drift_memory": 1.5}, "drift_memory must be in [0, 1], got 1.5"),
        ({"factors": 0}, "factors must be >= 1, got 0"),
        ({"opinion_sd": -1}, "opinion_sd must be >= 0, got -1.0"),
        ({"factors": 2.5}, "factors must be an integer, got 2.5"),
        ({"noise": 1.0}, "unknown parameter 'noise'"),
    ],
)
def test_bad_rating_parameters_are_one_line_errors_naming_them(
    overrides: dict[str, object], fragment: str
) -> None:
    with pytest.raises(DataError) as caught:
        synthetic_params("synthetic-ranking", overrides)
    message = str(caught.value)
    assert fragment in message and "\n" not in message
    assert message.startswith("synthetic-ranking: ")


def test_rating_parameters_are_refused_where_ratings_are_off() -> None:
    with pytest.raises(DataError) as caught:
        synthetic_params("synthetic-long", {"noise_sd": 0.5})
    message = str(caught.value)
    assert "noise_sd is a rating-model parameter" in message and "synthetic-ranking" in message
    assert "\n" not in message


def test_the_rating_scales_are_in_the_digest_and_options() -> None:
    params = synthetic_params("synthetic-ranking")
    assert (params.users, params.min_length, params.max_length) == (6_000, 64, 4_096)
    quieter = synthetic_params("synthetic-ranking", {"noise_sd": 0.5})
    assert source_digest("synthetic-ranking", params) != source_digest("synthetic-ranking", quieter)
    options = params_as_options(quieter)
    assert options["noise_sd"] == "0.5" and options["rating_model_version"] == "1"
    assert params_from_options("synthetic-ranking", options) == quieter


def test_cli_prepares_synthetic_ranking_with_the_size_knobs(home: Path) -> None:
    runner = CliRunner()
    args = ["data", "prepare", "synthetic-ranking", "--users", "30", "--items", "200"]
    args += ["--categories", "5", "--min-length", "16", "--max-length", "40", "--seed", "2"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["source"]["options"]["seed"] == "2"
    assert printed["source"]["options"]["noise_sd"] == "1.0"
    data = load_prepared("synthetic-ranking")
    lengths = np.diff(data.user_offsets)
    assert data.num_users == 30 and lengths.min() >= 16 and lengths.max() <= 40
    expected = generate(
        params_from_options("synthetic-ranking", read_meta("synthetic-ranking").source.options)
    )
    assert np.array_equal(data.ratings, expected.events.ratings)  # prepared order = generated
    # The same parameters from Python reuse the CLI's copy.
    sizes = {"users": 30, "items": 200, "categories": 5, "min_length": 16, "max_length": 40}
    assert prepare("synthetic-ranking", synthetic={**sizes, "seed": 2}) == Path(printed["path"])
    assert read_meta("synthetic-ranking").created == printed["created"]
