"""Sequential recommendation models on jagged batches."""

from flexgr.model.hstu import HSTU, HSTUConfig, HSTULayer, HSTUTokens, RelativePositionTimeBias
from flexgr.model.sasrec import SASRec, SASRecConfig

__all__ = ["HSTU", "HSTUConfig", "HSTULayer", "HSTUTokens", "RelativePositionTimeBias", "SASRec", "SASRecConfig"]
