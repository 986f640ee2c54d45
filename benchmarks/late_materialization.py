"""Versioned late materialization against fat rows on a synthetic multi-tenant log.

    python benchmarks/late_materialization.py --small      # < 1 min on a 2-core CPU
    python benchmarks/late_materialization.py              # larger: 128 users, 4 days, K=6

Builds, from one seeded log (K requests per user per day, long-tailed histories, late
events): the immutable tier (daily compactions), the versioned examples and the fat-row
baseline. Then, for each tenant (max_len 256 / 4k / 16k), loads every example with the
fat-row loader and with the versioned loader in streaming order and as a shuffled backfill,
with and without prefetch and user affinity. A simulated training step (``--step-ms``, a sleep:
the host is idle while a GPU computes) runs after every batch, so prefetch has something to
overlap with and ``starved_fraction`` (time the step loop waited for data) means something.

Prints one JSON line per configuration (the first describes the dataset and machine).
Byte counts are what the files' readers actually fetched (flexgr.vlm.files.TrackedFile),
including footers and indexes; ``vlm_bytes_written`` includes every tier version compaction
wrote, ``vlm_primary_bytes_written`` only the examples (the paper's "primary" table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from flexgr.vlm import (
    TENANTS,
    EventLog,
    ExampleLog,
    FatRowSlicer,
    JaggedBatch,
    Loader,
    LoaderConfig,
    ReadStats,
    Reconstructor,
    SyntheticSpec,
    Tenant,
    Tier,
    build_tier,
    example_files,
    examples_from_log,
    fat_rows_from_log,
    read_chunks,
    synthetic_log,
)
from flexgr.vlm.fatrow import EXAMPLE_DELTA_COLUMNS, FAT_DELTA_COLUMNS

STATISTICS = ("user", "request_ts")


def digests(batch: JaggedBatch) -> dict[int, bytes]:
    """Per request, a hash of every emitted array (the equality check against fat rows)."""
    out = {}
    for request, fields in batch.sequences().items():
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(fields):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(fields[name]).tobytes())
        out[request] = digest.digest()
    return out


def run(loader: Loader, step_s: float) -> dict[str, object]:
    """One pass: throughput with a simulated step after each batch, digests, future events."""
    seen: dict[int, bytes] = {}
    future = examples = batches = 0
    start = time.perf_counter()
    for batch in loader:
        examples += len(batch)
        batches += 1
        lengths = np.diff(batch.offsets.numpy())
        query = np.repeat(batch.query_time.numpy(), lengths)
        future += int(np.sum(batch.timestamps.numpy() >= query))
        seen.update(digests(batch))
        if step_s:
            time.sleep(step_s)
    wall = time.perf_counter() - start
    return {
        "examples": examples,
        "wall_s": wall,
        "wait_s": loader.wait_s,
        "step_s": batches * step_s,
        "digests": seen,
        "future_events": future,
    }


def write_parts(
    directory: Path, table: pa.Table, delta: tuple[str, ...], rows_per_file: int
) -> int:
    log = ExampleLog(directory, rows_per_group=256)
    for start in range(0, table.num_rows, rows_per_file):
        log.append(table.slice(start, rows_per_file), delta, STATISTICS)
    log.close()
    return log.bytes_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a preset that runs in < 1 min")
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--requests-per-day", type=int, default=6)
    parser.add_argument("--history-median", type=float, default=1500.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle-window", type=int, default=2048)
    parser.add_argument("--step-ms", type=float, default=20.0, help="simulated step per batch")
    parser.add_argument("--stripe-rows", type=int, default=512)
    # Small on purpose: the tier of a real log is far larger than a loader's memory, so a
    # cache that held all of --small's tier would hide what affinity saves.
    parser.add_argument("--cache-stripes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept if given")
    args = parser.parse_args()
    if args.small:
        args.users, args.days, args.requests_per_day = 48, 3, 4
        args.batch_size, args.shuffle_window = 32, 256
    spec = SyntheticSpec(
        users=args.users,
        days=args.days,
        requests_per_day=args.requests_per_day,
        history_median=args.history_median,
        seed=args.seed,
    )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    try:
        bench(args, spec, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, spec: SyntheticSpec, work: Path) -> None:
    started = time.perf_counter()
    log = EventLog.from_table(synthetic_log(spec))
    marks = spec.watermarks()
    compactions, _ = build_tier(
        work / "tier", log, marks, stripe_rows=args.stripe_rows, pack_rows=args.stripe_rows
    )
    tier_written = sum(c.bytes_written for c in compactions)
    request_spec = spec.request_spec(log_max_len=max(t.max_len for t in TENANTS))
    examples = examples_from_log(log, request_spec, marks)
    fat = fat_rows_from_log(log, request_spec)
    rows_per_file = 4 * args.batch_size
    primary_written = write_parts(work / "examples", examples, EXAMPLE_DELTA_COLUMNS, rows_per_file)
    fat_written = write_parts(work / "fat", fat, FAT_DELTA_COLUMNS, rows_per_file)
    lengths = examples.column("history_len").to_numpy()
    written = {
        "fat_row_bytes_written": fat_written,
        "vlm_bytes_written": primary_written + tier_written,
        "vlm_primary_bytes_written": primary_written,
        "tier_bytes_written": tier_written,
        "tier_bytes_final": sum(f.bytes + f.index_bytes for f in compactions[-1].manifest.files),
    }
    n = examples.num_rows
    print(json.dumps({
        "config": "dataset",
        "users": spec.users, "days": spec.days, "requests_per_day": spec.requests_per_day,
        "impressions": spec.impressions, "events": len(log), "examples": n,
        "history_len_mean": float(lengths.mean()), "history_len_p99": float(np.quantile(lengths, 0.99)),
        "history_len_max": int(lengths.max()), "compactions": len(marks),
        **written,
        "write_saving_primary": 1 - primary_written / fat_written,
        "write_saving_total": 1 - written["vlm_bytes_written"] / fat_written,
        "build_s": time.perf_counter() - started,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPU cores".strip(),
        "python": platform.python_version(),
        # Other jobs on the machine slow every configuration; this says how busy it was.
        "load_avg_1m": os.getloadavg()[0],
    }), flush=True)  # fmt: skip
    step_s = args.step_ms / 1000
    for tenant in TENANTS:
        reference = None
        for prefetch in (0, 2):
            slicer = FatRowSlicer(tenant, log.side_names)
            files = example_files(work / "fat")
            stats = ReadStats()
            config = LoaderConfig(batch_size=args.batch_size, prefetch=prefetch)
            fat_run = run(
                Loader(_chunks(files, slicer.example_columns(), stats), slicer, config), step_s
            )
            fat_read = stats.bytes_read
            reference = reference or fat_run
            line = _line(args, tenant, "fat_row", config, fat_run, reference, written, n)
            line |= {"fat_row_bytes_read": fat_read, "vlm_bytes_read": None}
            print(json.dumps(line), flush=True)
        for mode, window, affinity, prefetch in (
            ("streaming", 0, False, 0),
            ("streaming", 0, False, 2),
            ("batch", args.shuffle_window, False, 0),
            ("batch", args.shuffle_window, False, 2),
            ("batch", args.shuffle_window, True, 0),
            ("batch", args.shuffle_window, True, 2),
        ):
            config = LoaderConfig(
                batch_size=args.batch_size, shuffle_window=window, affinity=affinity,
                prefetch=prefetch, seed=args.seed,
            )  # fmt: skip
            tier_stats, example_stats = ReadStats(), ReadStats()
            tier = Tier.open(work / "tier", stats=tier_stats, cache_stripes=args.cache_stripes)
            rebuild = Reconstructor(tier, tenant)
            files = example_files(work / "examples")
            loader = Loader(
                _chunks(files, rebuild.example_columns(), example_stats), rebuild, config
            )
            result = run(loader, step_s)
            tier.close()
            vlm_read = tier_stats.bytes_read + example_stats.bytes_read
            line = _line(args, tenant, mode, config, result, reference, written, n)
            line |= {
                "fat_row_bytes_read": fat_read,
                "vlm_bytes_read": vlm_read,
                "vlm_primary_bytes_read": example_stats.bytes_read,
                "tier_bytes_read": tier_stats.bytes_read,
                "fat_row_bytes_read_per_example": fat_read / n,
                "vlm_bytes_read_per_example": vlm_read / n,
                "read_saving": 1 - vlm_read / fat_read,
                "read_saving_primary": 1 - example_stats.bytes_read / fat_read,
            }
            print(json.dumps(line), flush=True)
    total = {"config": "total", "wall_s": time.perf_counter() - started}
    print(json.dumps(total | {"load_avg_1m": os.getloadavg()[0]}), flush=True)


def _chunks(files: list[Path], columns: tuple[str, ...], stats: ReadStats) -> Callable:
    return lambda: read_chunks(files, columns, stats)


def _line(
    args: argparse.Namespace,
    tenant: Tenant,
    mode: str,
    config: LoaderConfig,
    result: dict,
    reference: dict,
    written: dict,
    n: int,
) -> dict:
    got, want = result["digests"], reference["digests"]
    matches = sum(1 for request, digest in want.items() if got.get(request) == digest)
    affinity = "+affinity" if config.affinity else ""
    prefetch = f"+prefetch{config.prefetch}" if config.prefetch else ""
    return {
        "config": f"{tenant.name}/{mode}{affinity}{prefetch}",
        "tenant": tenant.name,
        "max_len": tenant.max_len,
        "feature_groups": list(tenant.feature_groups),
        "mode": mode,
        "prefetch": config.prefetch,
        "affinity": config.affinity,
        "shuffle_window": config.shuffle_window,
        "batch_size": config.batch_size,
        "step_ms": args.step_ms,
        "examples": result["examples"],
        "fat_row_bytes_written": written["fat_row_bytes_written"],
        "vlm_bytes_written": written["vlm_bytes_written"],
        "fat_row_bytes_written_per_example": written["fat_row_bytes_written"] / n,
        "vlm_bytes_written_per_example": written["vlm_bytes_written"] / n,
        "checksum_match_rate": matches / max(1, len(want)),
        "future_events": result["future_events"],
        "examples_per_s": result["examples"] / result["wall_s"],
        "starved_fraction": result["wait_s"] / result["wall_s"],
        # Without prefetch the loader and the step take turns, so the loader's own rate is
        # the wall time less the steps; with prefetch they overlap and it is not separable.
        "loader_examples_per_s": (
            result["examples"] / (result["wall_s"] - result["step_s"])
            if not config.prefetch
            else None
        ),
    }


if __name__ == "__main__":
    main()
