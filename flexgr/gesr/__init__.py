"""GESR (Hong et al. 2025): mixture-of-attention features beside a two-tower early-stage ranker.

docs/gesr.md says what is built and what is not yet."""

from flexgr.gesr.cross import (
    CrossAttention,
    CrossAttentionConfig,
    CrossPairs,
    cross_pairs,
    jagged_cross_attention,
)
from flexgr.gesr.matching import (
    HardMatchConfig,
    HardMatchEmbedding,
    bucketise,
    hard_match_features,
    match_counts,
    recency_weights,
)
from flexgr.gesr.mlpg import MLPG, MLPGConfig

__all__ = [
    "MLPG",
    "CrossAttention",
    "CrossAttentionConfig",
    "CrossPairs",
    "HardMatchConfig",
    "HardMatchEmbedding",
    "MLPGConfig",
    "bucketise",
    "cross_pairs",
    "hard_match_features",
    "jagged_cross_attention",
    "match_counts",
    "recency_weights",
]
