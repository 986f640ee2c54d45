"""Data pipeline: read interaction files, prepare indexed datasets, and load them.

Typical use::

    from flexgr.data import load_prepared, prepare
    data = load_prepared(prepare("ml-1m"))
"""

from flexgr.data.dataset import InteractionData
from flexgr.data.errors import DataError, FetchError
from flexgr.data.events import RawEvents
from flexgr.data.fetch import BUILTINS
from flexgr.data.indexing import build_interactions
from flexgr.data.meta import DatasetMeta
from flexgr.data.prepare import data_home, dataset_dir, load_prepared, prepare, read_meta
from flexgr.data.readers import FORMATS, read_events

__all__ = [
    "BUILTINS",
    "FORMATS",
    "DataError",
    "DatasetMeta",
    "FetchError",
    "InteractionData",
    "RawEvents",
    "build_interactions",
    "data_home",
    "dataset_dir",
    "load_prepared",
    "prepare",
    "read_events",
    "read_meta",
]
