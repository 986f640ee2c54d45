"""The recipe knobs through the config: their one-line errors, their torchrun refusals, and
short CPU runs with them on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from flexgr.train import Config, ConfigError, RunDir, apply_overrides, fit, load_preset
from flexgr.train.parallel import ParallelSetupError, check_parallel
from tests.conftest import tiny_config


def test_defaults_are_the_reference_loss_and_no_drop_path() -> None:
    cfg = Config()
    assert (cfg.train.negatives, cfg.train.logq_correction, cfg.train.label_smoothing) == (
        "uniform",
        True,
        0.0,
    )
    assert cfg.model_options()["drop_path"] == 0.0
    preset = load_preset("ml-1m-hstu")
    assert preset.train.negatives == "uniform" and preset.model_options()["drop_path"] == 0.0


def test_values_parse_and_round_trip() -> None:
    sets = ["train.negatives=in_batch", "train.logq_correction=false"]
    sets += ["train.label_smoothing=0.1", "model.drop_path=0.2"]
    cfg = apply_overrides(Config(), sets)
    assert cfg.train.negatives == "in_batch" and cfg.train.logq_correction is False
    assert cfg.train.label_smoothing == 0.1 and cfg.model_options()["drop_path"] == 0.2


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.negatives=all"], "train.negatives=all: expected one of uniform, full, in_batch"),
        (["train.label_smoothing=1"], r"train.label_smoothing must be in \[0, 1\)"),
        (["train.label_smoothing=-0.1"], r"train.label_smoothing must be in \[0, 1\)"),
        (["train.logq_correction=false"], "train.logq_correction = false applies to"),
        (["model.drop_path=1.0"], r"model.drop_path must be in \[0, 1\)"),
        (["model.drop_path=-0.5"], r"model.drop_path must be in \[0, 1\)"),
        (["model.arch=sasrec", "model.drop_path=0.1"], "'model.drop_path' for arch 'sasrec'"),
        (["model.arch=hstu-ranking", "model.drop_path=0.1"], "implemented for arch 'hstu', not"),
        (["model.arch=hstu-ranking", "train.negatives=full"], "ranking models take none of them"),
        (["model.arch=hstu-ranking", "train.label_smoothing=0.1"], "ranking models take none"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as caught:
        apply_overrides(Config(), overrides)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.negatives=in_batch"], "train.negatives = 'in_batch' runs in one process"),
        (["model.drop_path=0.1"], "model.drop_path runs in one process"),
    ],
)
def test_torchrun_refuses_what_depends_on_a_rank_share(overrides: list[str], fragment: str) -> None:
    cfg = apply_overrides(Config(), overrides)
    check_parallel(cfg, 1)  # one process is fine
    with pytest.raises(ParallelSetupError, match=fragment):
        check_parallel(cfg, 2)
    check_parallel(apply_overrides(Config(), ["train.negatives=full"]), 2)  # full is not refused


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in RunDir(run).read_metrics() if r["kind"] == "train"]


@pytest.mark.parametrize(
    "options",
    [
        ["train.negatives=in_batch", "train.label_smoothing=0.1", "model.drop_path=0.3"],
        ["train.negatives=full", "train.recompute=selective", "model.drop_path=0.3"],
    ],
)
def test_a_short_run_with_the_knobs_on(options: list[str], tiny_home: Path, tmp_path: Path) -> None:
    base = ["train.max_epochs=1", "train.log_every=1"]
    fit(tiny_config(tiny_home, *base), tmp_path / "plain", console=Console(quiet=True))
    cfg = tiny_config(tiny_home, *base, *options)
    result = fit(cfg, tmp_path / "knobs", console=Console(quiet=True))
    plain, knobs = train_losses(tmp_path / "plain"), train_losses(tmp_path / "knobs")
    assert len(knobs) == len(plain) and all(math.isfinite(v) for v in knobs)
    assert knobs != plain  # the knobs reached the step
    assert math.isfinite(result.test["ndcg@10"])
    written = (tmp_path / "knobs" / "config.toml").read_text()
    assert "drop_path = 0.3" in written and "negatives = " in written
