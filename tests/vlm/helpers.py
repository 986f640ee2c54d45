"""Random event logs with ties, late arrivals and long users; stores built from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from flexgr.vlm import (
    EventLog,
    ExampleLog,
    FatRowSlicer,
    JaggedBatch,
    Loader,
    LoaderConfig,
    ReadStats,
    Reconstructor,
    RequestSpec,
    Tenant,
    Tier,
    build_tier,
    example_files,
    examples_from_log,
    fat_rows_from_log,
    read_chunks,
)

ALL_GROUPS = ("actions", "side")
SMALL_BATCHES = LoaderConfig(batch_size=8)


def random_log(
    seed: int,
    users: int = 5,
    max_events: int = 120,
    long_user: int = 0,
    late: float = 0.15,
    span: int = 400,
) -> pa.Table:
    """Timestamps from a small range (many ties); some events arrive up to ``span`` late.

    ``long_user``: events of one extra user, to exercise the tail checksums (256, 512, ...).
    """
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_events + 1, users)
    if long_user:
        counts = np.r_[counts, long_user]
    user = np.repeat(np.arange(len(counts)) * 7 + 3, counts)  # sparse, non-contiguous ids
    n = len(user)
    ts = rng.integers(1_000, 1_000 + span, n)
    arrival = ts + np.where(rng.random(n) < late, rng.integers(1, span, n), 0)
    return pa.table(
        {
            "user": user.astype(np.int64),
            "item": rng.integers(1, 30, n),  # few items: equal (user, ts, item) rows happen
            "timestamp": ts.astype(np.int64),
            "arrival_ts": arrival.astype(np.int64),
            "action": rng.integers(0, 4, n),
            "dwell": rng.random(n).astype(np.float32),
            "surface": rng.integers(0, 3, n).astype(np.int16),
        }
    )


def watermarks_for(table: pa.Table, count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed + 1)
    low = int(np.min(table.column("timestamp").to_numpy())) if table.num_rows else 0
    high = int(np.max(table.column("arrival_ts").to_numpy())) + 1 if table.num_rows else 1
    return sorted({int(w) for w in rng.integers(low, high + 1, count)})


@dataclass
class Stores:
    root: Path
    log: EventLog
    spec: RequestSpec
    watermarks: list[int]

    @property
    def tier_dir(self) -> Path:
        return self.root / "tier"

    @property
    def example_dir(self) -> Path:
        return self.root / "examples"

    @property
    def fat_dir(self) -> Path:
        return self.root / "fat"


def build_stores(
    root: Path,
    table: pa.Table,
    spec: RequestSpec,
    watermarks: Sequence[int],
    stripe_rows: int = 16,
    rows_per_file: int = 50,
) -> Stores:
    """Tier, versioned examples and fat rows of one log (examples split over several files)."""
    log = EventLog.from_table(table)
    build_tier(root / "tier", log, list(watermarks), num_buckets=4, stripe_rows=stripe_rows,
               pack_rows=stripe_rows)  # fmt: skip
    examples = examples_from_log(log, spec, watermarks)
    fat = fat_rows_from_log(log, spec)
    for directory, table_ in ((root / "examples", examples), (root / "fat", fat)):
        writer = ExampleLog(directory, rows_per_group=17)
        for start in range(0, max(table_.num_rows, 1), rows_per_file):
            writer.append(table_.slice(start, rows_per_file))
        writer.close()
    return Stores(root, log, spec, list(watermarks))


def vlm_loader(
    stores: Stores,
    tenant: Tenant,
    config: LoaderConfig = SMALL_BATCHES,
    stats: ReadStats | None = None,
    cache_stripes: int = 0,
    directory: Path | None = None,
) -> Loader:
    tier = Tier.open(stores.tier_dir, stats=stats, cache_stripes=cache_stripes)
    rebuild = Reconstructor(tier, tenant)
    files = example_files(directory or stores.example_dir)
    return Loader(
        lambda: read_chunks(files, rebuild.example_columns(), ReadStats()), rebuild, config
    )


def fat_loader(stores: Stores, tenant: Tenant) -> Loader:
    slicer = FatRowSlicer(tenant, stores.log.side_names)
    files = example_files(stores.fat_dir)
    return Loader(
        lambda: read_chunks(files, slicer.example_columns(), ReadStats()),
        slicer,
        SMALL_BATCHES,
    )


def by_request(batches: Sequence[JaggedBatch] | Loader) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    for batch in batches:
        out.update(batch.sequences())
    return out


def assert_same_examples(
    got: dict[int, dict[str, np.ndarray]], want: dict[int, dict[str, np.ndarray]]
) -> None:
    assert got.keys() == want.keys()
    for request, fields in want.items():
        assert got[request].keys() == fields.keys(), request
        for name, values in fields.items():
            if not np.array_equal(got[request][name], values):  # np.testing is slow here
                raise AssertionError(f"request {request}, {name}: {got[request][name]} != {values}")


def batches_equal(a: JaggedBatch, b: JaggedBatch) -> bool:
    pairs = [
        (getattr(a, name), getattr(b, name))
        for name in a.__dataclass_fields__
        if name not in ("actions", "side")
    ]
    pairs += [(a.side[name], b.side[name]) for name in a.side]
    if (a.actions is None) != (b.actions is None):
        return False
    if a.actions is not None:
        pairs.append((a.actions, b.actions))
    return all(x.shape == y.shape and bool((x == y).all()) for x, y in pairs)
