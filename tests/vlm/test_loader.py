"""Prefetch, affinity, windows, sharding and streaming change how examples arrive, not what."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flexgr.data.errors import DataError
from flexgr.vlm import (
    ExampleLog,
    Loader,
    LoaderConfig,
    ReadStats,
    Reconstructor,
    RequestSpec,
    Shard,
    Tenant,
    Tier,
    example_files,
    follow,
    read_chunks,
)
from tests.vlm.helpers import (
    ALL_GROUPS,
    Stores,
    assert_same_examples,
    batches_equal,
    build_stores,
    by_request,
    fat_loader,
    random_log,
    vlm_loader,
    watermarks_for,
)

TENANT = Tenant("mid", 100, ALL_GROUPS)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    table = random_log(13, users=8, max_events=70)
    spec = RequestSpec(start_ts=1_150)
    return build_stores(
        tmp_path_factory.mktemp("loader"), table, spec, watermarks_for(table, 3, 13)
    )


@pytest.mark.parametrize(
    "config",
    [
        LoaderConfig(batch_size=7),
        LoaderConfig(batch_size=7, shuffle_window=40, affinity=True, seed=3),
    ],
)
def test_prefetch_gives_the_same_batches_in_the_same_order(
    stores: Stores, config: LoaderConfig
) -> None:
    plain = list(vlm_loader(stores, TENANT, config))
    ahead = list(vlm_loader(stores, TENANT, LoaderConfig(**{**config.__dict__, "prefetch": 2})))
    assert len(plain) == len(ahead) > 3
    assert all(batches_equal(a, b) for a, b in zip(plain, ahead, strict=True))


def test_affinity_gives_the_same_examples_and_reads_less(stores: Stores) -> None:
    plain_stats, grouped_stats = ReadStats(), ReadStats()
    plain = by_request(vlm_loader(stores, TENANT, LoaderConfig(batch_size=8), plain_stats))
    grouped_loader = vlm_loader(
        stores,
        TENANT,
        LoaderConfig(batch_size=8, shuffle_window=64, affinity=True),
        grouped_stats,
        cache_stripes=8,
    )
    batches = list(grouped_loader)
    assert_same_examples(by_request(batches), plain)
    assert_same_examples(plain, by_request(fat_loader(stores, TENANT)))
    # Grouped by user: batches hold few users each, and one scan serves each user's examples.
    users_per_batch = np.mean([len(set(b.users.tolist())) for b in batches])
    assert users_per_batch < 4
    assert grouped_stats.bytes_read < plain_stats.bytes_read


@pytest.mark.parametrize(
    ("batch_size", "window", "drop_last"),
    [(1, 0, False), (5, 0, True), (6, 23, False), (4, 4, True)],
)
def test_windows_keep_every_example_once(
    stores: Stores, batch_size: int, window: int, drop_last: bool
) -> None:
    config = LoaderConfig(batch_size=batch_size, shuffle_window=window, drop_last=drop_last)
    sizes = [len(rows) for rows in vlm_loader(stores, TENANT, config).row_batches()]
    ids = [rid for rows in vlm_loader(stores, TENANT, config).row_batches()
           for rid in rows.table.column("request_id").to_pylist()]  # fmt: skip
    total = sum(pq.read_metadata(path).num_rows for path in example_files(stores.example_dir))
    assert len(ids) == len(set(ids))
    assert all(size == batch_size for size in sizes[:-1])
    if drop_last:
        assert total - batch_size < len(ids) <= total and sizes[-1] == batch_size
    else:
        assert len(ids) == total
    if window == 0:
        assert ids == sorted(ids)  # streaming keeps arrival order


@pytest.mark.parametrize("by", ["user", "request"])
def test_shards_partition_the_examples(stores: Stores, by: str) -> None:
    everything = set(by_request(vlm_loader(stores, TENANT)))
    parts = []
    for rank in range(3):
        loader = vlm_loader(stores, TENANT)
        loader.shard = Shard(rank, 3, by)  # type: ignore[arg-type]
        parts.append(by_request(loader))
    ids = [set(part) for part in parts]
    assert set().union(*ids) == everything
    assert sum(len(part) for part in ids) == len(everything)
    if by == "user":
        owners = [{int(row["user"][0]) for row in part.values()} for part in parts]
        assert not (owners[0] & owners[1]) and not (owners[1] & owners[2])
    else:
        assert max(map(len, ids)) - min(map(len, ids)) <= 1


def test_shard_from_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Shard.from_env() == Shard(2, 4, "user")
    with pytest.raises(ValueError, match="outside"):
        Shard(4, 4)


def test_streaming_reads_parts_as_they_arrive(stores: Stores, tmp_path: Path) -> None:
    examples = pq.read_table(example_files(stores.example_dir))
    live = tmp_path / "live"
    writer = ExampleLog(live)

    def produce() -> None:
        for start in range(0, examples.num_rows, 30):
            writer.append(examples.slice(start, 30))
            time.sleep(0.02)
        writer.close()

    thread = threading.Thread(target=produce)
    thread.start()
    tier = Tier.open(stores.tier_dir)
    rebuild = Reconstructor(tier, TENANT)
    stream = Loader(
        lambda: read_chunks(follow(live, poll_s=0.01, idle_timeout_s=10), rebuild.example_columns(),
                            ReadStats()),
        rebuild,
        LoaderConfig(batch_size=8, prefetch=1),
    )  # fmt: skip
    got = by_request(stream)
    thread.join()
    assert_same_examples(got, by_request(vlm_loader(stores, TENANT)))


def test_a_stalled_stream_times_out(tmp_path: Path) -> None:
    (tmp_path / "quiet").mkdir()
    with pytest.raises(DataError, match="no new example part"):
        list(follow(tmp_path / "quiet", poll_s=0.01, idle_timeout_s=0.05))


def test_errors_on_the_prefetch_thread_reach_the_consumer(stores: Stores) -> None:
    tier = Tier.open(stores.tier_dir)
    files = example_files(stores.example_dir)
    seen = []

    def broken(rows):
        seen.append(len(rows))
        if len(seen) == 3:
            raise DataError("bad example")
        return Reconstructor(tier, TENANT)(rows)

    loader = Loader(
        lambda: read_chunks(files, Reconstructor(tier, TENANT).example_columns(), ReadStats()),
        broken,
        LoaderConfig(batch_size=4, prefetch=2),
    )
    with pytest.raises(DataError, match="bad example"):
        list(loader)


def test_stopping_early_stops_the_prefetch_thread(stores: Stores) -> None:
    before = threading.active_count()
    loader = vlm_loader(stores, TENANT, LoaderConfig(batch_size=4, prefetch=2))
    for _ in loader:
        break
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
