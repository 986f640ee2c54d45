from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flexgr.serve.server import BackgroundServer
from tests.conftest import tiny_config
from tests.serve.helpers import server_for


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
def tinyrank_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data home with ``tinyrank``: 24 users with 10 to 20 rated events over 30 items."""
    import random

    from flexgr.data import prepare

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
    return home


TINYRANK_TRAINING = [
    "data.dataset=tinyrank",
    "data.max_seq_len=12",
    "ranking.request_size=2",
    "train.batch_size=8",
    "train.max_steps=3",
    "eval.batch_size=64",
]


@pytest.fixture(scope="session")
def ranking_run(tinyrank_home: Path) -> Path:
    """A tiny HSTU ranking run trained for real (a few steps, about a second) on ``tinyrank``,
    like / dislike / rating heads."""
    from flexgr.train import Config, apply_overrides, fit

    overrides = [
        *TINYRANK_TRAINING,
        f"data.data_dir={tinyrank_home}",
        "model.arch=hstu-ranking",
        "model.d_model=8",
        "model.dqk=8",
        "model.dv=8",
        "model.num_layers=1",
        "model.head_hidden=8",
        "model.action_dim=4",
    ]
    run_dir = tinyrank_home / "run"
    fit(apply_overrides(Config(), overrides), run_dir, show_progress=False)
    return run_dir


@pytest.fixture(scope="session")
def vista_run(tinyrank_home: Path) -> Path:
    """A tiny VISTA ranking run (``ml-100k-vista-ranking`` shrunk: d 8, 3 seeds, one layer per
    stage) trained a few steps on ``tinyrank``."""
    from flexgr.train import apply_overrides, fit
    from flexgr.train.config import load_preset

    overrides = [
        *TINYRANK_TRAINING,
        f"data.data_dir={tinyrank_home}",
        "model.d_model=8",
        "model.num_seeds=3",
        "model.summary_layers=1",
        "model.head_hidden=8",
        "model.action_dim=4",
    ]
    run_dir = tinyrank_home / "vista-run"
    fit(apply_overrides(load_preset("ml-100k-vista-ranking"), overrides), run_dir,
        show_progress=False)  # fmt: skip
    return run_dir


@pytest.fixture(scope="module")
def server(service: Any) -> Iterator[BackgroundServer]:
    """A real server over the test module's ``service`` fixture (a module that serves something
    else defines its own ``server``)."""
    with server_for(service) as running:
        yield running


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
