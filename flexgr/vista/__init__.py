"""VISTA (Chen et al. 2025): history summarisation by learned seeds and quasi-linear attention.

docs/vista.md says what is built and what is not yet."""

from flexgr.vista.qla import qla
from flexgr.vista.reconstruction import ReconstructionConfig, ReconstructionDecoder
from flexgr.vista.summariser import SeedSummariser, SummariserConfig, prepare_summary

__all__ = [
    "ReconstructionConfig",
    "ReconstructionDecoder",
    "SeedSummariser",
    "SummariserConfig",
    "prepare_summary",
    "qla",
]
