"""Item catalogues: never-rated items get indices after the rated ones and can be pooled."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flexgr.cli.main import app
from typer.testing import CliRunner

from flexgr.data import DataError, load_prepared, prepare
from flexgr.data.catalog import read_item_ids_text

LOG = "user,item,ts\nu1,b,1\nu1,d,2\nu2,b,3\nu2,a,4\n"


def prepare_log(tmp_path: Path, item_file: Path | None) -> Path:
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    return prepare(
        path,
        fmt="csv",
        data_dir=tmp_path / "home",
        progress=False,
        item_file=item_file,
        user_col="user",
        item_col="item",
        time_col="ts",
        force=True,
    )


def test_catalogue_items_follow_the_rated_ones(tmp_path: Path) -> None:
    catalog = tmp_path / "items.txt"
    catalog.write_text("e\na\nb\nc\nd\n\nb\n")  # blank lines and repeats are fine
    directory = prepare_log(tmp_path, catalog)
    data = load_prepared(directory)
    assert data.item_ids == ["a", "b", "d"] and data.catalog_ids == ["c", "e"]
    assert (data.pool_size("rated"), data.pool_size("catalog")) == (3, 5)
    assert data.pool_item_ids("catalog") == ["a", "b", "d", "c", "e"]
    assert data.item_index("e") == 5
    table = pq.read_table(directory / "items.parquet").to_pydict()
    assert table["rated"] == [True, True, True, False, False]
    # An item that is rated but missing from the item file stays rated, and is not lost.
    catalog.write_text("a\nb\n")
    data = load_prepared(prepare_log(tmp_path, catalog))
    assert data.item_ids == ["a", "b", "d"] and data.catalog_ids == []


def test_parquet_item_file_and_its_column(tmp_path: Path) -> None:
    catalog = tmp_path / "items.parquet"
    pq.write_table(pa.table({"title": ["x", "y"], "item": ["z", "a"]}), catalog)
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    directory = prepare(
        path,
        fmt="csv",
        data_dir=tmp_path / "h",
        progress=False,
        item_file=catalog,
        user_col="user",
        item_col="item",
        time_col="ts",
    )
    assert load_prepared(directory).catalog_ids == ["z"]


def test_without_an_item_file_the_catalogue_is_the_rated_items(tmp_path: Path) -> None:
    data = load_prepared(prepare_log(tmp_path, None))
    assert data.catalog_ids == [] and data.pool_size("catalog") == data.pool_size("rated") == 3
    with pytest.raises(ValueError, match="item pool"):
        data.pool_size("all")  # type: ignore[arg-type]


def test_bad_item_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such item file"):
        prepare_log(tmp_path, tmp_path / "missing.txt")
    with pytest.raises(DataError, match="expected a header"):
        read_item_ids_text(b"1\tToy Story\n", "recbole", "x.item")
    with pytest.raises(DataError, match="no item ids"):
        read_item_ids_text(b"\n\n", "lines", "empty.txt")
    # GroupLens files are Latin-1; only the id is read.
    ids = read_item_ids_text(
        "1::Caf\xe9 (1995)::Drama\n2::B::C\n".encode("latin-1"), "movielens-dat", "m"
    )
    assert ids.to_pylist() == ["1", "2"]


def test_cli_item_file(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    (tmp_path / "items.txt").write_text("a\nb\nc\nd\n")
    args = ["data", "prepare", "--path", str(path), "--format", "csv", "--user-col", "user"]
    args += ["--item-col", "item", "--time-col", "ts", "--data-dir", str(tmp_path / "home")]
    result = CliRunner().invoke(app, [*args, "--item-file", str(tmp_path / "items.txt")])
    assert result.exit_code == 0, result.output
    assert load_prepared(tmp_path / "home" / "log").catalog_ids == ["c"]
    result = CliRunner().invoke(app, ["data", "prepare", "ml-100k", "--item-file", "x.txt"])
    assert result.exit_code == 1 and "apply to --path" in result.stderr
