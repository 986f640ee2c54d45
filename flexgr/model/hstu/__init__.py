"""HSTU: the architecture (:mod:`.model`), its per-batch inputs (:mod:`.inputs`), context
parallelism (:mod:`.parallelize`) and its registry entry (:mod:`.spec`)."""

from flexgr.model.hstu.inputs import BiasTables, HSTUInputs, LocalAttention, prepare
from flexgr.model.hstu.model import HSTU, HSTUConfig, HSTULayer, RelativePositionTimeBias
from flexgr.model.hstu.parallelize import ContextParallelAttention, prepare_sharded

__all__ = [
    "HSTU",
    "BiasTables",
    "ContextParallelAttention",
    "HSTUConfig",
    "HSTUInputs",
    "HSTULayer",
    "LocalAttention",
    "RelativePositionTimeBias",
    "prepare",
    "prepare_sharded",
]
