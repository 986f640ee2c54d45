"""The synthetic-ranking presets train end to end on a tiny synthetic-ranking (CPU, one short
epoch), and the oracle scores the same test requests: a ceiling above the baselines."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from flexgr.data import load_prepared, prepare, read_meta
from flexgr.ranking.requests import impressions_of
from flexgr.ranking.setup import ranking_data
from flexgr.ranking.synthetic_oracle import (
    PREDICTORS,
    candidates_in_history,
    oracle_metrics,
    stream_of,
)
from flexgr.train import apply_overrides, fit, load_preset, preset_names

PRESETS = ["hstu", "two-tower", "gesr", "vista"]
TINY_DATA = {"users": 60, "items": 300, "categories": 10, "min_length": 16, "max_length": 64}
TINY = [
    "data.max_seq_len=32",
    "train.batch_size=16",
    "train.max_epochs=1",
    "train.log_every=1",
    "ranking.sample_per_user=1",
    "eval.batch_size=256",
    "model.d_model=8",
]
TINY_MODEL = {
    "hstu": ["model.dqk=8", "model.dv=8", "model.head_hidden=8"],
    "two-tower": ["model.hidden=8"],
    "gesr": [
        "model.hidden=8",
        "model.cross_head_dim=4",
        "model.self_head_dim=4",
        "model.mlpg_hidden=8",
    ],
    "vista": ["model.num_seeds=4", "model.summary_layers=1", "model.head_hidden=8"],
}


@pytest.fixture(scope="module")
def synthetic_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("synthetic-ranking-home")
    prepare("synthetic-ranking", synthetic=TINY_DATA, data_dir=home, progress=False)
    return home


def test_the_presets_exist_and_read_synthetic_ranking() -> None:
    names = [n for n in preset_names() if n.startswith("synthetic-ranking-")]
    assert sorted(names) == sorted(f"synthetic-ranking-{p}" for p in PRESETS)
    for preset in PRESETS:
        cfg = load_preset(f"synthetic-ranking-{preset}")
        assert (cfg.data.dataset, cfg.data.max_seq_len) == ("synthetic-ranking", 1024)
        assert cfg.ranking.metric == "ne:like"
    assert load_preset("synthetic-ranking-gesr").model_options()["experts"] == [
        "match",
        "cross",
        "self",
    ]


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_trains_one_short_epoch(
    preset: str, synthetic_home: Path, tmp_path: Path
) -> None:
    cfg = load_preset(f"synthetic-ranking-{preset}")
    over = [f"data.data_dir={synthetic_home}", *TINY, *TINY_MODEL[preset]]
    result = fit(apply_overrides(cfg, over), tmp_path / "run", show_progress=False)
    assert result.steps >= 1
    assert math.isfinite(result.test["ne:like"]) and 0.0 <= result.test["auc:like"] <= 1.0


def test_oracle_scores_the_presets_test_requests(synthetic_home: Path) -> None:
    cfg = apply_overrides(
        load_preset("synthetic-ranking-hstu"),
        [f"data.data_dir={synthetic_home}", "data.max_seq_len=32"],
    )
    data = load_prepared("synthetic-ranking", data_dir=synthetic_home)
    stream = stream_of(read_meta("synthetic-ranking", data_dir=synthetic_home))
    report = oracle_metrics(cfg, data, stream)
    assert list(report) == list(PREDICTORS)
    # The last request (8 impressions) of each user with two requests after its first event:
    # a user of 16 events has its first request dropped (no history) and is never tested.
    tested = int((np.diff(data.user_offsets) > 16).sum())
    assert 50 < tested < 60
    assert all(m["impressions"] == tested * 8 for m in report.values())
    oracle, item_bias = report["oracle"], report["item bias"]
    assert oracle["auc:like"] > item_bias["auc:like"] + 0.1
    assert oracle["ne:like"] < item_bias["ne:like"] - 0.1
    assert oracle["mse:rating"] < report["static"]["mse:rating"]


@pytest.mark.parametrize("window", [4, 32])
def test_candidates_in_history_counts_items_inside_the_window(
    window: int, synthetic_home: Path
) -> None:
    cfg = apply_overrides(
        load_preset("synthetic-ranking-hstu"),
        [f"data.data_dir={synthetic_home}", f"data.max_seq_len={window}"],
    )
    data = load_prepared("synthetic-ranking", data_dir=synthetic_home)
    ranked = ranking_data(cfg, data)
    requests = ranked.requests.take(ranked.split.test)
    rows, events = impressions_of(requests)
    brute = [
        data.items[e] in data.items[requests.history_start[r] : requests.start[r]]
        for r, e in zip(rows, events, strict=True)
    ]
    share = candidates_in_history(cfg, data)
    assert share == pytest.approx(np.mean(brute), abs=1e-12)
    assert 0.05 < share < 0.95  # neither none nor all: the check can tell


def _benchmark(name: str, monkeypatch: pytest.MonkeyPatch):
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))  # ranking.py imports synthetic_oracle from there
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grid_picks_the_dataset_family(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = _benchmark("ranking", monkeypatch)
    ml = [(n, grid.preset_of("ml-1m", n, t)) for n, t, _ in grid.GRID if grid.selected(n, [])]
    assert ml == [
        ("hstu-interleaved", "ml-1m-ranking"),
        ("hstu-merged", "ml-1m-ranking"),
        ("sasrec", "ml-1m-sasrec-ranking"),
        ("two-tower", "ml-1m-two-tower-ranking"),
    ]  # as before the --dataset flag
    synthetic = [
        grid.preset_of("synthetic-ranking", n, t)
        for n, t, _ in grid.GRID
        if grid.selected(n, [], "synthetic-ranking")
    ]
    assert synthetic == [f"synthetic-ranking-{p}" for p in ("hstu", "two-tower", "gesr", "vista")]
    assert set(synthetic) <= set(preset_names())
    assert not grid.selected("sasrec", ["sasrec"], "synthetic-ranking")


def test_the_grid_writes_the_oracle_rows(
    synthetic_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    grid = _benchmark("ranking", monkeypatch)
    args = argparse.Namespace(
        dataset="synthetic-ranking", set=["data.max_seq_len=32"], data_dir=str(synthetic_home)
    )
    grid.write_oracle_lines(args, tmp_path)
    grid.summarise(tmp_path)
    table = capsys.readouterr().out
    for name in PREDICTORS:
        assert (tmp_path / f"synthetic-ranking.{name.replace(' ', '-')}/benchmark.json").is_file()
        assert f"| ({name}) | 1 |" in table


def test_the_step_benchmark_times_each_part_of_a_gesr_step(
    synthetic_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = _benchmark("ranking_step", monkeypatch)
    over = [f"data.data_dir={synthetic_home}", *TINY, *TINY_MODEL["gesr"]]
    argv = ["--preset", "synthetic-ranking-gesr", "--device", "cpu", "--steps", "2"]
    argv += ["--warmup", "1", "--profile", *(f"--set={o}" for o in over)]
    result = step.main(argv)
    for part in ("build", "copy", "prepare", "step"):
        assert result[f"{part}_ms"] > 0
    assert result["step_ms"] > result["prepare_ms"]  # the step runs prepare, then far more
    assert result["impressions_per_batch"] == 16 * 8  # 16 requests of 8, full batches
    assert result["history_events_per_batch"] > 0 and result["impressions_per_s"] > 0
    assert result["profile_host_ms"] > 0 and result["top_host_ops"]


def test_the_step_benchmark_refuses_a_retrieval_preset(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    step = _benchmark("ranking_step", monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        step.main(["--preset", "ml-1m-hstu", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "not a ranking preset" in capsys.readouterr().err


def test_max_minutes_cuts_a_ranking_run_and_still_tests_it(
    synthetic_home: Path, tmp_path: Path
) -> None:
    from rich.console import Console

    from flexgr.ranking.train import RankingTrainer
    from flexgr.train.rundir import RunDir

    over = [f"data.data_dir={synthetic_home}", *TINY, *TINY_MODEL["two-tower"]]
    over += ["train.max_epochs=3", "train.max_minutes=0.25"]  # 15 s
    cfg = apply_overrides(load_preset("synthetic-ranking-two-tower"), over)
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    trainer = RankingTrainer(cfg, run, Console(quiet=True), show_progress=False, callbacks=())
    assert trainer.batches_per_epoch > 2  # the deadline falls inside the first epoch
    trainer._clock = lambda: 10.0 * trainer.state.step  # type: ignore[method-assign]
    result = trainer.fit()
    assert (result.steps, result.stop_reason) == (2, "max_minutes")
    assert math.isfinite(result.test["ne:like"])
    evals = [r for r in run.read_metrics() if r["kind"] == "eval"]
    splits = [(r["split"], r.get("partial", False)) for r in evals]
    assert splits == [("val", True), ("test", False)]


def test_the_grid_table_says_how_each_models_runs_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = _benchmark("ranking", monkeypatch)
    stops = {"s42": "early_stopping", "s43": "max_minutes", "s44": "early_stopping"}
    for seed, stop in stops.items():
        (tmp_path / f"gesr.{seed}").mkdir()
        line = {"model": "gesr", "stop": stop, "ne:like": 0.9, "step_s": 0.1}
        (tmp_path / f"gesr.{seed}" / "benchmark.json").write_text(json.dumps(line) + "\n")
    grid.summarise(tmp_path)
    row = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| gesr |")]
    assert row == [
        "| gesr | 3 | 0.9000 ± 0.0000 | - | - | - | - | - | 100.00 ± 0.00 "
        "| early_stopping x2, max_minutes x1 |"
    ]
