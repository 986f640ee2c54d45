from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_config


@pytest.fixture(scope="session")
def served_run(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained for real (one epoch, about a second), exported and checkpointed."""
    from flexgr.train import fit

    run_dir = tmp_path_factory.mktemp("served") / "run"
    fit(tiny_config(tiny_home, "train.max_epochs=2"), run_dir, show_progress=False)
    return run_dir


def same_ranking(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    """Equal up to float rounding: scores agree place by place, and where the items differ the
    two are tied (each one's expected score equals the other's)."""
    assert len(got) == len(expected)
    expected_score = dict(expected)
    for (item, score), (want_item, want_score) in zip(got, expected, strict=True):
        assert score == pytest.approx(want_score, abs=1e-5)
        if item != want_item:
            assert expected_score[item] == pytest.approx(want_score, abs=1e-5)


@pytest.fixture(scope="session")
def ranking_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HSTU ranking run trained for real (a few steps, about a second): 24 users with
    10 to 20 rated events over 30 items (``tinyrank``), like / dislike / rating heads."""
    import random

    from flexgr.data import prepare
    from flexgr.train import Config, apply_overrides, fit

    home = tmp_path_factory.mktemp("ranking-home")
    rng = random.Random(0)
    lines = ["user,item,ts,rating"]
    for user in range(24):
        ts, seen = 1_000_000, set()
        for _ in range(rng.randint(10, 20)):
            ts += rng.choice([0, 60, 4000])  # some ties
            item = rng.randrange(30)
            if (ts, item) in seen:  # a duplicate event (prepare would warn)
                continue
            seen.add((ts, item))
            liked = (user + item) % 2 == 0
            lines.append(f"u{user},i{item},{ts},{rng.choice([4, 5] if liked else [1, 2, 3])}")
    csv = home / "tinyrank.csv"
    csv.write_text("\n".join(lines) + "\n")
    columns = {"user_col": "user", "item_col": "item", "time_col": "ts", "rating_col": "rating"}
    prepare(str(csv), fmt="csv", name="tinyrank", data_dir=home, progress=False, **columns)
    overrides = [
        "data.dataset=tinyrank",
        f"data.data_dir={home}",
        "data.max_seq_len=12",
        "model.arch=hstu-ranking",
        "model.d_model=8",
        "model.dqk=8",
        "model.dv=8",
        "model.num_layers=1",
        "model.head_hidden=8",
        "model.action_dim=4",
        "ranking.request_size=2",
        "train.batch_size=8",
        "train.max_steps=3",
        "eval.batch_size=64",
    ]
    run_dir = home / "run"
    fit(apply_overrides(Config(), overrides), run_dir, show_progress=False)
    return run_dir
