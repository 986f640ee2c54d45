from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from flexgr.train import RunDir, RunDirError, fit, load_config
from flexgr.train.runtime import set_deterministic
from tests.conftest import tiny_config


def quiet() -> Console:
    return Console(quiet=True)


def test_run_directory_contract(tiny_home: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_home, "train.max_epochs=2")
    run = tmp_path / "run"
    result = fit(cfg, run, console=quiet())
    assert load_config(run / "config.toml").to_dict() == cfg.to_dict()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    train = [r for r in parsed if r["kind"] == "train"]
    evals = [r for r in parsed if r["kind"] == "eval"]
    assert train and all({"step", "loss", "lr", "epoch", "tokens_per_s"} <= set(r) for r in train)
    assert [r["step"] for r in train] == list(range(2, 13, 2))  # log_every=2, 6 steps per epoch
    assert [(r["split"], r["epoch"]) for r in evals] == [
        ("val", 1),
        ("val", 2),
        ("test", result.epoch),
    ]
    names = {"hr@1", "ndcg@1", "hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"}
    assert all(names <= set(r) for r in evals)
    assert evals[-1]["final"] is True and evals[-1] == {
        **evals[-1],
        **{k: result.test[k] for k in names},
    }
    assert (run / "model.safetensors").is_file()
    description = json.loads((run / "model.json").read_text())
    assert description["arch"] == "hstu" and description["config"]["d_model"] == 16
    assert len(description["item_ids"]) == description["config"]["num_items"] == 30
    assert description["metadata"]["epoch"] == result.epoch
    assert (run / "checkpoints" / "last.pt").is_file() and (
        run / "checkpoints" / "best.pt"
    ).is_file()
    assert not list(run.rglob(".*tmp*"))  # no temp files left behind


def test_training_learns_the_toy_pattern(tiny_home: Path, tmp_path: Path) -> None:
    """In the toy log item i is always followed by i + 1: a few epochs must beat chance by far
    (chance HR@10 is about 10 / 30)."""
    cfg = tiny_config(
        tiny_home,
        "train.max_epochs=8",
        "train.lr=1e-2",
        "model.dropout=0.0",
        "model.input_dropout=0.0",
    )
    result = fit(cfg, tmp_path / "run", console=quiet())
    assert result.test["hr@1"] > 0.5
    losses = [r["loss"] for r in RunDir(tmp_path / "run").read_metrics() if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0]


def test_early_stopping_on_a_flat_validation_metric(tiny_home: Path, tmp_path: Path) -> None:
    # A learning rate this small leaves the metric unchanged, which is never an improvement.
    cfg = tiny_config(tiny_home, "train.lr=1e-12", "train.max_epochs=10", "train.patience=2")
    result = fit(cfg, tmp_path / "run", console=quiet())
    assert result.stop_reason == "early_stopping"
    assert result.epoch == 1
    vals = [r for r in RunDir(tmp_path / "run").read_metrics() if r.get("split") == "val"]
    assert [r["epoch"] for r in vals] == [1, 2, 3]


def test_gr_compatible_reports_the_last_epoch_on_test(tiny_home: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_home, "data.protocol=gr-compatible", "train.patience=1")
    result = fit(cfg, tmp_path / "run", console=quiet())
    evals = [r for r in RunDir(tmp_path / "run").read_metrics() if r["kind"] == "eval"]
    assert all(r["split"] == "test" for r in evals)
    assert [r["epoch"] for r in evals] == [1, 2, 3, 3]
    assert result.epoch == 3 and result.stop_reason == "max_epochs"  # patience does not apply
    final = {k: v for k, v in evals[-1].items() if k not in ("final", "eval_s")}
    last = {k: v for k, v in evals[-2].items() if k != "eval_s"}
    assert final == last


