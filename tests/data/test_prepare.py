from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flexgr.data import (
    DataError,
    RawEvents,
    build_interactions,
    dataset_dir,
    load_prepared,
    prepare,
    read_meta,
    store,
)
from flexgr.data.ties import tie_keys

# flexgr.data.prepare is both a module and the function the package exports under that name.
prepare_module = importlib.import_module("flexgr.data.prepare")

WriteFile = Callable[[str, bytes | str], Path]

# user 10 has a tie at t=5 (rows 1 and 3: ordered by the tie hash, or kept with ties="file");
# ids sort numerically, not as text
RATINGS_DAT = """\
10::200::4::7
10::100::3::5
9::100::5::1
10::30::2::5
2::30::1::9
"""


@pytest.fixture
def ratings(write_file: WriteFile) -> Path:
    return write_file("ratings.dat", RATINGS_DAT)


def _tie_first(user: str, item_a: str, item_b: str, seed: int = 0) -> str:
    """Which of two tied items of ``user`` the hash order puts first."""
    keys = tie_keys(pa.array([user, user]), pa.array([item_a, item_b]), seed)
    return item_a if keys[0] < keys[1] else item_b


def test_build_interactions_orders_by_user_time_then_row_with_file_ties() -> None:
    raw = RawEvents.from_lists(
        users=["b", "a", "b", "b", "a"],
        items=["x", "y", "y", "z", "x"],
        timestamps=[3, 9, 1, 1, 2],
        ratings=[1, 2, 3, 4, 5],
    )
    data = build_interactions("t", raw, ties="file")
    assert data.user_ids == ["a", "b"]
    assert data.item_ids == ["x", "y", "z"]
    assert data.user_offsets.tolist() == [0, 2, 5]
    # a: (t2, x, 5), (t9, y, 2); b: t1 tie keeps row order y(3) before z(4), then (t3, x, 1)
    assert data.items.tolist() == [1, 2, 2, 3, 1]
    assert data.timestamps.tolist() == [2, 9, 1, 1, 3]
    assert data.ratings.tolist() == [5, 2, 3, 4, 1]
    assert data.items.dtype == np.int32 and data.user_offsets.dtype == np.int64


def test_build_interactions_orders_ties_by_the_seeded_hash() -> None:
    # Many seeds: each order of the tied pair must occur, and each time the hash's.
    seen = set()
    for seed in range(16):
        for rows in ([0, 1, 2], [2, 1, 0]):
            users, items, times = ["b", "b", "b"], ["y", "z", "x"], [1, 1, 3]
            raw = RawEvents.from_lists(
                [users[r] for r in rows], [items[r] for r in rows], [times[r] for r in rows]
            )
            data = build_interactions("t", raw, tie_seed=seed)
            first = "y" if _tie_first("b", "y", "z", seed) == "y" else "z"
            assert data.item_ids[data.items[0] - 1] == first
            assert data.timestamps.tolist() == [1, 1, 3]
            seen.add(first)
    assert seen == {"y", "z"}


def test_unknown_tie_order_is_refused() -> None:
    with pytest.raises(DataError, match="tie order"):
        build_interactions("t", RawEvents.from_lists(["a"], ["x"], [1]), ties="row")


def test_numeric_ids_sort_numerically() -> None:
    data = build_interactions(
        "t", RawEvents.from_lists(["10", "9", "100"], ["2", "10", "1"], [1, 1, 1])
    )
    assert data.user_ids == ["9", "10", "100"]
    assert data.item_ids == ["1", "2", "10"]


