"""train.init_from / train.init_module: GESR started from a trained two-tower run, and every
refusal a clear ConfigError that leaves the run directory reusable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from flexgr.data import prepare
from flexgr.export import load_model
from flexgr.ranking.train import RankingTrainer
from flexgr.train import apply_overrides, fit, load_preset
from flexgr.train.config import ConfigError
from flexgr.train.rundir import RunDir
from tests.ranking.test_synthetic_presets import TINY, TINY_DATA, TINY_MODEL

# The synthetic presets' tiny sizes (tests/ranking/test_synthetic_presets.py): GESR's towers
# and the two-tower model then have the same shapes.
TWO_TOWER, GESR = TINY + TINY_MODEL["two-tower"], TINY + TINY_MODEL["gesr"]


def _prepared(root: Path, seed: int) -> Path:
    home = root / f"data-{seed}"
    prepare("synthetic-ranking", synthetic={**TINY_DATA, "seed": seed}, data_dir=home,
            progress=False)  # fmt: skip
    return home


@pytest.fixture(scope="module")
def two_tower_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data home, a finished two-tower run on it)."""
    root = tmp_path_factory.mktemp("warm")
    home = _prepared(root, seed=0)
    cfg = apply_overrides(
        load_preset("synthetic-ranking-two-tower"), [f"data.data_dir={home}", *TWO_TOWER]
    )
    fit(cfg, root / "two-tower", console=Console(quiet=True), show_progress=False)
    return home, root / "two-tower"


def _gesr(home: Path, *extra: str):
    over = [f"data.data_dir={home}", *GESR, *extra]
    return apply_overrides(load_preset("synthetic-ranking-gesr"), over)


def test_gesr_starts_from_the_two_tower_runs_weights(two_tower_run, tmp_path: Path) -> None:
    home, source = two_tower_run
    cfg = _gesr(home, f"train.init_from={source}", "train.init_module=towers")
    run = RunDir(tmp_path / "gesr")
    run.create(cfg)
    trainer = RankingTrainer(cfg, run, Console(quiet=True), show_progress=False, callbacks=())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    warm = trainer.warm_start()
    exported, _ = load_model(source)
    towers = trainer.model.towers.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(towers[name], tensor), name
    assert any(not torch.equal(before[f"towers.{n}"], t) for n, t in exported.state_dict().items())
    # The experts and the gating keep their initialisation.
    after = trainer.model.state_dict()
    rest = [k for k in after if not k.startswith("towers.")]
    assert rest and all(torch.equal(after[k], before[k]) for k in rest)
    assert warm.loaded == len(towers) and warm.kept == len(rest)


def test_a_warm_started_run_trains_and_records_it(two_tower_run, tmp_path: Path) -> None:
    home, source = two_tower_run
    cfg = _gesr(home, f"train.init_from={source}", "train.init_module=towers")
    result = fit(cfg, tmp_path / "gesr", console=Console(quiet=True), show_progress=False)
    assert result.steps > 0
    records = RunDir(tmp_path / "gesr").read_metrics()
    kinds = [r["kind"] for r in records]
    assert kinds[:2] == ["setup", "warm_start"]
    assert records[1]["module"] == "towers" and records[1]["arch"] == "two-tower-ranking"
    assert records[1]["source"] == str(source.resolve()) and len(records[1]["weights_sha256"]) == 64


def test_the_warm_start_leaves_the_runs_random_draws_as_a_cold_starts(
    two_tower_run, tmp_path: Path
) -> None:
    """Building the source model draws initial weights; under a forked RNG it changes nothing
    after it (dropout, sampling: a warm run draws what the cold run of its seed draws)."""
    home, source = two_tower_run
    draws = []
    for name, extra in (("cold", []), ("warm", [f"train.init_from={source}"])):
        cfg = _gesr(home, *extra, *(["train.init_module=towers"] if extra else []))
        run = RunDir(tmp_path / name)
        run.create(cfg)
        trainer = RankingTrainer(cfg, run, Console(quiet=True), show_progress=False, callbacks=())
        if extra:
            trainer.warm_start()
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


def test_a_source_with_other_held_out_events_is_refused(two_tower_run, tmp_path: Path) -> None:
    """Requests of 4 events end where the source's requests of 8 were still training data: the
    source may have trained on this run's validation and test requests."""
    home, source = two_tower_run
    cfg = _gesr(home, f"train.init_from={source}", "train.init_module=towers",
                "ranking.request_size=4")  # fmt: skip
    with pytest.raises(ConfigError, match="trained with request_size = 8, this run has 4"):
        fit(cfg, tmp_path / "run", console=Console(quiet=True), show_progress=False)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["train.init_module=experts_that_do_not_exist"], "train.init_module: this run's model"),
        ([], "has no counterpart"),  # the two-tower's names do not fit GESR's top level
    ],
)
def test_a_mismatched_target_is_refused_and_the_directory_reusable(
    two_tower_run, tmp_path: Path, extra: list[str], message: str
) -> None:
    home, source = two_tower_run
    cfg = _gesr(home, f"train.init_from={source}", *extra)
    with pytest.raises(ConfigError, match=message):
        fit(cfg, tmp_path / "run", console=Console(quiet=True), show_progress=False)
    log = tmp_path / "run" / "metrics.jsonl"
    assert not log.exists() or log.stat().st_size == 0  # nothing recorded, nothing trained
    fixed = _gesr(home, f"train.init_from={source}", "train.init_module=towers")
    assert fit(fixed, tmp_path / "run", console=Console(quiet=True), show_progress=False).steps


def test_other_items_are_refused(two_tower_run, tmp_path: Path) -> None:
    _, source = two_tower_run
    other = _prepared(tmp_path, seed=1)  # another item list
    cfg = _gesr(other, f"train.init_from={source}", "train.init_module=towers")
    with pytest.raises(ConfigError, match="trained on other items"):
        fit(cfg, tmp_path / "run", console=Console(quiet=True), show_progress=False)


def test_a_missing_source_and_a_module_alone_are_refused(two_tower_run, tmp_path: Path) -> None:
    home, _ = two_tower_run
    cfg = _gesr(home, f"train.init_from={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="train.init_from: no exported model"):
        fit(cfg, tmp_path / "run", console=Console(quiet=True), show_progress=False)
    with pytest.raises(ConfigError, match="train.init_module needs train.init_from"):
        _gesr(home, "train.init_module=towers")
