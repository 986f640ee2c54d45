"""Sequential recommendation models on jagged batches, and the contract they share.

Each model lives in its own package (architecture, per-batch inputs, spec, parallelism) and is
registered by name in :mod:`flexgr.model.registry`. Run one on a batch with ``encode``::

    from flexgr.batch import JaggedBatch
    from flexgr.model import HSTU, HSTUConfig, encode
    states = encode(model, JaggedBatch(item_ids, offsets, timestamps, query_time))
"""

from flexgr.model.hstu import HSTU, HSTUConfig, HSTUInputs, HSTULayer, RelativePositionTimeBias
from flexgr.model.registry import MODELS, get_spec, register_model, spec_of
from flexgr.model.sasrec import SASRec, SASRecConfig, SASRecInputs
from flexgr.model.spec import Capabilities, ModelSpec, SequenceModel, ShardedInputs, encode

__all__ = [
    "HSTU",
    "MODELS",
    "Capabilities",
    "HSTUConfig",
    "HSTUInputs",
    "HSTULayer",
    "ModelSpec",
    "RelativePositionTimeBias",
    "SASRec",
    "SASRecConfig",
    "SASRecInputs",
    "SequenceModel",
    "ShardedInputs",
    "encode",
    "get_spec",
    "register_model",
    "spec_of",
]
