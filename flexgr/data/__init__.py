"""Data pipeline: read interaction files, prepare indexed datasets, load them, split them.

Typical use::

    from flexgr.data import load_prepared, make_split, prepare
    data = load_prepared(prepare("ml-1m"))
    split = make_split(data, "loo-val")
"""

from flexgr.data.dataset import InteractionData
from flexgr.data.errors import DataError, FetchError
from flexgr.data.events import RawEvents
from flexgr.data.fetch import BUILTINS
from flexgr.data.indexing import build_interactions
from flexgr.data.meta import DatasetMeta
from flexgr.data.prepare import data_home, dataset_dir, load_prepared, prepare, read_meta
from flexgr.data.readers import FORMATS, read_events
from flexgr.data.splits import PROTOCOLS, Split, history_for, make_split, target_for
from flexgr.data.synthetic import GENERATORS, SyntheticParams, generate, synthetic_params
from flexgr.data.synthetic_ratings import RatingParams

__all__ = [
    "BUILTINS",
    "FORMATS",
    "GENERATORS",
    "PROTOCOLS",
    "DataError",
    "DatasetMeta",
    "FetchError",
    "InteractionData",
    "RatingParams",
    "RawEvents",
    "Split",
    "SyntheticParams",
    "build_interactions",
    "data_home",
    "dataset_dir",
    "generate",
    "history_for",
    "load_prepared",
    "make_split",
    "prepare",
    "read_events",
    "read_meta",
    "synthetic_params",
    "target_for",
]
