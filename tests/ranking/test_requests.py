"""Requests and their split against plain-Python definitions; tasks and action codes."""

from __future__ import annotations

import numpy as np
import pytest

from flexgr.ranking import RankingConfig, build_requests, split_requests
from flexgr.ranking.config import validate_ranking
from flexgr.ranking.requests import impressions_of
from flexgr.ranking.tasks import action_codes, event_labels, parse_task, rating_codes
from tests.ranking.helpers import synthetic_data


def _reference_requests(data, cfg: RankingConfig, max_seq_len: int) -> list[tuple]:
    """(user, start, end, history_start) by walking each user's events."""
    out = []
    for u in range(data.num_users):
        s, e = int(data.user_offsets[u]), int(data.user_offsets[u + 1])
        groups: list[list[int]] = []
        if cfg.requests == "fixed":
            n = e - s
            first = n % cfg.request_size or cfg.request_size
            bounds = [s] + list(range(s + first, e, cfg.request_size))
            groups = [list(range(a, b)) for a, b in zip(bounds, bounds[1:] + [e])]
        else:
            for g in range(s, e):
                ts = data.timestamps
                new = g == s or (
                    ts[g] != ts[g - 1]
                    if cfg.requests == "timestamp"
                    else ts[g] - ts[g - 1] > cfg.session_gap
                )
                if new or len(groups[-1]) == cfg.request_size:
                    groups.append([g])
                else:
                    groups[-1].append(g)
        for group in groups:
            if group[0] - s >= cfg.min_history:
                out.append((u, group[0], group[-1] + 1, max(s, group[0] - max_seq_len)))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        RankingConfig(requests="fixed", request_size=4),
        RankingConfig(requests="fixed", request_size=1, min_history=3),
        RankingConfig(requests="timestamp", request_size=3),
        RankingConfig(requests="session", session_gap=100, request_size=5),
    ],
)
def test_requests_match_the_definition(cfg: RankingConfig) -> None:
    data = synthetic_data(users=9, seed=4)
    got = build_requests(data, cfg, max_seq_len=6)
    want = _reference_requests(data, cfg, 6)
    assert list(zip(got.user, got.start, got.end, got.history_start)) == want
    rows, events = impressions_of(got)
    assert events.tolist() == [e for (_, a, b, _) in want for e in range(a, b)]
    assert rows.tolist() == [r for r, (_, a, b, _) in enumerate(want) for _ in range(a, b)]


def test_split_is_last_request_test_and_the_one_before_val() -> None:
    data = synthetic_data(users=15, seed=6, min_len=1, max_len=14)
    requests = build_requests(data, RankingConfig(request_size=3), max_seq_len=50)
    split = split_requests(requests)
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(
        range(len(requests))
    )
    for u in np.unique(requests.user):
        mine = np.flatnonzero(requests.user == u)
        assert (mine[-1] in split.test) == (len(mine) >= 2)
        assert (len(mine) >= 3 and mine[-2] in split.val) or (
            len(mine) < 3 and not np.isin(mine, split.val).any()
        )
        # Everything a test request's history holds comes before it: no leak from later events.
        for r in mine:
            assert requests.history_start[r] < requests.start[r] < requests.end[r]
    gr = split_requests(requests, "gr-compatible")
    assert len(gr.val) == 0 and np.array_equal(gr.test, split.test)


def test_tasks_labels_and_action_codes() -> None:
    data = synthetic_data(users=4, seed=1)
    tasks = [
        parse_task(t)
        for t in ("like", "dislike", "rating", "action:click", "action:click:1", "value:click")
    ]
    labels, known = event_labels(tasks, data)
    r, c = data.ratings, data.actions["click"]
    assert np.array_equal(labels[:, 0], r >= 3.5) and np.array_equal(labels[:, 1], r <= 2.0)
    assert np.array_equal(labels[:, 2], r) and np.array_equal(labels[:, 3], c > 0)
    assert np.array_equal(labels[:, 4], (c >> 1) & 1) and np.array_equal(labels[:, 5], c)
    assert known.all()
    codes = action_codes(["rating", "click"], data)
    assert np.array_equal(codes[:, 0], (r * 2).astype(int)) and np.array_equal(codes[:, 1], c)
    assert rating_codes(np.array([np.nan, 0.5, 3.5, 9.0])).tolist() == [0, 1, 7, 10]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": []}, "at least one task"),
        ({"tasks": ["like", "like"]}, "twice"),
        ({"tasks": ["likes"]}, "is not a task"),
        ({"task_weights": [1.0]}, "1 weights for 3 tasks"),
        ({"metric": "auc:rating"}, "task 'rating' is MSE"),
        ({"metric": "ne:nope"}, "PREFIX:TASK"),
        ({"request_size": 0}, "request_size"),
        ({"min_history": 0}, "min_history"),
    ],
)
def test_bad_ranking_settings_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_ranking(RankingConfig(**changes))


def test_sample_per_user_draws_at_most_n_of_each_user() -> None:
    from flexgr.ranking.requests import sample_per_user

    users = np.repeat(np.arange(6), [1, 5, 2, 0, 7, 3])
    rng = np.random.default_rng(0)
    picked = sample_per_user(users, 2, rng)
    assert np.all(np.diff(picked) > 0)
    counts = np.bincount(users[picked], minlength=6)
    assert counts.tolist() == [1, 2, 2, 0, 2, 2]
    again = sample_per_user(users, 2, np.random.default_rng(0))
    assert np.array_equal(picked, again)  # a function of the generator's seed
    assert np.array_equal(sample_per_user(users, 0, rng), np.arange(len(users)))


def test_ranking_config_round_trips_and_stays_out_of_retrieval_configs(tmp_path) -> None:
    from flexgr.train.config import (
        ConfigError,
        apply_overrides,
        dump_config,
        load_config,
        load_preset,
    )

    cfg = apply_overrides(
        load_preset("ml-100k-ranking"), ["ranking.request_size=3", "ranking.tasks=[like,rating]"]
    )
    path = tmp_path / "c.toml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict() and again.ranking.request_size == 3
    retrieval = load_preset("ml-100k-hstu")
    assert "ranking" not in retrieval.to_dict() and "[ranking]" not in dump_config(retrieval)
    with pytest.raises(ConfigError, match=r"\[ranking\] applies to ranking models"):
        apply_overrides(retrieval, ["ranking.request_size=3"])
    assert not apply_overrides(cfg, ["model.arch=hstu"]).is_ranking
    with pytest.raises(ConfigError, match="one process"):
        apply_overrides(cfg, ["parallel.dp=2"])