def test_prepare_writes_the_documented_layout(ratings: Path, home: Path) -> None:
    directory = prepare(ratings, name="tiny", progress=False)
    assert directory == home / "tiny" == dataset_dir("tiny")
    assert sorted(p.name for p in directory.iterdir()) == [
        "events.parquet",
        "items.parquet",
        "meta.json",
        "users.parquet",
    ]
    events = pq.read_table(directory / "events.parquet")
    assert events.schema.names == ["user", "item", "rating", "timestamp"]
    assert [f.type for f in events.schema] == [pa.int32(), pa.int32(), pa.float32(), pa.int64()]
    # users 2, 9, 10 -> 0, 1, 2; items 30, 100, 200 -> 1, 2, 3; user 10's tie by the hash
    assert events.column("user").to_pylist() == [0, 1, 2, 2, 2]
    tied = [2, 1] if _tie_first("10", "100", "30") == "100" else [1, 2]
    assert events.column("item").to_pylist() == [1, 2, *tied, 3]
    assert events.column("timestamp").to_pylist() == [9, 1, 5, 5, 7]
    items = pq.read_table(directory / "items.parquet").to_pydict()
    assert items == {"item": [1, 2, 3], "raw_id": ["30", "100", "200"], "rated": [True] * 3}

    meta = json.loads((directory / "meta.json").read_text())
    assert meta["format_version"] == 2
    assert (meta["ties"], meta["tie_seed"]) == ("hash", 0)
    assert meta["name"] == "tiny"
    assert meta["counts"] == {"users": 3, "items": 3, "events": 5, "catalog_items": 3}
    assert meta["source"]["kind"] == "file"
    assert meta["source"]["location"] == str(ratings.resolve())
    assert meta["source"]["format"] == "movielens-dat"
    assert len(meta["source"]["sha256"]) == 64
    assert meta["created"].endswith("+00:00")


def test_load_prepared_round_trip(ratings: Path, home: Path) -> None:
    directory = prepare(ratings, name="tiny", progress=False)
    for where in (directory, str(directory), "tiny"):
        data = load_prepared(where)
        assert (data.num_users, data.num_items, data.num_events) == (3, 3, 5)
    assert data.name == "tiny"
    assert data.user_offsets.tolist() == [0, 1, 2, 5]
    assert sorted(data.items.tolist()[2:4]) == [1, 2] and data.items.tolist()[4] == 3
    assert data.ratings.dtype == np.float32 and data.timestamps.dtype == np.int64
    assert data.user_index("10") == 2 and data.user_ids[2] == "10"
    assert data.item_index("200") == 3 and data.item_ids[3 - 1] == "200"
    with pytest.raises(DataError, match="unknown user id '11'"):
        data.user_index("11")
    with pytest.raises(DataError, match="unknown item id"):
        data.item_index("11")
    assert "users=3" in repr(data)


def test_load_prepared_missing(home: Path) -> None:
    with pytest.raises(DataError, match="no prepared dataset"):
        load_prepared("nothing-here")


