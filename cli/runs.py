"""Load a run directory's config, dataset and weights for the eval/export/recommend/serve
commands; every one of them takes the same ``--weights model|best|last``."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from flexgr.data import InteractionData
from flexgr.train.config import Config
from flexgr.train.rundir import RunDir, RunDirError

if TYPE_CHECKING:
    from flexgr.export import Recommender

WEIGHTS_HELP = (
    "model: the exported model of the selected epoch (model.safetensors); best: "
    "checkpoints/best.pt (the best validation epoch so far); last: checkpoints/last.pt (the "
    "latest training state). best and last work while a run is still training."
)


class Weights(str, Enum):
    model = "model"  # the exported model.safetensors (the selected epoch)
    best = "best"  # checkpoints/best.pt
    last = "last"  # checkpoints/last.pt (the latest training state)


def open_run(path: Path) -> tuple[RunDir, Config]:
    run = RunDir(path)
    if not path.is_dir():
        raise RunDirError(f"no run directory at {path}")
    return run, run.read_config()


def require_exported(run: RunDir) -> None:
    if not run.model.with_suffix(".safetensors").is_file():
        raise RunDirError(
            f"{run.root} has no exported model yet (model.safetensors is written when training "
            "ends); use --weights best or --weights last"
        )


def load_weights(run: RunDir, cfg: Config, data: InteractionData, weights: Weights) -> nn.Module:
    """The run's model with the chosen weights, on the CPU, in eval mode."""
    from flexgr.export import load_model
    from flexgr.train.checkpoint import load_checkpoint
    from flexgr.train.config import item_pool
    from flexgr.train.setup import new_model

    if weights is Weights.model:
        require_exported(run)
        model, _ = load_model(run.model)
        return model
    path = run.best_checkpoint if weights is Weights.best else run.last_checkpoint
    if not path.is_file():
        raise RunDirError(f"{run.root} has no {path.relative_to(run.root)}")
    if cfg.is_ranking:
        from flexgr.ranking.setup import new_ranking_model

        model = new_ranking_model(cfg, data)
    else:
        model = new_model(cfg, data.pool_size(item_pool(cfg)))
    try:
        state = load_checkpoint(path)
    except (OSError, RuntimeError) as err:  # torch reports a torn zip as RuntimeError
        raise RunDirError(f"{path}: not a readable checkpoint ({_first_line(err)})") from None
    model.load_state_dict(state["model"])
    return model.eval()


def load_recommender(
    run: RunDir, cfg: Config, weights: Weights, data: InteractionData | None = None
) -> Recommender:
    """A :class:`Recommender` over the run's model with the chosen weights. ``model`` needs no
    dataset (the export holds the id map); ``best``/``last`` take the id map from ``data`` (the
    run's dataset, loaded if not given)."""
    from flexgr.export import Recommender, load
    from flexgr.train.config import item_pool
    from flexgr.train.setup import load_dataset

    if weights is Weights.model:
        require_exported(run)
        return load(run.model)  # a Ranker for ranking models
    data = data if data is not None else load_dataset(cfg)
    model = load_weights(run, cfg, data, weights)
    description = {
        "arch": cfg.model.arch,
        "config": dataclasses.asdict(model.cfg),
        "metadata": {"dataset": data.name, "protocol": cfg.data.protocol, "weights": weights.value},
    }
    if cfg.is_ranking:
        from flexgr.ranking.scorer import Ranker

        return Ranker(model, data.item_ids, description)  # type: ignore[return-value]
    return Recommender(model, data.pool_item_ids(item_pool(cfg)), description)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
