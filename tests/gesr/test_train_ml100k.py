"""The GESR ranking preset trains end to end on the real MovieLens-100K (a few CPU steps, every
expert on), and the surfaces read the run: flexgr eval, flexgr score, flexgr.load(...).score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flexgr
from tests.cli.helpers import run

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
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["task"] == "ranking"
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    final = records[-1]
    assert final["split"] == "test" and final["final"] and final["impressions"] == 943 * 8
    for key in ("ne:like", "auc:like", "gauc:like", "ne:dislike", "mse:rating"):
        assert key in final and final[key] == final[key]  # present and not NaN

    evaluated = run("eval", "--run-dir", run_dir, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["auc:like"] == pytest.approx(final["auc:like"])
    scored = run("score", "--run-dir", run_dir, "--user", "1", "--candidates", "50,172", "--json")
    assert scored.exit_code == 0, scored.output
    pairs = json.loads(scored.stdout)
    assert [p[0] for p in pairs] == ["50", "172"] and 0 < pairs[0][1]["like"] < 1

    exported = run("export", "--run-dir", run_dir, "--out", tmp_path / "exported")
    assert exported.exit_code == 0, exported.output
    ranker = flexgr.load(tmp_path / "exported")
    assert ranker.arch == "gesr-ranking" and ranker.tasks == ["like", "dislike", "rating"]
    # Item "1" is in the history: the match expert's count is 1 for that candidate.
    history, ts = ["1", "2", "3"], [1, 2, 3]
    both = ranker.score(history, ["1", "172"], actions=[5, 3, 4], timestamps=ts)
    alone = ranker.score(history, ["172"], actions=[5, 3, 4], timestamps=ts)
    assert both[1][1] == pytest.approx(alone[0][1], rel=1e-5)  # candidates never see each other
