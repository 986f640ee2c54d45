"""recommend's header says what is listed; --weights model|best|last on every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flexgr
from flexgr.data import load_prepared, prepare
from flexgr.train import dump_config, fit
from tests.cli.helpers import assert_one_line_error, run
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_run(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("rec") / "run"
    fit(tiny_config(tiny_home, "train.max_epochs=1"), run_dir, show_progress=False)
    return run_dir


def seen_by(home: Path, user: str) -> set[str]:
    data = load_prepared("tiny", data_dir=home)
    return {data.item_ids[i - 1] for i in data.items[data.events_of(data.user_index(user))]}


def test_header_states_what_is_listed(tiny_run: Path, tiny_home: Path) -> None:
    seen = len(seen_by(tiny_home, "u3"))
    result = run("recommend", "--run-dir", tiny_run, "--user", "u3", "--k", "5")
    assert result.exit_code == 0, result.output
    assert f"user u3: top 5 of 30 items ({seen} already seen, left out)" in result.stdout
    many = run("recommend", "--run-dir", tiny_run, "--user", "u3", "--k", "5000")
    left = 30 - seen
    assert f"top {left} of 30 items ({seen} already seen, left out); asked for 5,000, only " in (
        " ".join(many.stdout.split())
    )
    assert many.stdout.count("│") // 4 >= left  # every left item is listed
    everything = run("recommend", "--run-dir", tiny_run, "--user", "u3", "--include-seen")
    assert "user u3: top 10 of 30 items\n" in everything.stdout


@pytest.mark.parametrize("weights", ["model", "best", "last"])
def test_weights_on_export_recommend_and_eval(tiny_run: Path, tmp_path: Path, weights: str) -> None:
    exported = run("export", "--run-dir", tiny_run, "--out", tmp_path / "m", "--weights", weights)
    assert exported.exit_code == 0, exported.output
    assert f"({weights} weights)" in exported.stdout
    rec = flexgr.load(tmp_path / "m")
    listed = run("recommend", "--run-dir", tiny_run, "--user", "u1", "--weights", weights, "--json")
    assert listed.exit_code == 0, listed.output
    assert len(json.loads(listed.stdout)) == 10 and rec.num_items == 30
    evaluated = run("eval", "--run-dir", tiny_run, "--weights", weights, "--json")
    assert json.loads(evaluated.stdout)["weights"] == weights


def test_a_run_still_training_has_no_exported_model(tiny_run: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.toml",):
        (partial / name).write_bytes((tiny_run / name).read_bytes())
    for command in (["export", "--out", tmp_path / "x"], ["recommend", "--user", "u1"]):
        assert_one_line_error(
            run(*command, "--run-dir", partial), "has no exported model yet", "--weights best"
        )
    assert_one_line_error(
        run("export", "--run-dir", partial, "--out", tmp_path / "x", "--weights", "last"),
        "has no checkpoints/last.pt",
    )


def test_nothing_left_to_recommend(tiny_home: Path, tmp_path: Path) -> None:
    lines = ["user,item,ts"] + [f"u0,i{i},{100 + i}" for i in range(5)]
    lines += [f"u{u},i{(u + j) % 5},{200 + j}" for u in range(1, 10) for j in range(4)]
    (tmp_path / "all.csv").write_text("\n".join(lines) + "\n")
    prepare(
        str(tmp_path / "all.csv"), fmt="csv", name="all", data_dir=tiny_home, progress=False,
        user_col="user", item_col="item", time_col="ts",
    )  # fmt: skip
    config = tmp_path / "all.toml"
    config.write_text(dump_config(tiny_config(tiny_home, "data.dataset=all", "train.max_steps=1")))
    assert run("train", config, "--run-dir", tmp_path / "run", "-q").exit_code == 0
    result = run("recommend", "--run-dir", tmp_path / "run", "--user", "u0")
    assert result.exit_code == 0 and result.stdout == ""
    assert "user u0 has interacted with all 5 items" in result.stderr
    assert "nothing is left to recommend" in result.stderr
    as_json = run("recommend", "--run-dir", tmp_path / "run", "--user", "u0", "--json")
    assert json.loads(as_json.stdout) == []
