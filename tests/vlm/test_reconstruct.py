"""Reconstructed histories equal the fat-row snapshot, example for example."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgr.vlm import (
    EventLog,
    ExampleLog,
    LoaderConfig,
    ReadStats,
    RecentBuffer,
    RequestSpec,
    Tenant,
    Tier,
    compact,
    example_files,
    examples_from_fat_rows,
    examples_from_log,
    plan_requests,
)
from flexgr.vlm.hashing import history_checksum
from tests.vlm.helpers import (
    ALL_GROUPS,
    assert_same_examples,
    build_stores,
    by_request,
    fat_loader,
    random_log,
    vlm_loader,
    watermarks_for,
)

TENANTS = (
    Tenant("one", 1),
    Tenant("seven", 7, ("actions",)),
    Tenant("checkpoint", 256, ALL_GROUPS),
    Tenant("between", 300, ("side",)),
    Tenant("everything", 10**6, ALL_GROUPS),
)


def _check_equal_to_fat_rows(root: Path, seed: int, spec: RequestSpec, compactions: int) -> None:
    table = random_log(seed, max_events=80, long_user=700 if seed % 2 else 0)
    stores = build_stores(root, table, spec, watermarks_for(table, compactions, seed))
    examples = pq.read_table(example_files(stores.example_dir))
    assert examples.num_rows > 0
    # Fat rows carry the checksum the pointer records: 100% of examples.
    fat = pq.read_table(example_files(stores.fat_dir))
    for row in range(fat.num_rows):
        ts = np.array(fat.column("hist_ts")[row].as_py(), dtype=np.int64)
        items = np.array(fat.column("hist_item")[row].as_py(), dtype=np.int64)
        full, tails = history_checksum(ts, items)
        assert full == examples.column("checksum")[row].as_py()
        assert tails == examples.column("tail_checksums")[row].as_py()
    for tenant in TENANTS:
        assert_same_examples(
            by_request(vlm_loader(stores, tenant)), by_request(fat_loader(stores, tenant))
        )


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    group_by=st.sampled_from(["timestamp", "session", "count"]),
    log_max_len=st.sampled_from([5, 40, 100_000]),
    compactions=st.integers(1, 4),
)
def test_reconstruction_equals_fat_rows(
    seed: int, group_by: str, log_max_len: int, compactions: int
) -> None:
    spec = RequestSpec(
        group_by=group_by,  # type: ignore[arg-type]
        session_gap=3,
        count=3,
        start_ts=1_150,
        log_max_len=log_max_len,
    )
    with tempfile.TemporaryDirectory() as directory:
        _check_equal_to_fat_rows(Path(directory), seed, spec, compactions)


def test_late_events_between_compactions_are_invisible_until_they_arrive(tmp_path: Path) -> None:
    # Event b (ts 5) arrives at 50, after the request at 20 and after compaction 1 (at 10);
    # compaction 2 (at 60) puts it into the tier inside the request's history range.
    rows = {
        "user": [1, 1, 1, 1, 1],
        "item": [10, 11, 12, 13, 14],
        "timestamp": [1, 5, 8, 20, 70],
        "arrival_ts": [1, 50, 8, 20, 70],
    }
    import pyarrow as pa

    spec = RequestSpec(start_ts=20)
    stores = build_stores(tmp_path, pa.table(rows), spec, [10, 60])
    got = by_request(vlm_loader(stores, Tenant("all", 100)))
    assert got[0]["item_ids"].tolist() == [10, 12]  # request at 20: b not yet arrived
    assert got[1]["item_ids"].tolist() == [10, 11, 12, 13]  # request at 70: b is history
    assert_same_examples(got, by_request(fat_loader(stores, Tenant("all", 100))))


def test_fat_row_converter_gives_the_same_histories(tmp_path: Path) -> None:
    table = random_log(3, long_user=600)
    spec = RequestSpec(start_ts=1_100, log_max_len=400)
    stores = build_stores(tmp_path, table, spec, watermarks_for(table, 3, 3))
    fat = pq.read_table(example_files(stores.fat_dir))
    converted = examples_from_fat_rows(fat, Tier.open(stores.tier_dir))
    ExampleLog(tmp_path / "converted").append(converted)
    for tenant in TENANTS:
        got = by_request(vlm_loader(stores, tenant, directory=tmp_path / "converted"))
        assert_same_examples(got, by_request(fat_loader(stores, tenant)))


def test_recent_snapshots_are_what_the_buffer_served(tmp_path: Path) -> None:
    """Replay the log through the online path (buffer + compactions) in time order; at each
    request, the buffer's snapshot is exactly the example's recent events."""
    table = random_log(5)
    log = EventLog.from_table(table)
    spec = RequestSpec(start_ts=1_150)
    marks = watermarks_for(table, 4, 5)
    examples = examples_from_log(log, spec, marks)
    by_arrival = log.take(np.argsort(log.arrivals, kind="stable"))
    buffer, fed, pending = RecentBuffer(log.side_dtypes), 0, list(marks)
    compared = 0

    def feed(until: int) -> int:
        stop = int(np.searchsorted(by_arrival.arrivals, until, side="left"))
        buffer.append(by_arrival.take(np.arange(fed, max(fed, stop))))
        return max(fed, stop)

    for row in range(examples.num_rows):
        request = examples.column("request_ts")[row].as_py()
        while pending and pending[0] <= request:
            fed = feed(pending[0])
            compact(tmp_path / "tier", buffer.drain(pending[0]), pending.pop(0), num_buckets=2)
        fed = feed(request)
        snapshot = buffer.snapshot(examples.column("user")[row].as_py(), request)
        cut = len(snapshot) - len(examples.column("recent_ts")[row])  # log_max_len truncation
        assert snapshot.timestamps[cut:].tolist() == examples.column("recent_ts")[row].as_py()
        assert snapshot.items[cut:].tolist() == examples.column("recent_item")[row].as_py()
        compared += len(snapshot) - cut
    assert compared > 50 and len(pending) < len(marks)  # snapshots non-empty, compactions ran


def test_short_tenants_read_only_their_tail(tmp_path: Path) -> None:
    table = random_log(11, users=1, max_events=0, long_user=3000, late=0.0, span=100_000)
    spec = RequestSpec(start_ts=90_000)
    stores = build_stores(tmp_path, table, spec, [50_000], stripe_rows=64)
    read = {}
    for tenant in (Tenant("short", 256), Tenant("full", 10**6)):
        stats = ReadStats()
        got = by_request(vlm_loader(stores, tenant, LoaderConfig(batch_size=4), stats=stats))
        assert_same_examples(got, by_request(fat_loader(stores, tenant)))
        read[tenant.name] = stats.bytes_read
    assert read["short"] * 4 < read["full"]


def test_plan_requests_groups_by_session_and_count() -> None:
    import pyarrow as pa

    log = EventLog.from_table(
        pa.table({"user": [1] * 6, "item": [1, 2, 3, 4, 5, 6], "timestamp": [0, 1, 2, 10, 11, 30]})
    )
    session = plan_requests(log, RequestSpec(group_by="session", session_gap=5), [])
    assert session.request_ts.tolist() == [0, 10, 30]
    assert np.diff(session.cand_offsets).tolist() == [3, 2, 1]
    assert np.diff(session.hist_offsets).tolist() == [0, 3, 5]
    count = plan_requests(log, RequestSpec(group_by="count", count=4), [])
    assert count.request_ts.tolist() == [0, 11]
    assert np.diff(count.hist_offsets).tolist() == [0, 4]
