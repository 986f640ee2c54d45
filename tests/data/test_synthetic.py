"""The synthetic Dirichlet-process streams: determinism, the process's statistics, preparing.

Statistical checks use fixed seeds (so they cannot flake) and tolerances of six binomial or
sampling standard errors (so a wrong probability, not noise, is what fails them).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from flexgr.cli.main import app
from typer.testing import CliRunner

from flexgr.data import DataError, load_prepared, prepare, read_meta
from flexgr.data.synthetic import (
    GENERATOR_VERSION,
    ReleaseSchedule,
    SyntheticStream,
    generate,
    synthetic_params,
)

SMALL = {"users": 2_000, "items": 2_000, "categories": 20, "min_length": 64, "max_length": 64}


@cache
def small_stream(seed: int = 0) -> SyntheticStream:
    return generate(synthetic_params("synthetic-streaming", {**SMALL, "seed": seed}))


def columns(stream: SyntheticStream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users = stream.events.users.cast("int64").to_numpy()
    items = stream.events.items.cast("int64").to_numpy()
    return users, items, stream.events.timestamps


def test_same_seed_same_events_other_seed_other_events() -> None:
    params = synthetic_params("synthetic-long", {"users": 20, "max_length": 2_000, "seed": 5})
    first, again = generate(params), generate(params)
    for a, b in zip(columns(first), columns(again), strict=True):
        assert np.array_equal(a, b)
    other = generate(synthetic_params("synthetic-long", {"users": 20, "max_length": 2_000}))
    assert not np.array_equal(columns(first)[1][:500], columns(other)[1][:500])
    assert not np.array_equal(first.concentration, other.concentration)


def test_defaults_are_the_papers_process_at_a_smaller_size() -> None:
    streaming = synthetic_params("synthetic-streaming")
    assert (streaming.items, streaming.categories) == (20_000, 100)
    assert (streaming.min_length, streaming.max_length) == (128, 128)
    assert (streaming.min_concentration, streaming.max_concentration) == (1.0, 500.0)
    assert streaming.initial_fraction == 0.4
    assert synthetic_params("synthetic-long").max_length == 16_384


def test_concentration_is_uniform_on_1_to_500() -> None:
    alpha = small_stream().concentration
    assert alpha.min() >= 1.0 and alpha.max() <= 500.0
    assert alpha.min() < 5.0 and alpha.max() > 495.0  # the whole range is used (2,000 draws)
    standard_error = (499 / np.sqrt(12)) / np.sqrt(len(alpha))
    assert abs(alpha.mean() - 250.5) < 6 * standard_error


def test_fresh_draws_follow_the_chinese_restaurant_probability() -> None:
    # Given a_u, event j is fresh with probability a_u / (a_u + j), independently over j.
    stream = small_stream()
    fresh = stream.fresh.reshape(SMALL["users"], SMALL["min_length"])
    alpha = stream.concentration[:, None]
    p = alpha / (alpha + np.arange(SMALL["min_length"])[None, :])
    assert fresh[:, 0].all()
    per_step_z = (fresh.sum(axis=0) - p.sum(axis=0))[1:] / np.sqrt((p * (1 - p)).sum(axis=0))[1:]
    assert np.abs(per_step_z).max() < 6
    # All 126,000 later draws together: a probability off by 1% would be 5 standard errors out.
    later = p[:, 1:]
    total_z = (fresh[:, 1:].sum() - later.sum()) / np.sqrt((later * (1 - later)).sum())
    assert abs(total_z) < 4
    assert 0.01 * later.sum() / np.sqrt((later * (1 - later)).sum()) > 5


def test_a_copy_repeats_an_earlier_item_of_the_same_user() -> None:
    stream = small_stream()
    _, items, _ = columns(stream)
    grid = items.reshape(SMALL["users"], SMALL["min_length"])
    fresh = stream.fresh.reshape(grid.shape)
    for user in range(0, SMALL["users"], 97):
        for step in np.flatnonzero(~fresh[user]):
            assert grid[user, step] in grid[user, :step]
    # Every distinct item of a user entered through a fresh draw; low concentration means few
    # of them (about 21 of 64 for a < 20, 57 for a > 400): the urn, not a uniform stream.
    distinct = np.array([len(np.unique(row)) for row in grid])
    assert np.all(distinct <= fresh.sum(axis=1))
    low, high = stream.concentration < 20, stream.concentration > 400
    assert distinct[low].mean() < 30
    assert distinct[high].mean() > 50


def test_no_event_uses_an_item_before_its_release() -> None:
    stream = small_stream()
    _, items, times = columns(stream)
    assert np.all(times >= stream.release_time[items])
    schedule = ReleaseSchedule.of(synthetic_params("synthetic-streaming", SMALL), times)
    # release_time (a ceiling) is the exact inverse of released (a floor): a rank exists at t
    # exactly when t >= its release time.
    probe = np.linspace(times.min(), times.max() + 5, 997).astype(np.int64)
    ranks = np.arange(SMALL["items"])
    exists = ranks[None, :] < schedule.released(probe)[:, None]
    assert np.array_equal(exists, probe[:, None] >= stream.release_time[None, :])


def test_items_are_released_linearly_from_40_percent() -> None:
    stream = small_stream()
    _, items, times = columns(stream)
    release = stream.release_time
    initial = int(0.4 * SMALL["items"])
    assert np.all(release[:initial] == times.min()) and release[initial] > times.min()
    assert release[-1] <= times.max() and np.all(np.diff(release) >= 0)
    # Halfway through the stream, 70% of the ranks exist; the upper ones are drawn only later.
    halfway = times.min() + (times.max() - times.min()) // 2
    assert abs(np.searchsorted(release, halfway, side="right") - 0.7 * SMALL["items"]) <= 1
    early = times < times.min() + (times.max() - times.min()) // 10
    assert items[early].max() < 0.47 * SMALL["items"]
    assert items[~early].max() > 0.99 * SMALL["items"]


def test_categories_partition_items_and_fresh_draws_are_uniform_over_them() -> None:
    stream = small_stream()
    _, items, _ = columns(stream)
    categories = SMALL["categories"]
    assert np.array_equal(stream.item_category, np.arange(SMALL["items"]) % categories)
    per_category = np.bincount(stream.item_category, minlength=categories)
    assert np.all(per_category == SMALL["items"] // categories)
    drawn = np.bincount(stream.item_category[items[stream.fresh]], minlength=categories)
    expected = drawn.sum() / categories
    chi_square = ((drawn - expected) ** 2 / expected).sum()
    assert chi_square < 60  # 19 degrees of freedom: p < 1e-6 above 60; all in one: ~1.6e6


def test_timestamps_increase_within_a_user_and_records_start_in_stream_order() -> None:
    users, _, times = columns(small_stream())
    same_user = np.diff(users) == 0
    assert np.all(np.diff(times)[same_user] >= 1)
    first = times[np.flatnonzero(np.r_[True, ~same_user])]
    assert np.all(np.diff(first) >= 0)


def test_long_lengths_are_log_uniform_within_bounds() -> None:
    bounds = {"min_length": 16, "max_length": 1_024}
    params = synthetic_params("synthetic-long", {"users": 4_000, **bounds, "seed": 2})
    lengths = np.bincount(generate(params).events.users.cast("int64").to_numpy())
    assert lengths.min() >= 16 and lengths.max() <= 1_024
    # Log-uniform: each factor-of-two band of lengths is equally likely (6 bands in 16..1024).
    for low in (16, 64, 256):
        share = ((lengths >= low) & (lengths < 2 * low)).mean()
        expected = np.log(2) / np.log(1_025 / 16)
        assert abs(share - expected) < 6 * np.sqrt(expected * (1 - expected) / len(lengths))
    assert (lengths > 1_000).any()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"users": 0}, "users must be >= 1, got 0"),
        ({"max_length": 10, "min_length": 20}, "max_length must be >= min_length (20)"),
        ({"categories": 900, "items": 1000}, "initial_fraction must be large enough"),
        ({"initial_fraction": 0.0}, "initial_fraction must be in (0, 1]"),
        ({"max_concentration": 0.5}, "max_concentration must be >= min_concentration"),
        ({"user": 3}, "unknown parameter 'user'"),
        ({"users": 2.5}, "users must be an integer, got 2.5"),
        ({"seed": True}, "seed must be a number, got True"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_them(
    overrides: dict[str, object], fragment: str
) -> None:
    with pytest.raises(DataError) as caught:
        synthetic_params("synthetic-long", overrides)
    message = str(caught.value)
    assert fragment in message and "\n" not in message and message.startswith("synthetic-long: ")


def test_prepare_records_the_generator_and_reuses_or_rebuilds(home: Path) -> None:
    tiny = {"users": 40, "items": 300, "categories": 10, "min_length": 20, "max_length": 50}
    directory = prepare("synthetic-long", synthetic=tiny)
    meta = read_meta(directory)
    assert meta.source.kind == "synthetic" and meta.source.builtin == "synthetic-long"
    assert meta.source.options["generator_version"] == str(GENERATOR_VERSION)
    assert meta.source.options["users"] == "40" and meta.source.options["seed"] == "0"
    assert meta.counts.catalog_items == 300 and meta.counts.users == 40
    assert prepare("synthetic-long", synthetic=tiny) == directory
    assert read_meta(directory).created == meta.created  # reused, not rebuilt
    data = load_prepared(directory)
    stream = generate(synthetic_params("synthetic-long", tiny))
    raw_items = np.array(data.pool_item_ids("catalog"))[data.items - 1]
    assert np.array_equal(raw_items, stream.events.items.to_numpy(zero_copy_only=False))
    assert np.array_equal(data.timestamps, stream.events.timestamps)

    prepare("synthetic-long", synthetic={**tiny, "seed": 1})
    assert read_meta(directory).source.options["seed"] == "1"
    assert not np.array_equal(load_prepared(directory).items, data.items)


def test_prepare_refuses_synthetic_options_elsewhere(home: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="synthetic= applies to"):
        prepare("ml-1m", synthetic={"users": 3})
    with pytest.raises(DataError, match="format, columns and item_file do not apply"):
        prepare("synthetic-streaming", fmt="csv")


def test_cli_prepares_with_size_knobs_and_rejects_misuse(home: Path) -> None:
    runner = CliRunner()
    args = ["data", "prepare", "synthetic-streaming", "--users", "30", "--items", "200"]
    result = runner.invoke(app, [*args, "--categories", "5", "--length", "16", "--seed", "4"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args, "--categories", "5", "--length", "16", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["counts"]["events"] == 30 * 16
    assert printed["source"]["options"]["seed"] == "0"  # a changed seed rebuilt it
    for bad, fragment in [
        (["ml-1m", "--users", "3"], "apply to the synthetic datasets"),
        (["synthetic-long", "--length", "3", "--max-length", "9"], "not both"),
        (["synthetic-long", "--users", "0"], "users must be >= 1"),
    ]:
        result = runner.invoke(app, ["data", "prepare", *bad])
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
