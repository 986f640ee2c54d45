from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from flexgr.cli.main import app
from typer.testing import CliRunner

WriteFile = Callable[[str, bytes | str], Path]
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_help() -> None:
    for args in (["data", "--help"], ["data", "prepare", "--help"], ["data", "list", "--help"]):
        result = run(*args)
        assert result.exit_code == 0, result.output
    assert "--user-col" in run("data", "prepare", "--help").output


def test_prepare_file_prints_counts(write_file: WriteFile, home: Path) -> None:
    path = write_file("ratings.dat", "1::10::5::3\n1::11::4::1\n2::10::3::2\n")
    result = run(
        "data", "prepare", "--path", str(path), "--format", "movielens-dat", "--name", "small"
    )
    assert result.exit_code == 0, result.output
    assert "small" in result.stdout
    assert "3" in result.stdout and "2" in result.stdout
    assert (home / "small" / "meta.json").is_file()


def test_prepare_json(write_file: WriteFile, tmp_path: Path) -> None:
    path = write_file("log.csv", "who,what,when\na,x,1\nb,y,2\nb,x,3\n")
    result = run(
        "data",
        "prepare",
        "--format",
        "csv",
        "--path",
        str(path),
        "--name",
        "log",
        "--user-col",
        "who",
        "--item-col",
        "what",
        "--time-col",
        "when",
        "--data-dir",
        str(tmp_path / "d"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    assert meta["counts"] == {"users": 2, "items": 2, "events": 3, "catalog_items": 2}
    assert meta["path"] == str(tmp_path / "d" / "log")
    assert meta["source"]["options"] == {"user_col": "who", "item_col": "what", "time_col": "when"}


def test_tab_separator_escape(write_file: WriteFile, home: Path) -> None:
    path = write_file("log.tsv", "u\ti\tt\na\tx\t1\n")
    result = run(
        "data",
        "prepare",
        "--path",
        str(path),
        "--format",
        "csv",
        "--sep",
        "\\t",
        "--user-col",
        "u",
        "--item-col",
        "i",
        "--time-col",
        "t",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["events"] == 1


def test_prepare_force(write_file: WriteFile, home: Path) -> None:
    path = write_file("r.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1.0\n")
    assert run("data", "prepare", "--path", str(path)).exit_code == 0
    first = json.loads(run("data", "prepare", "--path", str(path), "--json").stdout)["created"]
    again = json.loads(run("data", "prepare", "--path", str(path), "--json", "--force").stdout)
    assert again["counts"]["events"] == 1 and again["created"] >= first


def test_bad_input_is_one_line_without_traceback(write_file: WriteFile, home: Path) -> None:
    path = write_file("ratings.dat", "1::10::5::3\n1::11::4::noon\n")
    result = run("data", "prepare", "--path", str(path))
    assert_one_line_error(result, str(path), "line 2", "noon")
    assert not (home / "ratings").exists()


def test_missing_file(home: Path, tmp_path: Path) -> None:
    result = run("data", "prepare", "--path", str(tmp_path / "nope.dat"))
    assert_one_line_error(result, "no such file", "nope.dat")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "either a built-in dataset name or --path"),
        (("ml-1m", "--path", "x.dat"), "not both"),
        (("ml-2m",), "unknown built-in dataset 'ml-2m'"),
        (("ml-1m", "--user-col", "u"), "apply to --path"),
        (("--path", "x.csv", "--format", "csv"), "needs the column mapping"),
    ],
)
def test_usage_errors(
    args: tuple[str, ...], fragment: str, home: Path, write_file: WriteFile
) -> None:
    write_file("x.csv", "u,i,t\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home.parent)
        result = run("data", "prepare", *args)
    assert_one_line_error(result, fragment)


def test_bad_format_choice_is_rejected(home: Path) -> None:
    result = run("data", "prepare", "--path", "x", "--format", "xml")
    assert result.exit_code != 0


def test_builtin_ml100k_and_list(ml100k_home: Path) -> None:
    # Already prepared by the session fixture, so this exercises the CLI's up-to-date path.
    result = run("data", "prepare", "ml-100k", "--data-dir", str(ml100k_home))
    assert result.exit_code == 0, result.output
    assert "ml-100k" in result.stdout and "100,000" in result.stdout and "1,682" in result.stdout
    listing = run("data", "list", "--data-dir", str(ml100k_home))
    assert listing.exit_code == 0
    assert "ml-100k" in listing.stdout and "943" in listing.stdout
    assert "wheels" not in listing.stdout and "downloads" not in listing.stdout


def test_list_empty(tmp_path: Path) -> None:
    result = run("data", "list", "--data-dir", str(tmp_path / "none"))
    assert result.exit_code == 0 and "no prepared datasets" in result.stdout
