"""A NaN or infinite training loss stops the run, found without a per-step host sync: at the
next training record or before the next evaluation / checkpoint, whichever comes first."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

import flexgr.train.loop as loop_module
from flexgr.train import NonFiniteLoss, RunDir, fit
from flexgr.train.checkpoint import load_checkpoint
from tests.conftest import tiny_config


def poison_loss(monkeypatch: pytest.MonkeyPatch, at_step: int, factor: float) -> None:
    """Multiply the loss of step ``at_step`` (1-based) by ``factor`` (nan or inf)."""
    real_factory = loop_module.training_loss
    calls = 0

    def factory(recipe):  # noqa: ANN001, ANN202 - flexgr.train.loss.training_loss's argument
        real = real_factory(recipe)

        def loss(*args, **kwargs):  # noqa: ANN002, ANN003 - the loss's arguments
            nonlocal calls
            calls += 1
            value = real(*args, **kwargs)
            return value * factor if calls == at_step else value

        return loss

    monkeypatch.setattr(loop_module, "training_loss", factory)


def last_checkpoint_step(run: Path) -> int:
    return load_checkpoint(RunDir(run).last_checkpoint)["state"]["step"]


# The tiny config trains 6 steps per epoch.
@pytest.mark.parametrize("factor", [float("nan"), float("inf")])
def test_a_nonfinite_loss_stops_the_run_at_the_next_record(
    tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factor: float
) -> None:
    poison_loss(monkeypatch, at_step=3, factor=factor)
    cfg = tiny_config(tiny_home, "train.log_every=4")
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"steps 1-4 \(epoch 1\) is (nan|inf)"):
        fit(cfg, run, console=Console(quiet=True))
    records = RunDir(run).read_metrics()
    assert [r["kind"] for r in records] == ["setup"]  # no train record, no evaluation
    assert last_checkpoint_step(run) == 0
    assert not (run / "model.safetensors").exists()


def test_a_nonfinite_loss_between_records_stops_before_the_evaluation(
    tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_loss(monkeypatch, at_step=8, factor=float("nan"))
    cfg = tiny_config(tiny_home, "train.log_every=100")  # no record within the run
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"steps 1-12 \(epoch 2\) is nan"):
        fit(cfg, run, console=Console(quiet=True))
    evals = [r for r in RunDir(run).read_metrics() if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1]  # epoch 2's evaluation never ran
    assert last_checkpoint_step(run) == 6


def test_a_nonfinite_loss_is_not_checkpointed_mid_epoch(
    tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_loss(monkeypatch, at_step=2, factor=float("nan"))
    cfg = tiny_config(tiny_home, "train.log_every=100", "train.checkpoint_every=3")
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"steps 1-3 \(epoch 1\)"):
        fit(cfg, run, console=Console(quiet=True))
    assert last_checkpoint_step(run) == 0
