"""The GESR ranking preset trains end to end on the real MovieLens-100K (a few CPU steps, every
expert on), and the surfaces read the run: flexgr eval, flexgr score, flexgr.load(...).score."""

from __future__ import annotations

from pathlib import Path

import pytest

import flexgr
from tests.cli.helpers import run
from tests.ranking.surfaces import check_eval_and_score, check_two_step_run

TINY = [
    "data.max_seq_len=12",
    "train.batch_size=16",
    "train.log_every=1",
    "train.max_steps=2",
    "eval.batch_size=512",
    "model.d_model=8",
    "model.hidden=8",
    "model.cross_head_dim=4",
    "model.self_head_dim=4",
    "model.mlpg_hidden=8",
    "model.experts=match,cross,self",
]


def test_gesr_preset_trains_and_every_surface_reads_it(ml100k_home: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "ml-100k-gesr-ranking", "--run-dir", run_dir, "-q"]
    for item in [f"data.data_dir={ml100k_home}", *TINY]:
        args += ["--set", item]
    trained = run(*args)
    assert trained.exit_code == 0, trained.output
    pairs = check_eval_and_score(run_dir, check_two_step_run(run_dir))
    assert 0 < pairs[0][1]["like"] < 1

    exported = run("export", "--run-dir", run_dir, "--out", tmp_path / "exported")
    assert exported.exit_code == 0, exported.output
    ranker = flexgr.load(tmp_path / "exported")
    assert ranker.arch == "gesr-ranking" and ranker.tasks == ["like", "dislike", "rating"]
    # Item "1" is in the history: the match expert's count is 1 for that candidate.
    history, ts = ["1", "2", "3"], [1, 2, 3]
    both = ranker.score(history, ["1", "172"], actions=[5, 3, 4], timestamps=ts)
    alone = ranker.score(history, ["172"], actions=[5, 3, 4], timestamps=ts)
    assert both[1][1] == pytest.approx(alone[0][1], rel=1e-5)  # candidates never see each other
