"""SASRec: the architecture (:mod:`.model`), its inputs (:mod:`.inputs`), its spec."""

from flexgr.model.sasrec.inputs import SASRecInputs, prepare
from flexgr.model.sasrec.model import ReferenceSASRecLayer, SASRec, SASRecConfig, SASRecLayer

__all__ = ["ReferenceSASRecLayer", "SASRec", "SASRecConfig", "SASRecInputs", "SASRecLayer", "prepare"]
