"""The ceiling and floors of synthetic-ranking: oracle and baseline NE/AUC on a preset's requests.

    flexgr data prepare synthetic-ranking                 # once (about 10 s)
    python benchmarks/synthetic_oracle.py                 # test requests of synthetic-ranking-hstu
    python benchmarks/synthetic_oracle.py --split val --set data.data_dir=/tmp/home --json

Regenerates the prepared dataset's stream from its meta.json (same digest, same events), takes
the impressions of the preset's ``loo-val`` split (``--split``, default test) exactly as
training and ``flexgr eval`` do, and prints one row per predictor (flexgr.ranking.synthetic_oracle):

- ``oracle``: P(rating | noiseless score), the Bayes-optimal forecast; no model can beat it, so
  a trained model with a lower ``ne:like`` on the same requests has a bug (a label leak);
- ``static``: knows b_item + b_user + mu_u . v_i, the best one fixed vector per user and item;
- ``user+item bias`` and ``item bias``: the two simple floors.

It also prints the share of the impressions whose item occurs in the request's history window
(``data.max_seq_len``): where an earlier rating of the same item is there to read. The dataset
is not prepared here (a default prepare over a copy made with other sizes would replace it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = ["ne:like", "auc:like", "gauc:like", "ne:dislike", "auc:dislike", "mse:rating"]


def oracle_lines(cfg: Any, which: str = "test") -> list[dict[str, Any]]:
    """One dict per predictor (``model`` names it) with the metrics of ``COLUMNS`` and more, on
    the requests of config ``cfg``'s dataset; DataError where it is not a rated synthetic one."""
    from flexgr.data import load_prepared, read_meta
    from flexgr.ranking.synthetic_oracle import candidates_in_history, oracle_metrics, stream_of

    data_dir = cfg.data.data_dir or None
    meta = read_meta(cfg.data.dataset, data_dir=data_dir)
    data = load_prepared(cfg.data.dataset, data_dir=data_dir)
    stream = stream_of(meta)
    coverage = candidates_in_history(cfg, data, which)  # type: ignore[arg-type]
    lines = []
    for name, metrics in oracle_metrics(cfg, data, stream, which).items():  # type: ignore[arg-type]
        line = {"dataset": cfg.data.dataset, "model": name, "split": which}
        line["impressions"] = int(metrics.pop("impressions"))
        line["candidates_in_history"] = coverage
        lines.append({**line, **metrics})
    return lines


def table(lines: list[dict[str, Any]]) -> str:
    rows = ["| predictor | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for line in lines:
        cells = [f"{line[key]:.4f}" for key in COLUMNS]
        rows.append(f"| {line['model']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="synthetic-ranking-hstu")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--set", action="append", default=[], help="a config override")
    parser.add_argument("--json", action="store_true", help="one JSON line per predictor")
    args = parser.parse_args()

    from flexgr.data import DataError
    from flexgr.train.config import apply_overrides, load_preset

    cfg = apply_overrides(load_preset(args.preset), args.set)
    start = time.perf_counter()
    try:
        lines = oracle_lines(cfg, args.split)
    except DataError as err:
        sys.exit(f"error: {err}")
    if args.json:
        for line in lines:
            print(json.dumps(line))
        return
    first = lines[0]
    print(f"{cfg.data.dataset}, {args.split} requests of {args.preset}: "
          f"{first['impressions']:,} impressions, like rate {first['rate:like']:.4f}; "
          f"{first['candidates_in_history']:.1%} of their items in the last "
          f"{cfg.data.max_seq_len} events ({time.perf_counter() - start:.1f} s)")  # fmt: skip
    print(table(lines))


if __name__ == "__main__":
    main()
