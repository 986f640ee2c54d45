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
