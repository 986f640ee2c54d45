"""Build what a run needs from its config: the dataset, the split and a fresh model."""

from __future__ import annotations

from typing import Any

from torch import nn

from flexgr.data import BUILTINS, InteractionData, Split, load_prepared, make_split, prepare
from flexgr.model.registry import build_model
from flexgr.train.config import Config


def load_dataset(cfg: Config, *, prepare_builtin: bool = True) -> InteractionData:
    """The run's dataset. A built-in name is prepared first (a no-op once it is); any other
    name or path must already be prepared (``flexgr data prepare``). Under
    ``data.source = "versioned"`` it is the table the versioned store was built from."""
    if cfg.data.source == "versioned":
        from flexgr.train.versioned_source import evaluation_table

        return evaluation_table(cfg, prepare_missing=prepare_builtin)
    data_dir = cfg.data.data_dir or None
    if prepare_builtin and cfg.data.dataset in BUILTINS:
        return load_prepared(prepare(cfg.data.dataset, data_dir=data_dir))
    return load_prepared(cfg.data.dataset, data_dir=data_dir)


def load_split(cfg: Config, data: InteractionData) -> Split:
    return make_split(data, cfg.data.protocol)


def model_config(cfg: Config, num_items: int) -> dict[str, Any]:
    return {**cfg.model_options(), "num_items": num_items, "max_seq_len": cfg.data.max_seq_len}


def new_model(cfg: Config, num_items: int) -> nn.Module:
    return build_model(cfg.model.arch, model_config(cfg, num_items))
