"""train.cuda_graphs on a GPU: replayed steps train as the eager steps do.

Skipped without CUDA (CI has none); run on a GPU machine with
``python -m pytest -q tests/train/test_graphs_cuda.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from flexgr.train.loop import Trainer
from flexgr.train.rundir import RunDir
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Deterministic steps: no dropout, the full softmax (no draws), fp32.
SETTINGS = (
    "train.device=cuda",
    "train.precision=fp32",
    "model.dropout=0.0",
    "model.input_dropout=0.0",
    "train.negatives=full",
    "train.graph_bucket=16",
    "train.grad_clip=1.0",
)


def trainer_for(home: Path, run: Path, *overrides: str) -> Trainer:
    cfg = tiny_config(home, *SETTINGS, *overrides)
    run_dir = RunDir(run)
    run_dir.create(cfg)
    return Trainer(cfg, run_dir, Console(quiet=True), show_progress=False, callbacks=())


def losses_of(trainer: Trainer, epochs: int) -> list[float]:
    losses = []
    for epoch in range(1, epochs + 1):
        trainer.batches.set_epoch(epoch)
        for cpu_batch in trainer.loader:
            graphed = trainer.graphs is not None
            batch = cpu_batch if graphed else cpu_batch.to(trainer.device)
            losses.append(float(trainer.train_step(batch)))
            trainer.state.step += 1
    return losses


def test_replayed_steps_train_as_eager_steps(tiny_home: Path, tmp_path: Path) -> None:
    eager = trainer_for(tiny_home, tmp_path / "eager")
    graphed = trainer_for(tiny_home, tmp_path / "graphed", "train.cuda_graphs=true")
    graphed.model.load_state_dict(eager.model.state_dict())
    assert graphed.graphs is not None and eager.graphs is None
    expected, got = losses_of(eager, 4), losses_of(graphed, 4)
    graphs = graphed.graphs
    assert not graphs.failed and graphs.captures >= 2 and graphs.replays >= len(got) // 2
    assert got == pytest.approx(expected, rel=2e-4, abs=1e-5)
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name
    assert all(torch.isfinite(torch.tensor(got)))


def test_bf16_dropout_run_replays_and_learns(tiny_home: Path, tmp_path: Path) -> None:
    cfg = (
        "train.precision=bf16",
        "model.dropout=0.2",
        "train.negatives=uniform",
        "train.lr=1e-2",
    )
    graphed = trainer_for(tiny_home, tmp_path / "graphed", "train.cuda_graphs=true", *cfg)
    losses = losses_of(graphed, 8)
    assert graphed.graphs is not None and not graphed.graphs.failed
    assert graphed.graphs.replays > len(losses) // 2
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.8 * first, (first, last)
