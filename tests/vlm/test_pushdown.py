"""A tenant reads only its columns and the stripes its window needs, on both sides."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest

from flexgr.vlm import (
    LoaderConfig,
    ReadStats,
    Reconstructor,
    RequestSpec,
    Tenant,
    Tier,
    example_files,
    read_chunks,
)
from tests.vlm.helpers import Stores, build_stores, by_request, random_log, vlm_loader

SHORT = Tenant("short", 256)
LONG = Tenant("long", 10**6, ("actions", "side"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    table = random_log(4, users=3, max_events=50, long_user=2500, late=0.0, span=50_000)
    spec = RequestSpec(start_ts=50_000)
    return build_stores(tmp_path_factory.mktemp("push"), table, spec, [40_000], stripe_rows=128)


@dataclass(frozen=True)
class _Read:
    metadata: pq.FileMetaData
    row_groups: tuple[int, ...]
    columns: tuple[str, ...]
    bytes_read: int


def _spy(monkeypatch: pytest.MonkeyPatch, stats: ReadStats) -> list[_Read]:
    """Every pyarrow row-group read, with the bytes it cost (measured at the file object)."""
    calls: list[_Read] = []
    real = pq.ParquetFile.read_row_groups

    def read_row_groups(self: pq.ParquetFile, row_groups: list[int], columns: list[str], **kw):
        before = stats.bytes_read
        table = real(self, row_groups, columns=columns, **kw)
        calls.append(
            _Read(self.metadata, tuple(row_groups), tuple(columns), stats.bytes_read - before)
        )
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", read_row_groups)
    return calls


def _chunk_bytes(read: _Read) -> int:
    """Compressed size of exactly the requested column chunks of the requested row groups."""
    total = 0
    for group in read.row_groups:
        row_group = read.metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            if chunk.path_in_schema in read.columns:
                total += chunk.total_compressed_size
    return total


@pytest.mark.parametrize(
    ("tenant", "expected"),
    [
        (SHORT, ("timestamp", "version", "item")),
        (LONG, ("timestamp", "version", "item", "action", "dwell", "surface")),
    ],
)
def test_only_the_declared_columns_are_read(
    stores: Stores, monkeypatch: pytest.MonkeyPatch, tenant: Tenant, expected: tuple[str, ...]
) -> None:
    stats = ReadStats()
    calls = _spy(monkeypatch, stats)
    assert list(vlm_loader(stores, tenant, LoaderConfig(batch_size=5), stats=stats))
    assert calls and {call.columns for call in calls} == {expected}
    for call in calls:  # byte for byte: no neighbouring column, no other stripe
        assert call.bytes_read == _chunk_bytes(call)


def test_a_short_tenant_reads_only_the_newest_stripes(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy(monkeypatch, ReadStats())
    stripes = {}
    for tenant in (SHORT, LONG):
        calls.clear()
        by_request(vlm_loader(stores, tenant, LoaderConfig(batch_size=5)))
        stripes[tenant.name] = sum(len(call.row_groups) for call in calls)
    # The long user's 2500 events fill ~20 stripes of 128; a 256-event window needs 3 at most.
    assert stripes["short"] * 3 < stripes["long"]


def test_example_files_are_projected_too(stores: Stores) -> None:
    files = example_files(stores.example_dir)
    tier = Tier.open(stores.tier_dir)
    read = {}
    for tenant in (SHORT, LONG):
        stats = ReadStats()
        columns = Reconstructor(tier, tenant).example_columns()
        chunks = list(read_chunks(files, columns, stats))
        assert all(tuple(chunk.table.column_names) == columns for chunk in chunks)
        read[tenant.name] = stats.bytes_read
    assert "recent_dwell" not in Reconstructor(tier, SHORT).example_columns()
    assert read["short"] < read["long"]