def test_max_steps_counts_optimizer_steps(tiny_home: Path, tmp_path: Path) -> None:
    result = fit(tiny_config(tiny_home, "train.max_steps=3"), tmp_path / "run", console=quiet())
    assert result.steps == 3 and result.stop_reason == "max_steps"
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_max_minutes_stops_mid_epoch_evaluates_it_and_tests(
    tiny_home: Path, tmp_path: Path
) -> None:
    from flexgr.train.loop import Trainer

    # 0.5 minutes on a clock that reads 10 s per optimizer step: the deadline falls at step 3,
    # inside the first epoch of 6 steps.
    cfg = tiny_config(tiny_home, "train.max_minutes=0.5", "train.max_epochs=3")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    trainer = Trainer(cfg, run, quiet(), show_progress=False, callbacks=())
    trainer._clock = lambda: 10.0 * trainer.state.step  # type: ignore[method-assign]
    result = trainer.fit()
    assert (result.steps, result.stop_reason) == (3, "max_minutes")
    evals = [r for r in run.read_metrics() if r["kind"] == "eval"]
    assert [(r["split"], r["epoch"], r.get("partial", False)) for r in evals] == [
        ("val", 1, True),
        ("test", 1, False),
    ]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_max_minutes_is_checked_and_refused_across_ranks(tiny_home: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from flexgr.train.config import ConfigError
    from flexgr.train.loop import Trainer, TrainError

    with pytest.raises(ConfigError, match="train.max_minutes must be >= 0"):
        tiny_config(tiny_home, "train.max_minutes=-1")
    cfg = tiny_config(tiny_home, "train.max_minutes=5")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    two_ranks = SimpleNamespace(device=torch.device("cpu"), world_size=2)
    with pytest.raises(TrainError, match="train.max_minutes works in one process only"):
        Trainer(cfg, run, quiet(), show_progress=False, callbacks=(), ctx=two_ranks)


def test_same_seed_same_run_other_seed_other_run(tiny_home: Path, tmp_path: Path) -> None:
    a = fit(tiny_config(tiny_home, "train.max_epochs=1"), tmp_path / "a", console=quiet())
    b = fit(tiny_config(tiny_home, "train.max_epochs=1"), tmp_path / "b", console=quiet())
    c = fit(
        tiny_config(tiny_home, "train.max_epochs=1", "train.seed=7"),
        tmp_path / "c",
        console=quiet(),
    )
    assert a.test == b.test
    assert a.test != c.test


def test_an_existing_run_is_not_overwritten(tiny_home: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_home, "train.max_steps=1")
    fit(cfg, tmp_path / "run", console=quiet())
    with pytest.raises(RunDirError, match="already holds a run"):
        fit(cfg, tmp_path / "run", console=quiet())


def test_deterministic_switch_sets_and_clears_torch_flags() -> None:
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_compile_failure_falls_back_to_eager_and_is_recorded(
    tiny_home: Path, tmp_path: Path
) -> None:
    from flexgr.train.loop import Trainer

    cfg = tiny_config(tiny_home)
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    trainer = Trainer(cfg, run, quiet(), show_progress=False, callbacks=())

    def broken_compiled_model(*args, **kwargs):
        raise RuntimeError("BackendCompilerFailed: inductor could not compile\nmore detail")

    trainer.forward = broken_compiled_model  # what a failed torch.compile looks like
    batch = next(iter(trainer.loader))
    loss = trainer.train_step(batch)
    assert torch.isfinite(loss) and not trainer.compiled
    trainer.metrics.close()
    warnings = [r for r in run.read_metrics() if r["kind"] == "warning"]
    assert len(warnings) == 1 and "inductor could not compile" in warnings[0]["message"]


def test_an_eager_failure_is_not_swallowed(tiny_home: Path, tmp_path: Path) -> None:
    from flexgr.train.loop import Trainer

    cfg = tiny_config(tiny_home)
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    trainer = Trainer(cfg, run, quiet(), show_progress=False, callbacks=())
    batch = next(iter(trainer.loader))
    broken = batch.__class__(**{**batch.__dict__, "targets": batch.targets + 1000})  # out of range
    with pytest.raises(IndexError):
        trainer.train_step(broken)
    trainer.metrics.close()


def test_the_backend_is_chosen_once_logged_and_strict_refuses_a_fallback(
    tiny_home: Path, tmp_path: Path
) -> None:
    from flexgr.train.loop import TrainError

    fit(tiny_config(tiny_home, "train.max_steps=1"), tmp_path / "run", console=quiet(),
        show_progress=False)
    setup = RunDir(tmp_path / "run").read_metrics()[0]
    assert setup["kind"] == "setup" and setup["items"] == 30
    assert setup["backend"]["train"] == setup["backend"]["eval"] == "reference"  # auto on CPU
    assert (setup["item_pool"], setup["exclude_history"]) == ("rated", "all")
    # flex has no CPU backward: training would run the reference; strict says so and stops.
    cfg = tiny_config(tiny_home, "model.backend=flex", "train.strict_backend=true")
    with pytest.raises(TrainError, match="model.backend='flex' cannot run here.*no backward"):
        fit(cfg, tmp_path / "strict", console=quiet(), show_progress=False)
    fit(tiny_config(tiny_home, "model.backend=flex", "train.max_steps=1"), tmp_path / "lax",
        console=quiet(), show_progress=False)
    lax = RunDir(tmp_path / "lax").read_metrics()[0]["backend"]
    assert (lax["train"], lax["eval"]) == ("reference", "flex") and "CPU" in lax["reason"]
