"""The registry entry ``model.arch = "gesr-ranking"``, a ranking model (``task="ranking"``)
trained by the ranking trainer; flexgr.model.registry imports this module to register it."""

from __future__ import annotations

from flexgr.gesr.model import GESRRanker, GESRRankingConfig, prepare, validate
from flexgr.model.registry import register_model
from flexgr.model.spec import ModelSpec
from flexgr.ranking.spec import RANKING_DERIVED

GESR_RANKING = register_model(
    ModelSpec(
        name="gesr-ranking",
        model_cls=GESRRanker,
        config_cls=GESRRankingConfig,
        prepare=prepare,  # type: ignore[arg-type]
        validate=validate,
        derived_fields=RANKING_DERIVED,
        task="ranking",
    )
)
