"""Versioned late materialization: histories stored once, examples as versioned pointers.

The immutable history tier (partitioned Parquet, written by atomic compactions) holds every
user's events once; each training example records only ``{user, request_ts, history bounds,
history_len, checksum}`` plus its recent-buffer snapshot and candidates. The loader rebuilds
the exact history each request saw, verifies it, and emits a jagged batch. See
docs/late-materialization.md.

Typical use::

    from flexgr.vlm import (EventLog, ExampleLog, Loader, LoaderConfig, Reconstructor, Tier,
                            build_tier, examples_from_log, example_files, read_chunks)
    build_tier("tier", log, watermarks)
    ExampleLog("examples").append(examples_from_log(log, spec, watermarks))
    tier = Tier.open("tier")
    rebuild = Reconstructor(tier, tenant)
    files = example_files("examples")
    chunks = lambda: read_chunks(files, rebuild.example_columns(), tier.stats)
    for batch in Loader(chunks, rebuild, LoaderConfig(batch_size=64)):
        ...
"""

from flexgr.vlm.asof import RequestSpec, plan_requests
from flexgr.vlm.batch import JaggedBatch
from flexgr.vlm.compaction import Compacted, RecentBuffer, build_tier, compact
from flexgr.vlm.convert import examples_from_fat_rows, examples_from_log
from flexgr.vlm.examples import ExampleLog, ExampleRows, example_files, follow, read_chunks
from flexgr.vlm.fatrow import FatRowSlicer, fat_rows_from_log
from flexgr.vlm.files import ReadStats
from flexgr.vlm.loader import Loader, LoaderConfig, Shard
from flexgr.vlm.reconstruct import Reconstructor
from flexgr.vlm.schema import EventLog, Tenant
from flexgr.vlm.synthetic import TENANTS, SyntheticSpec, synthetic_log
from flexgr.vlm.tier import Tier

__all__ = [
    "TENANTS",
    "Compacted",
    "EventLog",
    "ExampleLog",
    "ExampleRows",
    "FatRowSlicer",
    "JaggedBatch",
    "Loader",
    "LoaderConfig",
    "ReadStats",
    "RecentBuffer",
    "Reconstructor",
    "RequestSpec",
    "Shard",
    "SyntheticSpec",
    "Tenant",
    "Tier",
    "build_tier",
    "compact",
    "example_files",
    "examples_from_fat_rows",
    "examples_from_log",
    "fat_rows_from_log",
    "follow",
    "plan_requests",
    "read_chunks",
    "synthetic_log",
]
