"""Load a run directory's config, dataset and weights for the eval/export/recommend commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from torch import nn

from flexgr.data import InteractionData
from flexgr.train.config import Config
from flexgr.train.rundir import RunDir, RunDirError


class Weights(str, Enum):
    model = "model"  # the exported model.safetensors (the selected epoch)
    best = "best"  # checkpoints/best.pt
    last = "last"  # checkpoints/last.pt (the latest training state)


def open_run(path: Path) -> tuple[RunDir, Config]:
    run = RunDir(path)
    if not path.is_dir():
        raise RunDirError(f"no run directory at {path}")
    return run, run.read_config()


def load_weights(run: RunDir, cfg: Config, data: InteractionData, weights: Weights) -> nn.Module:
    """The run's model with the chosen weights, on the CPU, in eval mode."""
    from flexgr.export import load_model
    from flexgr.train.checkpoint import load_checkpoint
    from flexgr.train.config import item_pool
    from flexgr.train.setup import new_model

    if weights is Weights.model:
        if not run.model.with_suffix(".safetensors").is_file():
            raise RunDirError(
                f"{run.root} has no exported model yet (model.safetensors); "
                "use --weights best or --weights last"
            )
        model, _ = load_model(run.model)
        return model
    path = run.best_checkpoint if weights is Weights.best else run.last_checkpoint
    if not path.is_file():
        raise RunDirError(f"{run.root} has no {path.relative_to(run.root)}")
    model = new_model(cfg, data.pool_size(item_pool(cfg)))
    model.load_state_dict(load_checkpoint(path)["model"])
    return model.eval()
