"""Bad input gives one clear line naming the file or row; the synthetic log is what it says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flexgr.data.errors import DataError
from flexgr.vlm import TENANTS, EventLog, RequestSpec, SyntheticSpec, Tenant, Tier, synthetic_log
from flexgr.vlm.asof import plan_requests
from flexgr.vlm.hashing import checkpoint_lengths, history_checksum, read_length

BASE = {"user": [1, 1], "item": [3, 4], "timestamp": [10, 20]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"user": None}, "no column 'user'"),
        ({"item": pa.array([3, None])}, "'item' has 1 null values"),
        ({"timestamp": ["a", "b"]}, "'timestamp' must be an integer column"),
        ({"arrival_ts": [10, 19]}, "row 2: arrival_ts 19 is before timestamp 20"),
        ({"action": [0, -1]}, "row 2: action bits must be non-negative"),
        ({"note": ["x", "y"]}, "side feature 'note' must be numeric"),
    ],
)
def test_bad_event_logs_name_the_problem(tmp_path: Path, change: dict, message: str) -> None:
    columns = {**BASE, **change}
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({k: v for k, v in columns.items() if v is not None}), path)
    with pytest.raises(DataError) as err:
        EventLog.read(path)
    assert str(err.value).startswith(f"{path}")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unreadable_log_and_a_missing_tier_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "events.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read event log"):
        EventLog.read(tmp_path / "events.parquet")
    with pytest.raises(DataError, match="never compacted"):
        Tier.open(tmp_path / "nowhere")
    with pytest.raises(DataError, match="increase strictly"):
        plan_requests(EventLog.from_table(pa.table(BASE)), RequestSpec(), [5, 5])


def test_tenants_and_specs_validate() -> None:
    with pytest.raises(ValueError, match="unknown feature groups"):
        Tenant("x", 10, ("pixels",))
    with pytest.raises(ValueError, match="max_len"):
        Tenant("x", 0)
    with pytest.raises(ValueError, match="group_by"):
        RequestSpec(group_by="hour")  # type: ignore[arg-type]


def test_tail_checkpoints_cover_every_window() -> None:
    assert checkpoint_lengths(256) == [] and checkpoint_lengths(1000) == [256, 512]
    assert read_length(1000, 256) == (256, 0)
    assert read_length(1000, 300) == (512, 1)
    assert read_length(1000, 600) == (1000, -1)
    assert read_length(100, 256) == (100, -1)
    ts, items = np.arange(1000), np.arange(1000) % 7
    full, tails = history_checksum(ts, items)
    assert tails == [history_checksum(ts[-n:], items[-n:])[0] for n in (256, 512)]
    assert full != history_checksum(ts[::-1].copy(), items[::-1].copy())[0]  # order matters


def test_the_synthetic_log_is_seeded_and_shaped_as_specified() -> None:
    spec = SyntheticSpec(users=12, days=3, requests_per_day=5, impressions=2, history_max=3000)
    table = synthetic_log(spec)
    assert table.equals(synthetic_log(spec))
    assert not table.equals(synthetic_log(SyntheticSpec(**{**spec.__dict__, "seed": 1})))
    log = EventLog.from_table(table)
    plan = plan_requests(log, spec.request_spec(), spec.watermarks())
    assert plan.num_requests == spec.users * spec.days * spec.requests_per_day
    assert set(np.diff(plan.cand_offsets).tolist()) == {spec.impressions}
    background = np.bincount(log.users[log.timestamps < spec.start_ts])
    assert background.max() <= spec.history_max and background.max() > 3 * np.median(background)
    assert np.mean(log.arrivals > log.timestamps) > 0.01  # some events arrive late
    assert [t.max_len for t in TENANTS] == [256, 4096, 16384]
