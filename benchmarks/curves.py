"""Per-epoch curves of a results grid: how many epochs to train, chosen on validation.

    python benchmarks/curves.py runs/hstu-150 --preset ml-1m-hstu --window 10 --caps 100,150
    python benchmarks/curves.py runs/hstu-150 --preset ml-1m-hstu --test-at 100,150

Reads ``OUT/<preset>.<protocol>.s<seed>/metrics.jsonl`` as ``benchmarks/results.py`` writes them,
or with ``--records TAG`` the flat copies ``OUT/<preset>.<protocol>.s<seed>.TAG.metrics.jsonl``
kept in docs/results/:

    python benchmarks/curves.py docs/results/h100-2026-12-05 --preset ml-1m-hstu --records bf16

- **Validation (loo-val)**: the mean validation NDCG@10 over windows of ``--window`` epochs, per
  seed. A window mean is not a maximum, so a longer run cannot look better by having more
  epochs to pick from; it shows whether the model still improves.
- **Caps**: what a run with ``train.max_epochs = C`` and ``train.patience = --patience`` would have
  selected, replayed from the longer run's curve. With a constant learning rate a shorter run
  follows the same trajectory, so this is the shorter run's selection.
- **Test at fixed epochs (gr-compatible)**: the protocol reports the last epoch, so reading
  epoch E of a longer run is what a run of E epochs reports. Pick E on validation first.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def evals(path: Path, split: str) -> dict[int, dict[str, Any]]:
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["epoch"]: r for r in records
            if r["kind"] == "eval" and r.get("split") == split and not r.get("final")}


def selected(val: dict[int, dict[str, Any]], cap: int, patience: int) -> tuple[int, float]:
    """The epoch and score early stopping on validation NDCG@10 picks with this cap."""
    best_epoch, best, bad = 0, float("-inf"), 0
    for epoch in sorted(e for e in val if e <= cap):
        score = val[epoch]["ndcg@10"]
        if score > best:
            best_epoch, best, bad = epoch, score, 0
        else:
            bad += 1
            if patience and bad >= patience:
                break
    return best_epoch, best


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--caps", default="100,150")
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--test-at", default="100,150")
    parser.add_argument("--records", metavar="TAG", help="flat record copies (see above)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    def metrics(protocol: str, seed: int) -> Path:
        name = f"{args.preset}.{protocol}.s{seed}"
        if args.records:
            return args.out / f"{name}.{args.records}.metrics.jsonl"
        return args.out / name / "metrics.jsonl"

    vals = {s: evals(metrics("loo-val", s), "val") for s in seeds}
    vals = {s: v for s, v in vals.items() if v}
    if vals:
        last = max(max(v) for v in vals.values())
        starts = range(1, last + 1, args.window)
        print(f"loo-val validation NDCG@10, mean over {args.window}-epoch windows")
        print("| seed | " + " | ".join(f"{a}-{a + args.window - 1}" for a in starts) + " |")
        print("|" + " --- |" * (len(starts) + 1))
        for seed, val in vals.items():
            cells = []
            for a in starts:
                window = [val[e]["ndcg@10"] for e in range(a, a + args.window) if e in val]
                cells.append(f"{statistics.fmean(window):.4f}" if window else "")
            print(f"| {seed} | " + " | ".join(cells) + " |")
        print("\n| cap | selected epochs | validation NDCG@10 |\n| --- | --- | --- |")
        for cap in (int(c) for c in args.caps.split(",")):
            picks = [selected(val, cap, args.patience) for val in vals.values()]
            epochs = ", ".join(str(e) for e, _ in picks)
            print(f"| {cap} | {epochs} | {mean_std([score for _, score in picks])} |")

    tests = {s: evals(metrics("gr-compatible", s), "test") for s in seeds}
    tests = {s: t for s, t in tests.items() if t}
    if tests:
        print("\ngr-compatible test at fixed epochs\n| epoch | HR@10 | NDCG@10 | seeds |")
        print("| --- | --- | --- | --- |")
        for epoch in (int(e) for e in args.test_at.split(",")):
            rows = [t[epoch] for t in tests.values() if epoch in t]
            if rows:
                hr = mean_std([r["hr@10"] for r in rows])
                ndcg = mean_std([r["ndcg@10"] for r in rows])
                print(f"| {epoch} | {hr} | {ndcg} | {len(rows)} |")


if __name__ == "__main__":
    main()
