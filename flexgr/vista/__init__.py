"""VISTA (Chen et al. 2025): history summarisation by learned seeds, quasi-linear attention and
a summary cache; ``model.arch = "vista-ranking"`` is the ranking model (:mod:`flexgr.vista.model`).

docs/vista.md says what is built and what is not yet."""

# flexgr.model first: its registry imports flexgr.vista.spec, which needs the model modules.
import flexgr.model  # noqa: F401  isort: skip
from flexgr.vista.cache import (
    DirectorySummaryStore,
    QuantisedSummary,
    SummaryStore,
    dequantise,
    export_summaries,
    latest_version,
    predict_cached,
    quantise,
)
from flexgr.vista.model import VistaInputs, VistaRanker, VistaRankingConfig
from flexgr.vista.qla import qla
from flexgr.vista.reconstruction import ReconstructionConfig, ReconstructionDecoder
from flexgr.vista.summariser import SeedSummariser, SummariserConfig, prepare_summary

__all__ = [
    "DirectorySummaryStore",
    "QuantisedSummary",
    "ReconstructionConfig",
    "ReconstructionDecoder",
    "SeedSummariser",
    "SummariserConfig",
    "SummaryStore",
    "VistaInputs",
    "VistaRanker",
    "VistaRankingConfig",
    "dequantise",
    "export_summaries",
    "latest_version",
    "predict_cached",
    "prepare_summary",
    "qla",
    "quantise",
]
