"""The VISTA ranking preset trains end to end on the real MovieLens-100K (a few CPU steps); the
surfaces read the run; `flexgr vista export-summaries` writes every user's summary and scoring
from the store matches recomputing; the trainer adds the model's auxiliary loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flexgr
from tests.cli.helpers import assert_one_line_error, run
from tests.ranking.surfaces import check_eval_and_score, check_two_step_run, run_records

PRESET = "ml-100k-vista-ranking"
TINY = [
    "data.max_seq_len=12",
    "train.batch_size=16",
    "train.log_every=1",
    "eval.batch_size=512",
    "model.d_model=8",
    "model.num_seeds=4",
    "model.summary_layers=1",
    "model.head_hidden=8",
]


def _train(home: Path, run_dir: Path, *extra: str):
    args = ["train", "--preset", PRESET, "--run-dir", run_dir, "-q"]
    for item in [f"data.data_dir={home}", *TINY, *extra]:
        args += ["--set", item]
    return run(*args)


def test_vista_preset_trains_and_every_surface_reads_it(ml100k_home: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trained = _train(ml100k_home, run_dir, "train.max_steps=2")
    assert trained.exit_code == 0, trained.output
    final = check_two_step_run(run_dir)
    check_eval_and_score(run_dir, final)
    exported = run("export", "--run-dir", run_dir, "--out", tmp_path / "exported")
    assert exported.exit_code == 0, exported.output
    ranker = flexgr.load(tmp_path / "exported")
    assert ranker.arch == "vista-ranking"
    both = ranker.score(["1", "2", "3"], ["50", "172"], actions=[5, 3, 4], timestamps=[1, 2, 3])
    alone = ranker.score(["1", "2", "3"], ["172"], actions=[5, 3, 4], timestamps=[1, 2, 3])
    assert both[1][1] == pytest.approx(alone[0][1], rel=1e-5)  # candidates never see each other

    store = tmp_path / "store"
    out = run("vista", "export-summaries", "--run-dir", run_dir, "--out", store, "--verify",
              "--json")  # fmt: skip
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["summaries"] == 943 and report["bytes"] == 943 * 4 * (8 + 4)  # int8 + scales
    assert len(list(store.iterdir())) == 943  # one directory per user
    check = report["verify"]
    assert 0 < check["max_abs_diff"] < 2e-2  # quantised, and close
    for key, value in check["recomputed"].items():
        assert check["cached"][key] == pytest.approx(value, abs=2e-3)
    assert check["recomputed"]["auc:like"] == pytest.approx(final["auc:like"])

    wrong = run("vista", "export-summaries", "--run-dir", run_dir, "--out", store, "--bits", "3")
    assert_one_line_error(wrong, "--bits must be 8 or 4")


def test_qla_summariser_with_reconstruction_trains(ml100k_home: Path, tmp_path: Path) -> None:
    trained = _train(ml100k_home, tmp_path / "run", "train.max_steps=1",
                     "model.summary_attention=qla", "model.reconstruction_weight=0.1")  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert run_records(tmp_path / "run")[-1]["ne:like"] > 0


def test_the_trainer_adds_the_models_aux_loss(ml100k_home: Path, tmp_path: Path) -> None:
    """RankingTrainer.train_step: task loss + model.aux_loss (the reconstruction loss)."""
    from rich.console import Console

    from flexgr.ranking.batch import request_batch
    from flexgr.ranking.tasks import task_losses
    from flexgr.ranking.train import RankingTrainer
    from flexgr.train.config import apply_overrides, load_preset
    from flexgr.train.rundir import RunDir

    sets = [f"data.data_dir={ml100k_home}", *TINY, "model.dropout=0.0",
            "model.reconstruction_weight=5.0"]  # fmt: skip
    cfg = apply_overrides(load_preset(PRESET), sets)
    trainer = RankingTrainer(cfg, RunDir(tmp_path / "run"), Console(quiet=True), False, [])
    ex, model = trainer.examples, trainer.model
    batch = request_batch(ex.events, ex.requests, ex.split.train[:16])
    model.train()
    with torch.no_grad():
        logits = model(batch, trainer.spec.prepare(model, batch))
        aux = model.aux_loss
        assert aux is not None and aux.item() > 0
        sums = task_losses(logits, batch.labels, batch.known, ex.kinds)
        counts = batch.known.sum(0).clamp_min(1).to(sums.dtype)
        task = (trainer.task_weights * sums / counts).sum()
    loss = trainer.train_step(batch)
    assert loss.item() == pytest.approx((task + aux).item(), rel=1e-5)
    assert loss.item() > task.item() + 1e-4
