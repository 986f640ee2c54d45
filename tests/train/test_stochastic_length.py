"""Stochastic Length: the sampled lengths against the rule, the three selections, sparsity.

Random checks are seeded (hypothesis derandomized, fixed generators), so they cannot flake;
their tolerances are six binomial standard errors, and the tests assert that the tolerance is
tight enough that a probability off by a few percent would fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgr.data import DataError
from flexgr.train.stochastic_length import (
    SELECTIONS,
    TABLE3_ALPHAS,
    TABLE3_LOG_MEAN,
    TABLE3_LOG_STD,
    TABLE3_MAX_LENS,
    expected_lengths,
    keep_full_probability,
    lognormal_lengths,
    sampled_lengths,
    select_events,
    sl_sparsity,
    sl_threshold,
    sparsity_table,
    stochastic_length,
)

DRAWS = 20_000


def binomial_tolerance(p: float, n: int) -> float:
    return 6 * np.sqrt(p * (1 - p) / n) + 1.0 / n


def test_threshold_is_the_reference_code_rounding_down() -> None:
    assert sl_threshold(4096, 1.6) == 776  # the paper's example: more than 80% removed
    assert sl_threshold(1024, 1.6) == 256
    assert sl_threshold(1024, 2.0) == 1024  # alpha = 2: no SL
    assert sl_threshold(8192, 1.8) == int(8192**0.9)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    max_len=st.integers(16, 16_384),
    alpha=st.floats(1.05, 2.0),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_sampled_length_distribution_matches_the_rule(
    max_len: int, alpha: float, fraction: float, seed: int
) -> None:
    threshold = int(max_len ** (alpha / 2))
    length = max(1, round(fraction * max_len))
    lengths = np.full(DRAWS, length)
    got = sampled_lengths(
        lengths, max_len=max_len, alpha=alpha, generator=np.random.default_rng(seed)
    )
    if length <= threshold:
        assert np.all(got == length)
        return
    assert set(np.unique(got)) <= {length, threshold}
    truncate = 1.0 - min(1.0, max_len**alpha / length**2)
    tolerance = binomial_tolerance(truncate, DRAWS)
    assert tolerance <= 0.022  # so a probability off by 0.022 or more fails
    assert abs((got == threshold).mean() - truncate) <= tolerance


def test_expected_length_is_the_mean_of_the_sampled_ones() -> None:
    lengths = np.random.default_rng(1).integers(1, 4097, DRAWS)
    got = sampled_lengths(lengths, max_len=4096, alpha=1.7, generator=np.random.default_rng(2))
    expected = expected_lengths(lengths, max_len=4096, alpha=1.7)
    # Each length is one of two values; the spread of the difference bounds the error.
    spread = np.sqrt(((got - expected) ** 2).mean() / DRAWS)
    assert abs(got.mean() - expected.mean()) <= 6 * spread
    assert np.all(keep_full_probability(lengths, 4096, 1.7)[lengths <= 1176] == 1.0)


jagged = st.lists(st.integers(0, 40), min_size=1, max_size=12)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    lengths=jagged,
    alpha=st.floats(1.1, 2.0),
    selection=st.sampled_from(SELECTIONS),
    keep_last=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_selection_keeps_a_time_ordered_subsequence_of_the_sampled_length(
    lengths: list[int], alpha: float, selection: str, keep_last: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    timestamps = np.concatenate([np.sort(rng.integers(0, 50, n)) for n in lengths]).astype(np.int64)
    max_len = max(max(lengths), 1)
    kept = stochastic_length(
        offsets,
        timestamps,
        max_len=max_len,
        alpha=alpha,
        selection=selection,  # type: ignore[arg-type]
        keep_last=keep_last,
        generator=np.random.default_rng(seed),
    )
    expected_lengths_ = sampled_lengths(
        np.array(lengths), max_len=max_len, alpha=alpha, generator=np.random.default_rng(seed)
    )
    assert np.array_equal(np.diff(kept.offsets), expected_lengths_)
    for b, n in enumerate(lengths):
        chosen = kept.index[kept.offsets[b] : kept.offsets[b + 1]]
        assert np.all(np.diff(chosen) > 0)  # original order, no repeats
        assert np.all((chosen >= offsets[b]) & (chosen < offsets[b + 1]))
        if n and (selection == "recent" or keep_last):
            assert chosen[-1] == offsets[b + 1] - 1  # the most recent event survives
        if selection == "recent":
            assert np.array_equal(chosen, np.arange(offsets[b + 1] - len(chosen), offsets[b + 1]))
    assert np.array_equal(kept.take(timestamps), timestamps[kept.index])


def single_picks(times: list[int], selection: str, keep: int = 1) -> np.ndarray:
    """Position picked in each of DRAWS copies of one sequence with these timestamps."""
    n = len(times)
    offsets = np.arange(DRAWS + 1, dtype=np.int64) * n
    timestamps = np.tile(np.asarray(times, dtype=np.int64), DRAWS)
    index = select_events(
        offsets,
        timestamps,
        np.full(DRAWS, keep),
        selection,  # type: ignore[arg-type]
        np.random.default_rng(7),
    )
    return index % n


def test_weighted_picks_in_proportion_to_one_minus_relative_age() -> None:
    times = [0, 10, 20, 30]  # ages 30, 20, 10, 0; sum 60; weights 1/2, 2/3, 5/6, 1
    weights = np.array([1 / 2, 2 / 3, 5 / 6, 1.0])
    frequency = np.bincount(single_picks(times, "weighted"), minlength=4) / DRAWS
    for observed, p in zip(frequency, weights / weights.sum(), strict=True):
        tolerance = binomial_tolerance(p, DRAWS)
        assert tolerance < 0.021 and abs(observed - p) <= tolerance
    uniform = np.bincount(single_picks(times, "random"), minlength=4) / DRAWS
    assert np.all(np.abs(uniform - 0.25) <= binomial_tolerance(0.25, DRAWS))


def test_weighted_prefers_recent_events_and_zero_weight_is_last_resort() -> None:
    times = [0, 100, 150, 175, 190, 200]
    weighted = single_picks(times, "weighted", keep=3).reshape(DRAWS, 3)
    uniform = single_picks(times, "random", keep=3).reshape(DRAWS, 3)
    newest_w, newest_u = (weighted == 5).any(axis=1).mean(), (uniform == 5).any(axis=1).mean()
    oldest_w = (weighted == 0).any(axis=1).mean()
    assert newest_w - newest_u > 6 * np.sqrt(2 * 0.25 / DRAWS)  # beyond the noise of both
    assert oldest_w < newest_w
    # Two events: the older has weight 0, so keeping one keeps the newer.
    assert np.all(single_picks([0, 5], "weighted") == 1)


def test_torch_inputs_give_tensors_and_a_seeded_generator_repeats() -> None:
    offsets = torch.tensor([0, 300, 301, 900])
    timestamps = torch.cat([torch.arange(300), torch.tensor([7]), torch.arange(599)])

    def run(seed: int):
        return stochastic_length(
            offsets,
            timestamps,
            max_len=600,
            alpha=1.6,
            selection="weighted",
            generator=torch.Generator().manual_seed(seed),
        )

    first, again, other = run(3), run(3), run(4)
    assert isinstance(first.index, torch.Tensor) and first.index.dtype == torch.int64
    assert torch.equal(first.index, again.index) and torch.equal(first.offsets, again.offsets)
    assert not torch.equal(first.index, other.index) or not torch.equal(
        first.offsets, other.offsets
    )
    assert torch.equal(first.take(timestamps), timestamps[first.index])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"alpha": 1.0}, "alpha must be in (1, 2], got 1.0"),
        ({"alpha": 2.5}, "alpha must be in (1, 2], got 2.5"),
        ({"max_len": 0}, "max_len must be >= 1"),
        ({"selection": "greedy"}, "selection must be one of recent, random, weighted"),
        ({"timestamps": np.array([3, 2, 5])}, "timestamps must be non-decreasing"),
        ({"offsets": np.array([0, 2])}, "offsets must run from 0 to len(timestamps) (3)"),
        ({"generator": 3}, "generator must be a numpy.random.Generator or torch.Generator"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {
        "offsets": np.array([0, 3]),
        "timestamps": np.array([1, 2, 5]),
        "max_len": 4,
        "alpha": 1.5,
        "generator": np.random.default_rng(0),
        **kwargs,
    }
    with pytest.raises(DataError) as caught:
        stochastic_length(**args)  # type: ignore[arg-type]
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_sparsity_by_hand_and_without_sl() -> None:
    # All users at N = 1024, alpha 1.6: threshold 256, kept whole with 1024^-0.4 = 1/16.
    row = sl_sparsity(np.full(10, 5_000), max_len=1024, alpha=1.6)
    assert row.sparsity == pytest.approx(1 - (1024 / 16 + 256 * 15 / 16) / 1024)
    assert row.attention_sparsity == pytest.approx(1 - (1024**2 / 16 + 256**2 * 15 / 16) / 1024**2)
    # alpha = 2 keeps everything: only the users shorter than N make it sparse.
    assert sl_sparsity(np.array([512, 1024, 4096]), max_len=1024, alpha=2.0).sparsity == (
        pytest.approx(1 - (512 + 1024 + 1024) / 3 / 1024)
    )


def test_sparsity_table_has_the_papers_shape_on_a_synthetic_distribution() -> None:
    lengths = np.floor(np.exp(np.random.default_rng(0).uniform(np.log(64), np.log(16_385), 5000)))
    rows = sparsity_table(lengths.astype(np.int64), TABLE3_ALPHAS, TABLE3_MAX_LENS)
    grid = np.array([r.sparsity for r in rows]).reshape(len(TABLE3_ALPHAS), len(TABLE3_MAX_LENS))
    assert np.all(np.diff(grid, axis=0) < 0)  # a smaller alpha removes more
    assert np.all(np.diff(grid, axis=1) > 0)  # a longer window is sparser
    attention = np.array([r.attention_sparsity for r in rows]).reshape(grid.shape)
    assert np.all(attention >= grid)  # quadratic cost falls faster than length


def test_table3_sl_rows_follow_from_its_no_sl_row() -> None:
    # A log-normal fitted to the alpha = 2 row only; the rule must then give the other rows.
    # A wrong keep probability (e.g. N^a / n instead of N^a / n^2) misses them by 10-40 points.
    paper = {
        1.6: [71.5, 76.1, 80.5, 84.4],
        1.7: [56.1, 63.6, 69.8, 75.6],
        1.8: [40.2, 45.3, 54.1, 66.4],
        1.9: [17.2, 21.0, 36.3, 64.1],
        2.0: [3.1, 6.6, 29.1, 64.1],
    }
    lengths = lognormal_lengths(TABLE3_LOG_MEAN, TABLE3_LOG_STD)
    for row in sparsity_table(lengths, TABLE3_ALPHAS, TABLE3_MAX_LENS):
        published = paper[row.alpha][TABLE3_MAX_LENS.index(row.max_len)]
        assert abs(100 * row.sparsity - published) < 5.0, (row.alpha, row.max_len)
