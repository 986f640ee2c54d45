"""The ranking models' registry entries: ``model.arch = "hstu-ranking"``, ``"sasrec-ranking"``,
``"two-tower-ranking"``. Importing this module registers them (flexgr.model.registry does)."""

from __future__ import annotations

from typing import Any

from flexgr.model.registry import register_model
from flexgr.model.spec import ModelSpec
from flexgr.ranking.baselines import (
    SASRecRanker,
    SASRecRankingConfig,
    TwoTowerConfig,
    TwoTowerRanker,
    prepare_history,
    validate_common,
)
from flexgr.ranking.hstu import HSTURanker, HSTURankingConfig
from flexgr.ranking.hstu import prepare as prepare_hstu_ranking
from flexgr.ranking.hstu import validate as validate_hstu_ranking

# Set from the dataset, data.max_seq_len and [ranking], never by hand in [model].
RANKING_DERIVED = (
    "num_items",
    "max_seq_len",
    "action_inputs",
    "action_vocab",
    "tasks",
    "task_kinds",
)


def _validate_sasrec(options: dict[str, Any]) -> None:
    validate_common(options)
    if options["d_model"] % options["num_heads"]:
        raise ValueError("model.d_model must be divisible by model.num_heads")


HSTU_RANKING = ModelSpec(
    name="hstu-ranking",
    model_cls=HSTURanker,
    config_cls=HSTURankingConfig,
    prepare=prepare_hstu_ranking,  # type: ignore[arg-type]
    validate=validate_hstu_ranking,
    derived_fields=RANKING_DERIVED,
    task="ranking",
)
SASREC_RANKING = ModelSpec(
    name="sasrec-ranking",
    model_cls=SASRecRanker,
    config_cls=SASRecRankingConfig,
    prepare=prepare_history,  # type: ignore[arg-type]
    validate=_validate_sasrec,
    derived_fields=RANKING_DERIVED,
    task="ranking",
)
TWO_TOWER_RANKING = ModelSpec(
    name="two-tower-ranking",
    model_cls=TwoTowerRanker,
    config_cls=TwoTowerConfig,
    prepare=prepare_history,  # type: ignore[arg-type]
    validate=validate_common,
    derived_fields=RANKING_DERIVED,
    task="ranking",
)
SPECS = (HSTU_RANKING, SASREC_RANKING, TWO_TOWER_RANKING)

for _spec in SPECS:
    register_model(_spec)
