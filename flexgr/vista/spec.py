"""The registry entry ``model.arch = "vista-ranking"``, a ranking model (``task="ranking"``)
trained by the ranking trainer; flexgr.model.registry imports this module to register it."""

from __future__ import annotations

from flexgr.model.registry import register_model
from flexgr.model.spec import ModelSpec
from flexgr.ranking.spec import RANKING_DERIVED
from flexgr.vista.model import VistaRanker, VistaRankingConfig, prepare, validate

VISTA_RANKING = register_model(
    ModelSpec(
        name="vista-ranking",
        model_cls=VistaRanker,
        config_cls=VistaRankingConfig,
        prepare=prepare,  # type: ignore[arg-type]
        validate=validate,
        derived_fields=RANKING_DERIVED,
        task="ranking",
    )
)
