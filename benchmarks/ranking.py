"""Ranking measurements: the ML-1M model grid, and ROO against impression-level examples.

    python benchmarks/ranking.py grid --device cuda --epochs 40 --jobs 12  # ML-1M, 4 models x 3 seeds
    python benchmarks/ranking.py grid --device cpu --small                 # ML-100K, tiny, minutes
    python benchmarks/ranking.py grid --dataset synthetic-ranking --device cuda --jobs 12
    python benchmarks/ranking.py roo --device cpu                           # k = 1 .. 32, synthetic

``grid`` trains hstu-ranking (interleaved and merged), sasrec-ranking and two-tower-ranking on
the ``ml-1m-*ranking`` presets (``--small``: the ``ml-100k`` ones, tiny widths, one short epoch)
for seeds 42 43 44, and prints one JSON line per run: the test metrics of the epoch selected on
validation (NE, AUC, GAUC per BCE task, MSE for rating), the selected epoch and the mean train
step time. Runs go to ``--out`` (default runs/ranking-grid); a finished run is kept and reread.
On a machine with a time limit, ``--set train.max_minutes=M`` stops each run after M minutes
and still tests it at the epoch selected so far (its line says ``"stop": "max_minutes"``), so
a grid cut by the limit reports instead of losing its unfinished runs.

``--dataset synthetic-ranking`` runs the ``synthetic-ranking-*`` presets instead (prepare the
dataset first: ``flexgr data prepare synthetic-ranking``): hstu-merged, two-tower, gesr and
vista, all four by default (issue 19's comparison); hstu-interleaved and sasrec have no
synthetic preset and are refused when named. Its runs go to runs/synthetic-ranking-grid, and
the grid adds the oracle and baseline lines of the same test requests
(benchmarks/synthetic_oracle.py) as rows of the table: the ceiling and the floors.

``roo`` builds synthetic requests with k impressions each (k in 1 2 4 8 16 32) after histories of
``--history`` events and, for each k, trains the same HSTU ranking model from the same weights on
the same impressions per step, once as ROO sequences (history once per request) and once as
impression-level sequences (history repeated); it prints one JSON line per k: bytes of the
examples per impression, impressions trained per second in both layouts (same run, same
machine) and their ratio, and NE/AUC of both on held-out requests. Dropout is off, so the two
layouts take the same optimisation path: the NE/AUC columns check that they do.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

GRID = [
    ("hstu-interleaved", "ranking", ["model.layout=interleaved"]),
    ("hstu-merged", "ranking", ["model.layout=merged"]),
    ("sasrec", "sasrec-ranking", []),
    ("two-tower", "two-tower-ranking", []),
    # Run only when named (--models gesr vista): issue 19's ML-1M comparison against two-tower.
    ("gesr", "gesr-ranking", []),
    ("vista", "vista-ranking", []),
]
OPTIONAL = {"gesr", "vista"}
DATASETS = ("ml-1m", "synthetic-ranking")
# The synthetic-ranking presets of the grid's models (docs/data.md); the others have none.
SYNTHETIC_PRESETS = {
    "hstu-merged": "hstu",
    "two-tower": "two-tower",
    "gesr": "gesr",
    "vista": "vista",
}


def selected(name: str, models: list[str], dataset: str = "ml-1m") -> bool:
    """Whether the grid runs ``name``: named in --models, or by default when not optional (on
    synthetic-ranking: every model with a preset)."""
    if dataset == "synthetic-ranking":
        return name in SYNTHETIC_PRESETS and (name in models if models else True)
    return name in models if models else name not in OPTIONAL


def preset_of(dataset: str, name: str, preset_tail: str) -> str:
    if dataset == "synthetic-ranking":
        return f"{dataset}-{SYNTHETIC_PRESETS[name]}"
    return f"{dataset}-{preset_tail}"


def check_models(args: argparse.Namespace) -> None:
    """One-line exit for a model the dataset has no preset for, or an unknown name."""
    known = [name for name, _, _ in GRID]
    for name in args.models:
        if name not in known:
            sys.exit(f"error: unknown model {name!r} (grid models: {', '.join(known)})")
        if args.dataset == "synthetic-ranking" and name not in SYNTHETIC_PRESETS:
            sys.exit(
                f"error: {name} has no synthetic-ranking preset (synthetic-ranking models: "
                f"{', '.join(SYNTHETIC_PRESETS)})"
            )
    if args.dataset == "synthetic-ranking" and args.small:
        sys.exit("error: --small is ML-100K; shrink synthetic-ranking with --set instead")


SMALL = {
    "ranking": ["model.d_model=16", "model.dqk=16", "model.dv=16", "model.head_hidden=16"],
    "sasrec-ranking": ["model.d_model=16", "model.ffn_dim=16", "model.head_hidden=16"],
    "two-tower-ranking": ["model.d_model=16", "model.hidden=32"],
}
SMALL_COMMON = ["data.max_seq_len=20", "ranking.sample_per_user=1", "train.log_every=5"]


class StepTimer:
    """A fit callback: wall time between training records, over the steps they cover.

    ``step_s`` is the median over those intervals of seconds per step: the Triton kernels compile
    once per new tile configuration (packed-length bucket) inside the first intervals, and a mean
    would count those compiles as step time (a 3-epoch run's mean was 13x its median)."""

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None
        self.intervals: list[tuple[float, int]] = []  # (seconds, steps) between train records

    def on_log(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "setup":
            self.last = (time.perf_counter(), 0)
        elif record.get("kind") == "train":
            now = time.perf_counter()
            if self.last is not None and record["step"] > self.last[1]:
                self.intervals.append((now - self.last[0], record["step"] - self.last[1]))
            self.last = (now, record["step"])  # after an evaluation: the clock restarts here
        elif record.get("kind") == "eval":
            self.last = None  # evaluation time is not step time

    @property
    def step_s(self) -> float:
        """Median seconds per step over the intervals (0 when none was timed)."""
        per_step = [seconds / steps for seconds, steps in self.intervals]
        return statistics.median(per_step) if per_step else 0.0

    @property
    def mean_step_s(self) -> float:
        """Total timed seconds over total timed steps: compiles included."""
        steps = sum(n for _, n in self.intervals)
        return sum(t for t, _ in self.intervals) / max(steps, 1)

    def on_epoch_end(self, state: Any, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, state: Any) -> None: ...


def grid(args: argparse.Namespace) -> None:
    from rich.console import Console

    from flexgr.train.config import apply_overrides, load_preset
    from flexgr.train.loop import fit

    dataset = "ml-100k" if args.small else args.dataset
    out = Path(args.out)
    if args.jobs > 1:
        run_in_processes(args, out)
        return
    for name, preset_tail, extra in GRID:
        if not selected(name, args.models, args.dataset):
            continue
        for seed in args.seeds:
            run_dir = out / f"{dataset}.{name}.s{seed}"
            summary = run_dir / "benchmark.json"
            if summary.is_file():
                print(summary.read_text().strip(), flush=True)
                continue
            overrides = [*extra, f"train.seed={seed}", f"train.device={args.device}"]
            overrides.append(f"train.max_epochs={args.epochs}")
            if args.small:
                overrides += SMALL_COMMON + SMALL.get(preset_tail, [])
            overrides += args.set  # last, so they win
            if args.data_dir:
                overrides.append(f"data.data_dir={args.data_dir}")
            cfg = apply_overrides(load_preset(preset_of(dataset, name, preset_tail)), overrides)
            timer = StepTimer()
            start = time.perf_counter()
            result = fit(
                cfg, run_dir, console=Console(quiet=True), show_progress=False, callbacks=[timer]
            )
            line = {
                "dataset": dataset,
                "model": name,
                "seed": seed,
                "device": args.device,
                "epoch": result.epoch,
                "steps": result.steps,
                "stop": result.stop_reason,
                "step_s": timer.step_s,
                "mean_step_s": timer.mean_step_s,
                "wall_s": time.perf_counter() - start,
                **{
                    k: v
                    for k, v in result.test.items()
                    if k.split(":")[0] in ("ne", "auc", "gauc", "mse")
                },
            }
            text = json.dumps(line)
            summary.write_text(text + "\n")
            print(text, flush=True)


def run_in_processes(args: argparse.Namespace, out: Path) -> None:
    """The grid's runs as ``--jobs`` processes at once (one run each, this script with
    ``--jobs 1``), then every run's line and the mean/std table. Runs sharing a device time
    each other's steps: their ``step_s`` is a shared-device figure, not one run alone."""
    from process_pool import run_at_most  # benchmarks/process_pool.py

    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name, _, _ in GRID:
        if not selected(name, args.models, args.dataset):
            continue
        for seed in args.seeds:
            command = [sys.executable, __file__, "grid", "--jobs", "1", "--models", name]
            command += ["--dataset", args.dataset]
            command += ["--seeds", str(seed), "--device", args.device, "--out", str(out)]
            command += ["--epochs", str(args.epochs)] + (["--small"] if args.small else [])
            command += ["--data-dir", args.data_dir] if args.data_dir else []
            command += [f"--set={override}" for override in args.set]
            runs.append((f"{name}.s{seed}", command, out / f"{name}.s{seed}.log"))
    run_at_most(runs, args.jobs)
    if args.dataset == "synthetic-ranking":
        write_oracle_lines(args, out)
    summarise(out)


def write_oracle_lines(args: argparse.Namespace, out: Path) -> None:
    """The oracle and baselines on the grid's test requests, as runs of their own in ``out``
    (``{dataset}.{predictor}/benchmark.json``), so the table shows them beside the models."""
    from synthetic_oracle import oracle_lines  # benchmarks/synthetic_oracle.py

    from flexgr.train.config import apply_overrides, load_preset

    # The requests depend on [data] and [ranking] only; a model override may not fit HSTU.
    overrides = [o for o in args.set if o.startswith(("data.", "ranking."))]
    overrides += [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    cfg = apply_overrides(load_preset(preset_of(args.dataset, "hstu-merged", "")), overrides)
    for line in oracle_lines(cfg, "test"):
        line["model"] = f"({line['model']})"  # not a trained model
        summary = out / f"{args.dataset}.{line['model'].strip('()').replace(' ', '-')}"
        summary.mkdir(parents=True, exist_ok=True)
        text = json.dumps(line)
        (summary / "benchmark.json").write_text(text + "\n")
        print(text, flush=True)


def summarise(out: Path) -> None:
    """Mean and standard deviation over seeds of each model's test metrics and step time."""
    import statistics

    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*/benchmark.json")):
        line = json.loads(path.read_text())
        rows.setdefault(line["model"], []).append(line)
    keys = ["ne:like", "auc:like", "gauc:like", "ne:dislike", "auc:dislike", "mse:rating"]
    # The stop reasons: a mean over runs that train.max_minutes cut is not a converged number.
    print("| model | seeds | " + " | ".join(keys) + " | step ms | stops |")
    print("| --- | --- |" + " --- |" * (len(keys) + 2))
    for model, lines in rows.items():
        cells = []
        for key in [*keys, "step_s"]:
            values = [float(x[key]) * (1000 if key == "step_s" else 1) for x in lines if key in x]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            digits = 2 if key == "step_s" else 4
            cells.append(
                f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}" if values else "-"
            )
        stops = [x["stop"] for x in lines if "stop" in x]
        cells.append(
            ", ".join(f"{stop} x{stops.count(stop)}" for stop in sorted(set(stops))) or "-"
        )
        print(f"| {model} | {len(lines)} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------- ROO vs impression level


def synthetic_requests(users: int, k: int, history: int, requests_per_user: int, seed: int):
    """A log where each user has ``history`` events and then ``requests_per_user`` requests
    of k impressions (one timestamp each); ratings depend on user and item taste vectors, so
    the labels are learnable."""
    from flexgr.data import RawEvents, build_interactions

    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    items = 500
    taste_u, taste_i = np_rng.normal(size=(users, 4)), np_rng.normal(size=(items + 1, 4))
    cols: dict[str, list] = {"u": [], "i": [], "t": [], "r": []}
    for u in range(users):
        ts = 1_000_000
        for event in range(history + requests_per_user * k):
            if event < history or (event - history) % k == 0:
                ts += rng.randint(60, 4000)  # a request's impressions share its timestamp
            item = rng.randrange(1, items + 1)
            affinity = float(taste_u[u] @ taste_i[item])
            cols["u"].append(f"u{u}")
            cols["i"].append(f"i{item}")
            cols["t"].append(ts)
            cols["r"].append(float(np.clip(np.rint(3 + affinity + rng.gauss(0, 0.7)), 1, 5)))
    raw = RawEvents.from_lists(cols["u"], cols["i"], cols["t"], cols["r"])
    return build_interactions("synthetic-requests", raw)


def roo(args: argparse.Namespace) -> None:
    from flexgr.model.registry import build_model, spec_of
    from flexgr.ranking import RankingConfig, build_requests, split_requests
    from flexgr.ranking.batch import RankingEvents, impression_batch, request_batch
    from flexgr.ranking.metrics import auc, normalized_entropy
    from flexgr.ranking.requests import impressions_of
    from flexgr.ranking.tasks import action_codes, action_vocab, parse_tasks, task_losses

    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for k in args.ks:
        data = synthetic_requests(args.users, k, args.history, args.requests, seed=k)
        cfg = RankingConfig(
            tasks=["like"],
            requests="timestamp",
            request_size=k,
            min_history=args.history,
            metric="ne:like",
        )
        tasks = parse_tasks(cfg.tasks)
        events = RankingEvents.of(data, cfg.action_inputs, tasks)
        requests = build_requests(data, cfg, args.history)
        split = split_requests(requests)
        options = {
            "num_items": data.num_items,
            "max_seq_len": args.history,
            "action_inputs": ["rating"],
            "action_vocab": action_vocab(["rating"], action_codes(["rating"], data), "categorical"),
            "tasks": ["like"],
            "task_kinds": ["bce"],
            "d_model": args.d_model,
            "dqk": args.d_model,
            "dv": args.d_model,
            "dropout": 0.0,
            "input_dropout": 0.0,
        }
        train = split.train
        per_step = max(1, args.impressions_per_step // k)  # requests per step
        row = {"k": k, "device": args.device, "train_impressions": int(requests.sizes[train].sum())}
        row["history"] = args.history
        layouts = ("request", "impression")
        runs: dict[str, dict[str, Any]] = {}
        for layout in layouts:
            torch.manual_seed(0)  # the same initial weights in both layouts
            model = build_model("hstu-ranking", options).to(device)
            batches = []
            for start in range(0, len(train), per_step):
                rows = train[start : start + per_step]
                if layout == "request":
                    batches.append(request_batch(events, requests, rows))
                else:
                    r, e = impressions_of(requests.take(rows))
                    batches.append(impression_batch(events, requests, rows[r], e))
            runs[layout] = {
                "model": model,
                "opt": torch.optim.Adam(model.parameters(), lr=1e-3),
                "batches": batches,
                "seconds": 0.0,
            }
        count = len(runs["request"]["batches"])
        # Enough passes for args.min_steps timed steps; the two layouts' steps alternate, so
        # both see the same machine (a shared CPU's load moves over minutes).
        epochs = max(args.epochs, -(-(args.min_steps + 1) // count))
        for epoch in range(epochs):
            for index in range(count):
                for layout in layouts:
                    run = runs[layout]
                    model, batch = run["model"], run["batches"][index].to(device)
                    start = time.perf_counter()
                    logits = model(batch, spec_of(model).prepare(model, batch))
                    loss = task_losses(logits.float(), batch.labels, batch.known, ["bce"]).sum()
                    run["opt"].zero_grad()
                    (loss / batch.num_candidates).backward()
                    run["opt"].step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if epoch > 0 or index > 0:  # the first step (allocations) is not timed
                        run["seconds"] += time.perf_counter() - start
        results = {}
        for layout in layouts:
            run = runs[layout]
            model, batches = run["model"], run["batches"]
            stored = sum(
                b.nbytes() - b.labels.nbytes - b.known.nbytes - b.users.nbytes for b in batches
            )
            impressions = sum(b.num_candidates for b in batches)
            timed = impressions * epochs - batches[0].num_candidates
            model.eval()
            with torch.no_grad():
                test = request_batch(events, requests, split.test).to(device)
                p = torch.sigmoid(model(test, spec_of(model).prepare(model, test))[:, 0])
            y = test.labels[:, 0].numpy()
            results[layout] = {
                "bytes_per_impression": stored / impressions,
                "impressions_per_s": timed / run["seconds"],
                "ne": normalized_entropy(p.cpu().numpy(), y),
                "auc": auc(p.cpu().numpy(), y),
            }
        row["steps"] = epochs * count
        for layout, values in results.items():
            for key, value in values.items():
                row[f"{layout}_{key}"] = value
        row["bytes_ratio"] = (
            results["impression"]["bytes_per_impression"]
            / results["request"]["bytes_per_impression"]
        )
        row["speedup"] = (
            results["request"]["impressions_per_s"] / results["impression"]["impressions_per_s"]
        )
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="ML-1M (or --small ML-100K) ranking grid, 3 seeds")
    g.add_argument("--dataset", choices=DATASETS, default="ml-1m", help="the preset family")
    g.add_argument("--device", default="auto")
    g.add_argument("--epochs", type=int, default=40, help="train.max_epochs (early stopping on)")
    g.add_argument("--small", action="store_true", help="ML-100K, tiny models, CPU minutes")
    g.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    g.add_argument(
        "--out", default="", help="default runs/ranking-grid, runs/synthetic-ranking-grid"
    )
    g.add_argument("--data-dir", default="", help="data.data_dir (default $FLEXGR_HOME)")
    g.add_argument("--models", nargs="+", default=[], help="a subset of the grid's model names")
    g.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process")
    g.add_argument("--set", action="append", default=[], help="a config override for every run")
    r = sub.add_parser("roo", help="ROO vs impression-level on synthetic requests")
    r.add_argument("--device", default="cpu")
    r.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    r.add_argument("--users", type=int, default=32)
    r.add_argument("--history", type=int, default=32)
    r.add_argument("--requests", type=int, default=6, help="requests per user (2 held out)")
    r.add_argument("--impressions-per-step", type=int, default=64)
    r.add_argument("--epochs", type=int, default=1, help="at least this many passes")
    r.add_argument("--min-steps", type=int, default=8, help="timed steps per layout, at least")
    r.add_argument("--d-model", type=int, default=32)
    args = parser.parse_args()
    if args.command == "grid":
        check_models(args)
        if args.small and args.epochs == 40:
            args.epochs = 1
        if not args.out:
            synthetic = args.dataset == "synthetic-ranking"
            args.out = "runs/synthetic-ranking-grid" if synthetic else "runs/ranking-grid"
        grid(args)
        if args.jobs == 1 and not args.models:
            if args.dataset == "synthetic-ranking":
                write_oracle_lines(args, Path(args.out))
            summarise(Path(args.out))
    else:
        roo(args)


if __name__ == "__main__":
    main()
