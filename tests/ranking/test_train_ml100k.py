"""The ranking presets train end to end on the real MovieLens-100K (a few CPU steps), and the
surfaces read the run: flexgr eval, flexgr score, flexgr.load(...).score; exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flexgr
from flexgr.train.loop import TIMING_KEYS
from tests.cli.helpers import run
from tests.ranking.surfaces import check_eval_and_score

TINY = ["data.max_seq_len=12", "train.batch_size=16", "train.log_every=1", "eval.batch_size=512"]
TINY_MODEL = {
    "ml-100k-ranking": ["model.d_model=8", "model.dqk=8", "model.dv=8", "model.head_hidden=8"],
    "ml-100k-sasrec-ranking": ["model.d_model=8", "model.ffn_dim=8", "model.head_hidden=8"],
    "ml-100k-two-tower-ranking": ["model.d_model=8", "model.hidden=8"],
}


def _train(preset: str, home: Path, run_dir: Path, *extra: str, resume: bool = False):
    args = ["train"] if resume else ["train", "--preset", preset]
    sets = [] if resume else [f"data.data_dir={home}", *TINY, *TINY_MODEL[preset]]
    sets += list(extra)
    for item in sets:
        args += ["--set", item]
    return run(*args, "--run-dir", run_dir, "-q", *(["--resume"] if resume else []))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ml100k_ranking_preset_trains_and_every_surface_reads_it(
    ml100k_home: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    trained = _train("ml-100k-ranking", ml100k_home, run_dir, "train.max_steps=3")
    assert trained.exit_code == 0, trained.output
    records = _records(run_dir)
    setup = records[0]
    assert setup["task"] == "ranking" and setup["requests"]["test"] == 943
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    final = records[-1]
    assert final["split"] == "test" and final["final"]
    for key in ("ne:like", "auc:like", "gauc:like", "ne:dislike", "mse:rating"):
        assert key in final
    assert final["impressions"] == 943 * 8  # each user's last 8 ratings

    pairs = check_eval_and_score(run_dir, final)
    assert set(pairs[0][1]) == {"like", "dislike", "rating"} and 0 < pairs[0][1]["like"] < 1
    bad = run("score", "--run-dir", run_dir, "--user", "1", "--candidates", "50,nope")
    assert bad.exit_code == 1 and "unknown item id 'nope'" in bad.stderr

    recommend = run("recommend", "--run-dir", run_dir, "--user", "1")
    assert recommend.exit_code == 1 and "use flexgr score" in recommend.stderr
    serve = run("serve", "--run-dir", run_dir, "--ann")  # served: tests/serve/test_ranking.py
    assert serve.exit_code == 1 and "--ann ranks a retrieval model" in serve.stderr
    exported = run("export", "--run-dir", run_dir, "--out", tmp_path / "exported")
    assert exported.exit_code == 0, exported.output

    ranker = flexgr.load(tmp_path / "exported")
    again = ranker.score(["1", "2", "3"], ["50", "172"], actions=[5, 3, 4], timestamps=[1, 2, 3])
    alone = ranker.score(["1", "2", "3"], ["172"], actions=[5, 3, 4], timestamps=[1, 2, 3])
    assert again[1][1] == pytest.approx(alone[0][1], rel=1e-5)  # candidates never see each other
    with pytest.raises(ValueError, match="no candidates"):
        ranker.score(["1"], [], actions=[4])
    with pytest.raises(ValueError, match="reads at most 12"):
        ranker.score(["1"] * 13, ["50"], actions=[4] * 13)
    with pytest.raises(KeyError, match="unknown item id 'x'"):
        ranker.score(["1"], ["x"], actions=[4])
    with pytest.raises(ValueError, match="actions"):
        ranker.score(["1"], ["50"])


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        (
            "ml-100k-ranking",
            ["model.layout=merged", "ranking.examples=impression", "model.rel_bias=false"],
        ),
        ("ml-100k-sasrec-ranking", []),
        ("ml-100k-two-tower-ranking", []),
    ],
)
def test_layouts_and_baselines_train(
    ml100k_home: Path, tmp_path: Path, preset: str, extra: list
) -> None:
    trained = _train(preset, ml100k_home, tmp_path / "run", "train.max_steps=2", *extra)
    assert trained.exit_code == 0, trained.output
    assert "ne:like" in _records(tmp_path / "run")[-1]


def test_resume_continues_exactly(ml100k_home: Path, tmp_path: Path) -> None:
    def strip(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    # The trainer's resume does not depend on the model: the cheapest one is enough here.
    preset = "ml-100k-two-tower-ranking"
    straight = tmp_path / "straight"
    assert _train(preset, ml100k_home, straight, "train.max_steps=4").exit_code == 0
    cut = tmp_path / "cut"
    assert _train(preset, ml100k_home, cut, "train.max_steps=2").exit_code == 0
    resumed = _train("", ml100k_home, cut, "train.max_steps=4", resume=True)
    assert resumed.exit_code == 0, resumed.output
    want = [r for r in strip(_records(straight)) if r["kind"] == "train"]
    got = [r for r in strip(_records(cut)) if r["kind"] == "train"]
    assert got == want
    assert strip(_records(cut))[-1] == strip(_records(straight))[-1]


def test_heads_start_at_the_training_labels_mean(ml100k_home: Path, tmp_path: Path) -> None:
    import math

    import numpy as np
    from rich.console import Console

    from flexgr.ranking.requests import impressions_of
    from flexgr.ranking.train import RankingTrainer
    from flexgr.train.config import apply_overrides, load_preset
    from flexgr.train.rundir import RunDir

    cfg = apply_overrides(
        load_preset("ml-100k-two-tower-ranking"),
        [f"data.data_dir={ml100k_home}", *TINY, *TINY_MODEL["ml-100k-two-tower-ranking"]],
    )
    trainer = RankingTrainer(cfg, RunDir(tmp_path / "run"), Console(quiet=True), False, [])
    ex = trainer.examples
    _, events = impressions_of(ex.requests.take(ex.split.train))
    ratings = trainer.data.ratings[events].astype(np.float64)
    like, dislike = (ratings >= 3.5).mean(), (ratings <= 2.0).mean()
    want = [math.log(like / (1 - like)), math.log(dislike / (1 - dislike)), ratings.mean()]
    assert trainer.model.output_bias.tolist() == pytest.approx(want, rel=1e-5)