def test_data_dir_argument_beats_env(ratings: Path, home: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    directory = prepare(ratings, name="tiny", data_dir=elsewhere, progress=False)
    assert directory == elsewhere / "tiny"
    assert not (home / "tiny").exists()
    assert load_prepared("tiny", data_dir=elsewhere).num_events == 5


def test_default_home_is_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLEXGR_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dataset_dir("x") == tmp_path / ".cache" / "flexgr" / "x"


def test_rerun_is_skipped(ratings: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = prepare(ratings, name="tiny", progress=False)
    created = read_meta(directory).created

    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("an up-to-date dataset was rebuilt")

    monkeypatch.setattr(prepare_module, "build_interactions", must_not_build)
    assert prepare(ratings, name="tiny", progress=False) == directory
    assert read_meta(directory).created == created


def test_force_and_changed_source_rebuild(ratings: Path, home: Path) -> None:
    directory = prepare(ratings, name="tiny", progress=False)
    first = read_meta(directory).source.sha256
    os.utime(directory / "meta.json", (0, 0))
    prepare(ratings, name="tiny", force=True, progress=False)
    assert (directory / "meta.json").stat().st_mtime > 0  # rewritten

    ratings.write_text(RATINGS_DAT + "3::30::1::1\n")
    prepare(ratings, name="tiny", progress=False)
    meta = read_meta(directory)
    assert meta.source.sha256 != first
    assert meta.counts.events == 6


def test_changed_column_mapping_rebuilds(write_file: WriteFile, home: Path) -> None:
    path = write_file("log.csv", "a,b,t1,t2\nu,i,1,9\nu,j,2,8\n")
    prepare(path, fmt="csv", user_col="a", item_col="b", time_col="t1", progress=False)
    assert load_prepared("log").items.tolist() == [1, 2]
    prepare(path, fmt="csv", user_col="a", item_col="b", time_col="t2", progress=False)
    assert load_prepared("log").items.tolist() == [2, 1]


def test_refuses_to_replace_another_source(
    ratings: Path, write_file: WriteFile, home: Path
) -> None:
    prepare(ratings, name="tiny", progress=False)
    other = write_file("other.dat", "1::1::1::1\n")
    with pytest.raises(DataError, match="already exists from"):
        prepare(other, name="tiny", progress=False)
    prepare(other, name="tiny", force=True, progress=False)
    assert load_prepared("tiny").num_events == 1


def test_refuses_to_replace_a_foreign_directory(ratings: Path, home: Path) -> None:
    (home / "tiny").mkdir(parents=True)
    (home / "tiny" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare(ratings, name="tiny", progress=False)
    assert (home / "tiny" / "notes.txt").exists()


def _leftovers(home: Path) -> list[str]:
    return [p.name for p in home.iterdir() if p.name.startswith(".")] if home.exists() else []


def test_crash_while_writing_leaves_nothing(
    ratings: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_write = pq.write_table

    def write_then_crash(table: pa.Table, where: object, **kwargs: object) -> None:
        calls.append(where)
        if len(calls) == 2:  # events.parquet is on disk, users.parquet fails
            raise OSError("disk full")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(store.pq, "write_table", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        prepare(ratings, name="tiny", progress=False)
    assert len(calls) == 2
    assert not (home / "tiny").exists()
    assert _leftovers(home) == []


def test_crash_while_rebuilding_keeps_the_old_dataset(
    ratings: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = prepare(ratings, name="tiny", progress=False)
    before = read_meta(directory)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store.pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(ratings, name="tiny", force=True, progress=False)
    assert read_meta(directory) == before
    assert load_prepared(directory).num_events == 5
    assert _leftovers(home) == []


def test_crash_at_the_swap_restores_the_old_dataset(
    ratings: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = prepare(ratings, name="tiny", progress=False)
    real_rename = os.rename

    def failing_second_rename(src: object, dst: object) -> None:
        if str(src).endswith(".partial"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(store.os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="rename failed"):
        prepare(ratings, name="tiny", force=True, progress=False)
    assert load_prepared(directory).num_events == 5
    assert _leftovers(home) == []


def test_stale_build_directories_are_cleaned(ratings: Path, home: Path) -> None:
    home.mkdir(parents=True)
    stale = home / ".tiny.abc123.partial"
    stale.mkdir()
    os.utime(stale, (0, 0))
    fresh = home / ".tiny.def456.partial"  # may belong to a concurrent build: keep it
    fresh.mkdir()
    prepare(ratings, name="tiny", progress=False)
    assert not stale.exists() and fresh.exists()


def test_damaged_directory_is_reported(ratings: Path, home: Path) -> None:
    directory = prepare(ratings, name="tiny", progress=False)
    meta = json.loads((directory / "meta.json").read_text())
    meta["counts"]["events"] = 4
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="counts differ"):
        load_prepared(directory)
    (directory / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable meta.json"):
        load_prepared(directory)


def test_old_format_version_asks_for_rebuild_and_is_rebuilt(ratings: Path, home: Path) -> None:
    directory = prepare(ratings, name="tiny", progress=False)
    meta = json.loads((directory / "meta.json").read_text())
    meta["format_version"] = 0
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format version 0"):
        load_prepared(directory)
    prepare(ratings, name="tiny", progress=False)
    assert read_meta(directory).format_version == 2


def test_name_rules(ratings: Path, home: Path) -> None:
    with pytest.raises(DataError, match="invalid dataset name"):
        prepare(ratings, name="../escape", progress=False)
    with pytest.raises(DataError, match="reserved"):
        prepare(ratings, name="wheels", progress=False)
    assert prepare(ratings, progress=False).name == "ratings"  # default: the file's stem


def test_unknown_format_is_asked_for(write_file: WriteFile, home: Path) -> None:
    path = write_file("log.csv", "a,b,c\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        prepare(path, progress=False)


def test_missing_source_file(home: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        prepare(tmp_path / "nope.dat", progress=False)


def test_progress_output_does_not_break_prepare(
    ratings: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare(ratings, name="tiny", progress=True)
    assert "indexing and sorting 5 events" in capsys.readouterr().err
