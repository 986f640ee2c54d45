"""The loader refuses examples whose history is not what the request saw, naming the example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flexgr.data.errors import DataError
from flexgr.vlm import ExampleLog, RequestSpec, Tenant, Tier, example_files
from flexgr.vlm.hashing import history_checksum
from tests.vlm.helpers import ALL_GROUPS, Stores, build_stores, by_request, random_log, vlm_loader

FULL = Tenant("full", 10**6, ALL_GROUPS)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    table = random_log(21, users=4, max_events=60, long_user=400)
    spec = RequestSpec(start_ts=1_200)
    return build_stores(tmp_path_factory.mktemp("leak"), table, spec, [1_100, 1_300, 1_500])


def _rows(stores: Stores) -> tuple[pa.Table, list[dict[str, Any]], list[dict[str, Any]]]:
    examples = pq.read_table(example_files(stores.example_dir))
    fat = pq.read_table(example_files(stores.fat_dir)).to_pylist()
    return examples, examples.to_pylist(), fat


def _tampered(stores: Stores, tmp_path: Path, row: int, change: dict[str, Any]) -> Path:
    examples, rows, _ = _rows(stores)
    rows[row].update(change)
    directory = tmp_path / "tampered"
    ExampleLog(directory).append(pa.Table.from_pylist(rows, schema=examples.schema))
    return directory


def _load(stores: Stores, directory: Path, tenant: Tenant = FULL) -> None:
    by_request(vlm_loader(stores, tenant, directory=directory))


def _pick(rows: list[dict[str, Any]], predicate: Any) -> int:
    return next(i for i, row in enumerate(rows) if predicate(row))


def _expect(err: pytest.ExceptionInfo[DataError], rows: list[dict[str, Any]], row: int) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert f"request {rows[row]['request_id']} (user {rows[row]['user']}" in message
    assert f"part-000000.parquet, row {row + 1}:" in message
    return message


@pytest.mark.parametrize("delay", [0, 3])
def test_a_future_event_in_the_snapshot_fails_even_with_a_matching_checksum(
    stores: Stores, tmp_path: Path, delay: int
) -> None:
    """An event at or after request_ts, with length and checksums forged to match."""
    _, rows, fat = _rows(stores)
    row = _pick(rows, lambda r: r["history_len"] > 3)
    request = rows[row]["request_ts"]
    history_ts = [*fat[row]["hist_ts"], request + delay]
    history_items = [*fat[row]["hist_item"], 5]
    checksum, tails = history_checksum(np.array(history_ts), np.array(history_items))
    change = {
        "history_len": rows[row]["history_len"] + 1,
        "checksum": checksum,
        "tail_checksums": tails,
        **{
            key: [*rows[row][key], value]
            for key, value in (
                ("recent_item", 5),
                ("recent_ts", request + delay),
                ("recent_pos", rows[row]["history_len"]),
                ("recent_action", 0),
                ("recent_dwell", 0.5),
                ("recent_surface", 1),
            )
        },
    }
    directory = _tampered(stores, tmp_path, row, change)
    with pytest.raises(DataError) as err:
        _load(stores, directory)
    assert "leak" in _expect(err, rows, row)


def test_a_history_bound_at_request_time_fails(stores: Stores, tmp_path: Path) -> None:
    _, rows, _ = _rows(stores)
    row = _pick(rows, lambda r: r["history_len"] > len(r["recent_ts"]))
    directory = _tampered(stores, tmp_path, row, {"history_end_ts": rows[row]["request_ts"]})
    with pytest.raises(DataError) as err:
        _load(stores, directory)
    assert "history_end_ts" in _expect(err, rows, row) and "leak" in str(err.value)


def test_the_converter_never_records_a_future_event(stores: Stores) -> None:
    examples, rows, fat = _rows(stores)
    assert examples.num_rows > 20
    for row, fat_row in zip(rows, fat, strict=True):
        assert all(ts < row["request_ts"] for ts in row["recent_ts"])
        assert all(ts < row["request_ts"] for ts in fat_row["hist_ts"])
        if row["history_len"] > len(row["recent_ts"]):
            assert row["history_end_ts"] < row["request_ts"]


@pytest.mark.parametrize(
    ("field", "delta", "phrase"),
    [
        ("history_len", 1, ""),
        ("history_len", -1, ""),
        ("history_start_ts", 1, ""),
        ("history_end_ts", -1, ""),
        ("checksum", 1, "checksum mismatch"),
    ],
)
def test_pointers_that_disagree_with_the_tier_fail(
    stores: Stores, tmp_path: Path, field: str, delta: int, phrase: str
) -> None:
    _, rows, _ = _rows(stores)
    row = _pick(rows, lambda r: r["history_len"] - len(r["recent_ts"]) > 2)
    value = (rows[row][field] + delta) % 2**64 if field == "checksum" else rows[row][field] + delta
    directory = _tampered(stores, tmp_path, row, {field: value})
    with pytest.raises(DataError) as err:
        _load(stores, directory)
    assert phrase in _expect(err, rows, row)


def test_a_wrong_tail_checksum_fails_for_a_short_tenant(stores: Stores, tmp_path: Path) -> None:
    _, rows, _ = _rows(stores)
    row = _pick(rows, lambda r: r["history_len"] > 256)
    tails = [(value + 1) % 2**64 for value in rows[row]["tail_checksums"]]
    directory = _tampered(stores, tmp_path, row, {"tail_checksums": tails})
    _load(stores, directory, Tenant("long", 10**6))  # the full checksum is intact
    with pytest.raises(DataError) as err:
        _load(stores, directory, Tenant("short", 256))
    assert "last 256 events" in _expect(err, rows, row)


def test_an_example_newer_than_the_tier_fails(stores: Stores, tmp_path: Path) -> None:
    _, rows, _ = _rows(stores)
    ahead = Tier.open(stores.tier_dir).version + 1
    directory = _tampered(stores, tmp_path, 3, {"history_version": ahead})
    with pytest.raises(DataError) as err:
        _load(stores, directory)
    assert f"saw tier version {ahead}" in _expect(err, rows, 3)
