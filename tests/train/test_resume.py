"""A run killed after a checkpoint and resumed ends exactly like a run that was never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from safetensors.torch import load_file

from flexgr.train import Callback, RunDir, TrainState, fit
from flexgr.train.loop import TIMING_KEYS
from tests.conftest import tiny_config


class Killed(RuntimeError):
    pass


class KillAfterCheckpoint(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, state: TrainState) -> None:
        if state.step == self.step:
            raise Killed(f"simulated kill after the checkpoint at step {state.step}")


def quiet() -> Console:
    return Console(quiet=True)


def records(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in RunDir(run_dir).read_metrics()
    ]


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert [r for r in ra if r["kind"] == "eval"] == [r for r in rb if r["kind"] == "eval"]
    assert ra == rb
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)


# 48 tiny users -> 46 with two training events -> 6 batches of 8 per epoch.
@pytest.mark.parametrize(
    "overrides, kill_step",
    [
        ([], 0),  # killed right after the checkpoint written before the first step
        ([], 6),  # killed right after the end-of-epoch-1 checkpoint
        (["train.checkpoint_every=4"], 4),  # killed mid-epoch 1
        (["train.checkpoint_every=5"], 10),  # mid-epoch 2, between two training records
    ],
)
def test_resumed_run_ends_with_the_same_metrics(
    tiny_home: Path, tmp_path: Path, overrides: list[str], kill_step: int
) -> None:
    cfg = tiny_config(tiny_home, *overrides)
    fit(cfg, tmp_path / "whole", console=quiet())
    with pytest.raises(Killed):
        fit(cfg, tmp_path / "broken", console=quiet(), callbacks=[KillAfterCheckpoint(kill_step)])
    assert not (tmp_path / "broken" / "model.safetensors").exists()
    result = fit(
        RunDir(tmp_path / "broken").read_config(), tmp_path / "broken", resume=True, console=quiet()
    )
    assert result.steps == 18
    assert_same_run(tmp_path / "whole", tmp_path / "broken")


def test_max_steps_stop_then_resume_continues_the_same_run(tiny_home: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_home)
    fit(cfg, tmp_path / "whole", console=quiet())
    short = tiny_config(tiny_home, "train.max_steps=8")
    stopped = fit(short, tmp_path / "short", console=quiet())
    assert stopped.stop_reason == "max_steps" and stopped.steps == 8
    partial = [r for r in RunDir(tmp_path / "short").read_metrics() if r.get("partial")]
    assert len(partial) == 1 and partial[0]["step"] == 8
    resumed = fit(cfg, tmp_path / "short", resume=True, console=quiet())  # max_steps back to 0
    assert resumed.stop_reason == "max_epochs" and resumed.steps == 18
    assert_same_run(tmp_path / "whole", tmp_path / "short")


def test_resuming_a_finished_run_repeats_nothing(tiny_home: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_home, "train.max_epochs=2")
    first = fit(cfg, tmp_path / "run", console=quiet())
    before = records(tmp_path / "run")
    again = fit(cfg, tmp_path / "run", resume=True, console=quiet())
    assert records(tmp_path / "run") == before
    assert again.test == first.test


def test_resume_needs_a_checkpoint(tiny_home: Path, tmp_path: Path) -> None:
    from flexgr.train import RunDirError

    with pytest.raises(RunDirError, match="no checkpoint"):
        fit(tiny_config(tiny_home), tmp_path / "empty", resume=True, console=quiet())
