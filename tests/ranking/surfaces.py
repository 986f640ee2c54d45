"""Checks shared by the ranking presets' end-to-end tests on MovieLens-100K: a run of two
training steps wrote its records, and `flexgr eval` / `flexgr score` read the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.helpers import run


def run_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_two_step_run(run_dir: Path) -> dict:
    """The records of a two-step ranking run; returns its final test record."""
    records = run_records(run_dir)
    assert records[0]["task"] == "ranking"
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    final = records[-1]
    assert final["split"] == "test" and final["final"] and final["impressions"] == 943 * 8
    for key in ("ne:like", "auc:like", "gauc:like", "ne:dislike", "mse:rating"):
        assert key in final and final[key] == final[key]  # present and not NaN
    return final


def check_eval_and_score(run_dir: Path, final: dict) -> list:
    """`flexgr eval` repeats the final test AUC; `flexgr score` answers candidates 50 and 172 of
    user 1 in order. Returns the (item, predictions) pairs."""
    evaluated = run("eval", "--run-dir", run_dir, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["auc:like"] == pytest.approx(final["auc:like"])
    scored = run("score", "--run-dir", run_dir, "--user", "1", "--candidates", "50,172", "--json")
    assert scored.exit_code == 0, scored.output
    pairs = json.loads(scored.stdout)
    assert [p[0] for p in pairs] == ["50", "172"]
    return pairs
