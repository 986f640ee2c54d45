"""GESR (Hong et al. 2025): mixture-of-attention features beside a two-tower early-stage ranker.

docs/gesr.md says what is built and what is not yet; ``model.arch = "gesr-ranking"`` is the
ranking model (:mod:`flexgr.gesr.model`)."""

# flexgr.model first: its registry imports flexgr.gesr.spec, which needs the model modules.
import flexgr.model  # noqa: F401  isort: skip
from flexgr.gesr.cross import CrossAttention, CrossAttentionConfig, jagged_cross_attention
from flexgr.gesr.cross_layout import CrossPairs, cross_pairs
from flexgr.gesr.falcon import GESRHistoryCache, ItemSide, item_side
from flexgr.gesr.matching import (
    HardMatchConfig,
    HardMatchEmbedding,
    bucketise,
    hard_match_features,
    match_counts,
    recency_weights,
)
from flexgr.gesr.mlpg import MLPG, MLPGConfig
from flexgr.gesr.model import GESRInputs, GESRRanker, GESRRankingConfig
from flexgr.gesr.quantise import FP8Linear, quantise_linears

__all__ = [
    "MLPG",
    "CrossAttention",
    "CrossAttentionConfig",
    "CrossPairs",
    "FP8Linear",
    "GESRHistoryCache",
    "GESRInputs",
    "GESRRanker",
    "GESRRankingConfig",
    "HardMatchConfig",
    "HardMatchEmbedding",
    "ItemSide",
    "MLPGConfig",
    "bucketise",
    "cross_pairs",
    "hard_match_features",
    "item_side",
    "jagged_cross_attention",
    "match_counts",
    "quantise_linears",
    "recency_weights",
]
