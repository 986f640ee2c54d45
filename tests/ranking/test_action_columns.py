"""Action columns through the readers, prepare and the prepared store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flexgr.data import DataError, load_prepared, prepare, read_events
from flexgr.data.store import EVENTS_FILE


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "log.csv"
    path.write_text(text)
    return path


def test_csv_actions_follow_their_events_through_the_time_sort(tmp_path: Path) -> None:
    path = _csv(tmp_path, "u,i,t,click,bits\n1,a,10,1,5\n1,b,5,0,3\n2,a,7,1,0\n1,c,7,0,2.0\n")
    raw = read_events(
        path, "csv", user_col="u", item_col="i", time_col="t", action_cols="click,bits"
    )
    assert raw.actions["click"].tolist() == [1, 0, 1, 0]
    directory = prepare(
        str(path),
        fmt="csv",
        user_col="u",
        item_col="i",
        time_col="t",
        action_cols=["click", "bits"],
        data_dir=tmp_path / "home",
        progress=False,
    )
    data = load_prepared(directory)
    # user 1: b@5, c@7, a@10; user 2: a@7
    assert [data.item_ids[i - 1] for i in data.items] == ["b", "c", "a", "a"]
    assert data.actions["click"].tolist() == [0, 0, 1, 1]
    assert data.actions["bits"].tolist() == [3, 2, 5, 0]
    assert data.actions["bits"].dtype == np.int64
    columns = pq.read_schema(directory / EVENTS_FILE).names
    assert "action.click" in columns and "action.bits" in columns


def test_parquet_actions_take_integers_and_booleans(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    table = pa.table(
        {
            "u": [1, 1],
            "i": ["a", "b"],
            "t": [1, 2],
            "like": [True, False],
            "n": pa.array([7, 2], pa.int16()),
        }
    )
    pq.write_table(table, path)
    directory = prepare(
        str(path),
        user_col="u",
        item_col="i",
        time_col="t",
        action_cols="like,n",
        data_dir=tmp_path / "home",
        progress=False,
    )
    data = load_prepared(directory)
    assert data.actions == {
        "like": pytest.approx(np.array([1, 0])),
        "n": pytest.approx(np.array([7, 2])),
    }


def test_datasets_without_actions_keep_their_layout(tmp_path: Path) -> None:
    path = _csv(tmp_path, "u,i,t\n1,a,1\n1,b,2\n")
    directory = prepare(
        str(path),
        fmt="csv",
        user_col="u",
        item_col="i",
        time_col="t",
        data_dir=tmp_path / "home",
        progress=False,
    )
    assert pq.read_schema(directory / EVENTS_FILE).names == ["user", "item", "rating", "timestamp"]
    assert load_prepared(directory).actions == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("1,a,1,-1\n", "line 2: click: action '-1' is not a non-negative integer"),
        ("1,a,1,0.5\n", "line 2: click: action '0.5' is not a non-negative integer"),
        ("1,a,1,\n", "line 2: click: action '' is not a non-negative integer"),
        ("1,a,1,1\n1,b,2,99999999999999999999\n", "line 3: click: action"),
    ],
)
def test_bad_action_values_name_the_file_line_and_column(
    tmp_path: Path, body: str, message: str
) -> None:
    path = _csv(tmp_path, "u,i,t,click\n" + body)
    with pytest.raises(DataError, match=message):
        read_events(path, "csv", user_col="u", item_col="i", time_col="t", action_cols="click")


def test_action_column_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    path = _csv(tmp_path, "u,i,t,click\n1,a,1,1\n")
    with pytest.raises(DataError, match="header lacks column 'like'"):
        read_events(path, "csv", user_col="u", item_col="i", time_col="t", action_cols="like")
    with pytest.raises(DataError, match="already used as another field"):
        read_events(path, "csv", user_col="u", item_col="i", time_col="t", action_cols="t")
    with pytest.raises(DataError, match="twice"):
        read_events(
            path, "csv", user_col="u", item_col="i", time_col="t", action_cols="click,click"
        )
    with pytest.raises(DataError, match="fixed layout"):
        read_events(path, "movielens-dat", action_cols="click")
    parquet = tmp_path / "log.parquet"
    pq.write_table(
        pa.table({"u": [1], "i": ["a"], "t": [1], "x": pa.array([None], pa.int64())}), parquet
    )
    with pytest.raises(DataError, match="row 1: x: missing action value"):
        read_events(parquet, "parquet", user_col="u", item_col="i", time_col="t", action_cols="x")


def test_action_columns_are_part_of_the_source_identity(tmp_path: Path) -> None:
    path = _csv(tmp_path, "u,i,t,click\n1,a,1,1\n1,b,2,0\n")
    home = tmp_path / "home"
    common = {
        "fmt": "csv",
        "user_col": "u",
        "item_col": "i",
        "time_col": "t",
        "data_dir": home,
        "progress": False,
    }
    assert load_prepared(prepare(str(path), **common)).actions == {}
    # Asking for the action column rebuilds the same dataset with it.
    assert load_prepared(prepare(str(path), action_cols="click", **common)).actions[
        "click"
    ].tolist() == [1, 0]


def test_cli_prepares_action_columns(tmp_path: Path) -> None:
    from flexgr.cli.main import app
    from typer.testing import CliRunner

    path = _csv(tmp_path, "u,i,t,click\n1,a,1,1\n1,b,2,0\n")
    home = tmp_path / "home"
    args = ["data", "prepare", "--path", str(path), "--format", "csv", "--user-col", "u"]
    args += ["--item-col", "i", "--time-col", "t", "--action-cols", "click"]
    result = CliRunner().invoke(app, [*args, "--data-dir", str(home)])
    assert result.exit_code == 0, result.output
    assert load_prepared(home / "log").actions["click"].tolist() == [1, 0]
    bad = CliRunner().invoke(app, [*args[:-1], "nope", "--data-dir", str(home), "--force"])
    assert bad.exit_code == 1
    assert "header lacks column 'nope'" in bad.output
