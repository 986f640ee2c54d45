"""An independent check of ``flexgr eval``: the metrics re-computed with plain numpy.

Only the model's scores come from flexgr (through the exported model and its raw item ids);
the split, the input window, the exclusion and the ranking are re-derived here from the
prepared parquet files and the run's config, by code that shares nothing with flexgr.eval.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import flexgr
from flexgr.train import dump_config
from tests.cli.helpers import run
from tests.conftest import tiny_config

ITEMS, UNRATED = 40, 6


def write_log(directory: Path, users: int = 70, seed: int = 0) -> tuple[Path, Path]:
    """A log with many tied timestamps and an item file with never-rated items."""
    rng = np.random.default_rng(seed)
    lines = ["user,item,ts"]
    for user in range(users):
        n = int(rng.integers(3, 30))
        start = int(rng.integers(0, ITEMS))
        stamps = np.sort(rng.integers(0, n // 2 + 1, n)) * 60 + 1_000_000
        for k, ts in enumerate(stamps):
            lines.append(f"u{user},i{(start + k * int(rng.integers(1, 3))) % ITEMS},{ts}")
    log = directory / "log.csv"
    log.write_text("\n".join(lines) + "\n")
    catalog = directory / "items.txt"
    catalog.write_text("\n".join(f"i{k}" for k in range(ITEMS + UNRATED)) + "\n")
    return log, catalog


def numpy_metrics(
    dataset: Path, run_dir: Path, which: str, k: int = 10
) -> tuple[dict[str, float], int]:
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    protocol, window = cfg["data"]["protocol"], cfg["data"]["max_seq_len"]
    exclude = cfg["eval"]["exclude_history"]
    if exclude == "auto":
        exclude = "window" if protocol == "gr-compatible" else "all"
    events = pq.read_table(dataset / "events.parquet").to_pydict()
    raw_item = dict(
        zip(
            *pq.read_table(dataset / "items.parquet", columns=["item", "raw_id"])
            .to_pydict()
            .values(),
            strict=True,
        )
    )
    recommender = flexgr.load(run_dir)
    score_index = {raw: j for j, raw in enumerate(recommender.item_ids)}
    users = np.asarray(events["user"])
    ranks = []
    for user in np.unique(users):
        rows = np.flatnonzero(users == user)
        stamps = np.asarray(events["timestamp"])[rows]
        assert (np.diff(stamps) >= 0).all()  # the prepared order is time order
        items = [raw_item[i] for i in np.asarray(events["item"])[rows]]
        n = len(rows)
        if protocol == "loo-val":
            target = n - 1 if which == "test" else n - 2
            if (which == "test" and n < 2) or (which == "val" and n < 3):
                continue
        else:
            if n < 2:
                continue
            target = n - 1
        first = max(0, target - window)
        scores = recommender.scores(
            items[first:target], stamps[first:target].tolist(), int(stamps[target])
        ).numpy()
        seen = {"all": items[:target], "window": items[first:target], "none": []}[exclude]
        left_out = {score_index[i] for i in seen} - {score_index[items[target]]}
        mine = scores[score_index[items[target]]]
        competing = [j for j in range(len(scores)) if j not in left_out]
        rank = sum(1 for j in competing if scores[j] >= mine) - 1  # minus the target itself
        ranks.append(rank)
    ranks_np = np.asarray(ranks)
    ndcg = np.where(ranks_np < k, 1 / np.log2(ranks_np + 2), 0.0)
    return {f"hr@{k}": float((ranks_np < k).mean()), f"ndcg@{k}": float(ndcg.mean())}, len(
        recommender.item_ids
    )


@pytest.mark.parametrize("protocol", ["loo-val", "gr-compatible"])
def test_flexgr_eval_equals_an_independent_numpy_evaluation(tmp_path: Path, protocol: str) -> None:
    log, catalog = write_log(tmp_path)
    home = tmp_path / "home"
    prepared = run(
        "data",
        "prepare",
        "--path",
        log,
        "--format",
        "csv",
        "--user-col",
        "user",
        "--item-col",
        "item",
        "--time-col",
        "ts",
        "--item-file",
        catalog,
        "--data-dir",
        home,
        "--name",
        "tied",
    )
    assert prepared.exit_code == 0, prepared.output
    config = tmp_path / "run.toml"
    cfg = tiny_config(
        home,
        "data.dataset=tied",
        f"data.protocol={protocol}",
        "data.max_seq_len=8",
        "train.max_epochs=2",
    )
    config.write_text(dump_config(cfg))
    run_dir = tmp_path / f"run-{protocol}"
    trained = run("train", config, "--run-dir", run_dir, "-q")
    assert trained.exit_code == 0, trained.output
    for which in ["test", "val"] if protocol == "loo-val" else ["test"]:
        result = run("eval", "--run-dir", run_dir, "--split", which, "--json")
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout)
        expected, pool = numpy_metrics(home / "tied", run_dir, which)
        # gr-compatible ranks the catalogue (never-rated items too), loo-val the rated items
        assert pool == (ITEMS + UNRATED if protocol == "gr-compatible" else ITEMS)
        for name, value in expected.items():
            assert math.isclose(got[name], value, abs_tol=1e-9), (which, name, got, expected)
        assert 0 < expected["hr@10"] < 1  # a check that can tell a right rank from a wrong one
