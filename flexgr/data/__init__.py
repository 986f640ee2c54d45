"""Data pipeline: read interaction files into typed columns."""

from flexgr.data.errors import DataError
from flexgr.data.events import RawEvents
from flexgr.data.readers import FORMATS, read_events

__all__ = ["FORMATS", "DataError", "RawEvents", "read_events"]
