"""Duplicate events are reported (count and first example), --dedup drops them; a --path that
is a directory says so."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from flexgr.data import DataError, load_prepared, prepare, read_meta
from flexgr.data.readers import DuplicateEventsWarning
from tests.cli.helpers import assert_one_line_error, run

ROWS = ["user,item,ts", "a,x,1", "a,y,2", "b,x,1", "a,x,1", "b,y,5", "a,y,2", "a,x,1"]


@pytest.fixture
def doubled(tmp_path: Path) -> Path:
    path = tmp_path / "doubled.csv"
    path.write_text("\n".join(ROWS) + "\n")
    return path


def columns() -> list[str]:
    return ["--format", "csv", "--user-col", "user", "--item-col", "item", "--time-col", "ts"]


def test_duplicates_are_reported_and_kept(doubled: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run("data", "prepare", "--path", doubled, *columns(), "--data-dir", home, "--json")
    assert result.exit_code == 0, result.output
    warning = result.stderr.strip()
    assert warning.startswith(f"warning: {doubled}: 3 duplicate events (same user, item and ")
    assert "first: data row 4 repeats row 1 (user 'a', item 'x', timestamp 1)" in warning
    assert "kept; --dedup" in warning and len(warning.splitlines()) == 1
    assert json.loads(result.stdout)["counts"]["events"] == 7


def test_dedup_drops_the_repeats(doubled: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run(
        "data", "prepare", "--path", doubled, *columns(), "--data-dir", home, "--dedup", "--json"
    )
    assert result.exit_code == 0, result.output
    assert "dropped (--dedup), keeping the first of each" in result.stderr
    meta = json.loads(result.stdout)
    assert meta["counts"]["events"] == 4 and meta["source"]["options"]["dedup"] == "true"
    data = load_prepared("doubled", data_dir=home)
    pairs = {(data.user_ids[u], data.item_ids[i - 1]) for u in range(2) for i in
             data.items[data.events_of(u)]}  # fmt: skip
    assert pairs == {("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")}
    # dedup is part of the source: asking without it rebuilds (and warns again).
    again = run("data", "prepare", "--path", doubled, *columns(), "--data-dir", home, "--json")
    assert json.loads(again.stdout)["counts"]["events"] == 7
    assert read_meta("doubled", data_dir=home).source.options.get("dedup") is None


def test_library_warning_and_clean_files(doubled: Path, tmp_path: Path) -> None:
    cols = {"user_col": "user", "item_col": "item", "time_col": "ts"}
    with pytest.warns(DuplicateEventsWarning, match="3 duplicate events"):
        prepare(str(doubled), fmt="csv", data_dir=tmp_path / "h", progress=False, **cols)
    clean = tmp_path / "clean.csv"
    clean.write_text("user,item,ts\na,x,1\na,x,2\nb,x,1\n")  # same pair, other time: no repeat
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateEventsWarning)
        prepare(str(clean), fmt="csv", data_dir=tmp_path / "h", progress=False, **cols)
    with pytest.raises(DataError, match="dedup applies to files"):
        prepare("ml-100k", dedup=True, data_dir=tmp_path / "h")


def test_option_errors(tmp_path: Path) -> None:
    assert_one_line_error(run("data", "prepare", "ml-100k", "--dedup"), "--dedup applies to --path")
    assert_one_line_error(
        run("data", "prepare", "--path", tmp_path, *columns(), "--data-dir", tmp_path / "h"),
        f"{tmp_path}: is a directory, not an interaction file",
    )
