"""Compaction is atomic: a crash leaves the previous version readable; torn files are caught."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flexgr.data.errors import DataError
from flexgr.vlm import EventLog, RequestSpec, Tenant, Tier, compact, compaction
from flexgr.vlm.manifest import read_current
from tests.vlm.helpers import (
    ALL_GROUPS,
    Stores,
    assert_same_examples,
    build_stores,
    by_request,
    fat_loader,
    random_log,
    vlm_loader,
)

FULL = Tenant("full", 10**6, ALL_GROUPS)
MARKS = [1_100, 1_250, 1_400]  # requests after 1_250 see version 2 or 3


@pytest.fixture
def stores(tmp_path: Path) -> Stores:
    table = random_log(8, users=5, max_events=80)
    return build_stores(tmp_path, table, RequestSpec(start_ts=1_150), MARKS[:2])


def _late_events(stores: Stores) -> EventLog:
    """Events that arrived between the second and a third watermark (still in the buffer)."""
    log = stores.log
    return log.take(np.flatnonzero((log.arrivals >= MARKS[1]) & (log.arrivals < MARKS[2])))


def _still_reads_version_2(stores: Stores) -> None:
    tier = Tier.open(stores.tier_dir)
    assert tier.version == 2
    # Examples up to version 2 rebuild exactly; the loader never saw the failed version.
    want = by_request(fat_loader(stores, FULL))
    assert_same_examples(by_request(vlm_loader(stores, FULL)), want)


def test_a_crash_before_the_commit_leaves_the_previous_version(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def crash_on_current(source: object, target: object) -> None:
        if Path(str(target)).name == "CURRENT":
            raise OSError("power cut")
        real_replace(source, target)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash_on_current)
        with pytest.raises(OSError, match="power cut"):
            compact(stores.tier_dir, _late_events(stores), MARKS[2], num_buckets=4)
    leftovers = list(stores.tier_dir.glob("bucket=*/v000003-*.parquet"))
    assert leftovers  # the new files were written, but nothing names them
    _still_reads_version_2(stores)
    compact(stores.tier_dir, _late_events(stores), MARKS[2])  # a rerun commits version 3 ...
    assert Tier.open(stores.tier_dir).version == 3
    assert not any(path.exists() for path in leftovers)  # ... and collects the orphans


def test_a_crash_inside_the_writer_leaves_the_previous_version(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = compaction.write_bucket
    calls = []

    def fail_on_second(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-compaction")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(compaction, "write_bucket", fail_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        compact(stores.tier_dir, _late_events(stores), MARKS[2])
    assert not list(stores.tier_dir.rglob(".*tmp*"))  # no temp file left behind either
    _still_reads_version_2(stores)


def _data_file(stores: Stores) -> tuple[Path, pq.FileMetaData]:
    manifest = read_current(stores.tier_dir)
    assert manifest is not None
    entry = max(manifest.files, key=lambda e: e.bytes)
    path = stores.tier_dir / entry.path
    return path, pq.read_metadata(path)


def test_a_truncated_file_is_detected(stores: Stores) -> None:
    path, _ = _data_file(stores)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # a copy that stopped mid-stripe
    with pytest.raises(DataError, match="torn or truncated") as err:
        by_request(vlm_loader(stores, FULL))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("where", ["page header", "page data"])
def test_a_corrupted_stripe_is_detected(stores: Stores, where: str) -> None:
    """Same size, one flipped byte: Parquet's page checksums miss header bytes, the
    manifest's chunk CRC does not."""
    path, metadata = _data_file(stores)
    chunk = metadata.row_group(metadata.num_row_groups - 1).column(1)  # timestamps
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    offset = start + (1 if where == "page header" else chunk.total_compressed_size - 2)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=r"stripe \d+, column 'timestamp': checksum mismatch"
    ) as err:
        by_request(vlm_loader(stores, FULL))
    assert str(path) in str(err.value)


def test_old_versions_are_collected_but_the_previous_one_stays(stores: Stores) -> None:
    before = read_current(stores.tier_dir)
    assert before is not None and before.version == 2
    compact(stores.tier_dir, _late_events(stores), MARKS[2], keep_versions=2)
    names = {p.name for p in stores.tier_dir.glob("manifest-*.json")}
    assert names == {"manifest-000002.json", "manifest-000003.json"}
    # A reader still holding version 2 can finish: its files are all there.
    assert all((stores.tier_dir / name).exists() for name in before.file_names())
    third = read_current(stores.tier_dir)
    nothing = stores.log.take(np.zeros(0, dtype=np.int64))
    compact(stores.tier_dir, nothing, 1_500, keep_versions=2)
    fourth = read_current(stores.tier_dir)
    assert fourth is not None and third is not None and fourth.version == 4
    # Buckets that got nothing new are reused by reference, not rewritten.
    assert fourth.file_names() == third.file_names()
    assert all((stores.tier_dir / name).exists() for name in fourth.file_names())


def test_compaction_rejects_events_of_another_window(stores: Stores) -> None:
    late = _late_events(stores)
    with pytest.raises(DataError, match="at or after the watermark"):
        compact(stores.tier_dir, late, MARKS[1] + 10)
    early = stores.log.take(np.flatnonzero(stores.log.arrivals < MARKS[1]))
    with pytest.raises(DataError, match="before 1250"):
        compact(stores.tier_dir, early, MARKS[2])
    with pytest.raises(DataError, match="not after the tier's"):
        compact(stores.tier_dir, late, MARKS[1])
    assert Tier.open(stores.tier_dir).version == 2
