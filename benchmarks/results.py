"""Train a grid of presets x protocols x seeds, then report mean +- std of the test metrics.

    python benchmarks/results.py --out runs/results                  # the README table
    python benchmarks/results.py --out runs/results --jobs 6 --presets ml-1m-hstu
    python benchmarks/results.py --out runs/results --summary-only   # just the table

Each run is a plain ``flexgr train`` in ``OUT/<preset>.<protocol>.s<seed>`` (its command is in
``OUT/logs/<run>.cmd``); up to ``--jobs`` of them run at once, which is how several small
ML-1M runs share one GPU. The grid is resumable: finished runs are kept, runs with a
checkpoint continue with ``--resume``, and the rest start. The table (markdown, stdout) and
``OUT/summary.json`` hold, per preset and protocol, the mean and sample standard deviation over
the seeds of every final test metric, the selected epoch, and the wall time per run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from process_pool import run_at_most  # benchmarks/process_pool.py

from flexgr.atomic import atomic_write_text

METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")


def run_name(preset: str, protocol: str, seed: int) -> str:
    return f"{preset}.{protocol}.s{seed}"


def final_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    final = None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("final"):
            final = record
    return final


def command(preset: str, protocol: str, seed: int, run_dir: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "flexgr", "train", "--preset", preset, "-q"]
    for value in (f"data.protocol={protocol}", f"train.seed={seed}", *sets):
        cmd += ["--set", value]
    cmd += ["--run-dir", str(run_dir)]
    if (run_dir / "checkpoints" / "last.pt").is_file():
        cmd.append("--resume")
    return cmd


def run_grid(args: argparse.Namespace, grid: list[tuple[str, str, int]]) -> None:
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = [g for g in grid if final_record(args.out / run_name(*g)) is None]
    print(
        f"{len(grid) - len(pending)} of {len(grid)} runs done; starting {len(pending)}", flush=True
    )
    runs = []
    for preset, protocol, seed in pending:
        name = run_name(preset, protocol, seed)
        cmd = command(preset, protocol, seed, args.out / name, args.sets)
        (logs / f"{name}.cmd").write_text(" ".join(cmd) + "\n")
        runs.append((name, cmd, logs / f"{name}.log"))

    def record_wall(name: str, returncode: int, seconds: float) -> None:
        wall = {"wall_s": seconds, "returncode": returncode}
        walls = logs / f"{name}.wall.json"
        previous = json.loads(walls.read_text()) if walls.is_file() else {"wall_s": 0.0}
        wall["wall_s"] += previous["wall_s"]  # a resumed run adds its earlier part
        atomic_write_text(walls, json.dumps(wall) + "\n")
        print(f"{name}: exit {returncode} after {wall['wall_s']:.0f} s", flush=True)

    run_at_most(runs, args.jobs, record_wall)


SELECTION_KEYS = ("val_ndcg@10", "val_hr@10", "max_test_hr@10", "max_test_ndcg@10")


def selection_values(records: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, float]:
    """What chose the run's epoch, and what a test-reading trainer would have reported.

    loo-val: the validation HR@10 / NDCG@10 of the selected epoch (settings are compared on
    these, never on test). gr-compatible evaluates test after every epoch and reports the last;
    the best of those per-epoch test values is the number a trainer that reads test every epoch
    and keeps the best would print (the reference's logs allow that reading): a diagnostic of
    how much such a reading inflates a result, never a result."""
    evals = [r for r in records if r["kind"] == "eval" and not r.get("final")]
    out: dict[str, float] = {}
    val = [r for r in evals if r["split"] == "val" and r["epoch"] == final["epoch"]]
    if val:
        out["val_hr@10"], out["val_ndcg@10"] = val[-1]["hr@10"], val[-1]["ndcg@10"]
    test = [r for r in evals if r["split"] == "test"]
    if test and not val:
        out["max_test_hr@10"] = max(r["hr@10"] for r in test)
        out["max_test_ndcg@10"] = max(r["ndcg@10"] for r in test)
    return out


def summarize(out: Path, grid: list[tuple[str, str, int]]) -> dict[str, Any]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for preset, protocol, seed in grid:
        name = run_name(preset, protocol, seed)
        final = final_record(out / name)
        if final is None:
            continue
        walls = out / "logs" / f"{name}.wall.json"
        record = dict(final, seed=seed)
        record["wall_s"] = json.loads(walls.read_text())["wall_s"] if walls.is_file() else None
        records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        record["train_s"] = sum(r.get("train_s", 0.0) for r in records if r["kind"] == "epoch")
        record["eval_s"] = sum(r.get("eval_s", 0.0) for r in records if r["kind"] == "eval")
        record.update(selection_values(records, final))
        groups.setdefault((preset, protocol), []).append(record)
    summary = {}
    for (preset, protocol), records in groups.items():
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in records]}
        for key in (*METRICS, "epoch", "wall_s", "train_s", "eval_s", *SELECTION_KEYS):
            values = [float(r[key]) for r in records if r.get(key) is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else float("nan")
                entry[key] = {"mean": statistics.fmean(values), "std": std, "values": values}
        summary[f"{preset} {protocol}"] = entry
    return summary


def cell(entry: dict[str, Any], name: str, digits: int = 4) -> str:
    """``.3287 ± .0032`` (the std left out for one seed); whole numbers for ``digits=0``."""
    if name not in entry:
        return "-"
    mean, std = entry[name]["mean"], entry[name]["std"]
    if digits == 0:
        return f"{mean:.0f}"
    text = f"{mean:.{digits}f}".lstrip("0")
    return text + ("" if math.isnan(std) else f" ± {std:.{digits}f}".replace(" 0.", " ."))


def table(summary: dict[str, Any]) -> str:
    head = "| preset | protocol | seeds | epoch | " + " | ".join(METRICS) + " | val ndcg@10 | wall s |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for key, entry in summary.items():
        preset, protocol = key.split(" ")
        cells = [f"`{preset}`", protocol, str(len(entry["seeds"])), cell(entry, "epoch", 0)]
        cells += [cell(entry, m) for m in METRICS]
        cells += [cell(entry, "val_ndcg@10"), cell(entry, "wall_s", 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", default="ml-1m-sasrec,ml-1m-hstu,ml-1m-hstu-large")
    parser.add_argument("--protocols", default="loo-val,gr-compatible")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--jobs", type=int, default=6, help="runs at once")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    grid = [
        (preset, protocol, int(seed))
        for preset in args.presets.split(",")
        for protocol in args.protocols.split(",")
        for seed in args.seeds.split(",")
    ]
    if not args.summary_only:
        run_grid(args, grid)
    summary = summarize(args.out, grid)
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(table(summary))


if __name__ == "__main__":
    main()
