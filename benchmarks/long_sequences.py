"""Long histories on synthetic-long: quality and step time per option, and the longest window.

    python benchmarks/long_sequences.py                  # one H200 (see docs/long-sequences.md)
    python benchmarks/long_sequences.py --small          # CPU smoke run, a couple of minutes

Two measurements (issue 17's grid), printed as markdown tables (--json also writes the rows):

1. **Quality and step time.** The presets synthetic-long-{causal, sl16, sl18, sla, truncate}
   trained on one generated dataset (``--users`` users, lengths log-uniform 256..16,384, cut
   to ``--max-seq-len``) with 3 seeds each. Reported: test HR@10 and NDCG@10 of the epoch
   selected on validation (loo-val), mean and standard deviation over seeds, and the mean
   training step time (epoch training seconds / steps, data loading included) with its spread.
2. **Longest trainable window.** One user of L tokens, one training step (forward, backward,
   AdamW) of HSTU d=512, 8 layers, H=4, dqk=dv=128, bf16, no relative bias, with
   ``train.recompute`` none and layers. L trains when the step succeeds and the peak memory the
   allocator reserved stays within ``--mem-cap-gib`` (8 GiB, as benchmarks/distributed.py);
   L grows by 1.5x, then a binary search narrows it to ``--search-step`` tokens. On the CPU
   (--small) nothing measures device memory: the stand-in criterion is the bytes autograd saves
   for backward (saved-tensor hooks) within ``--cpu-saved-mib``, on a small model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexgr.batch import JaggedBatch
from flexgr.data import prepare
from flexgr.model import HSTU, HSTUConfig, encode
from flexgr.train import apply_overrides, fit, load_preset
from flexgr.train.recompute import apply_recompute
from flexgr.train.rundir import RunDir

GIB = 1 << 30
OPTIONS = ("causal", "sl16", "sl18", "sla", "truncate")


def quality_grid(args: argparse.Namespace, home: Path, work: Path) -> list[dict]:
    rows = []
    for option in args.options.split(","):
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            over = [f"data.data_dir={home}", f"data.max_seq_len={args.max_seq_len}",
                    f"train.seed={seed}", f"train.max_epochs={args.epochs}", *args.set]
            if args.small:
                over += ["model.d_model=16", "model.num_layers=2", "model.num_heads=2",
                         "model.dqk=8", "model.dv=8", "model.sla_local=16", "model.sla_global=16",
                         "model.truncate_after=1", "model.truncate_len=16", "train.batch_size=8",
                         "train.num_negatives=16", "eval.batch_size=64", "train.num_workers=0"]
            cfg = apply_overrides(load_preset(f"synthetic-long-{option}"), over)
            run_dir = work / f"{option}-{seed}"
            result = fit(cfg, run_dir, console=Console(quiet=True), show_progress=False)
            records = RunDir(run_dir).read_metrics()
            epochs = [r for r in records if r["kind"] == "epoch"]
            steps = [r["step"] for r in epochs]
            per_epoch = [b - a for a, b in zip([0, *steps], steps)]
            # The first epoch holds the kernels' compiles for new tile configurations; the step
            # time is the median over the later epochs (the only epoch when there is one).
            epoch_step_s = [r["train_s"] / max(n, 1) for r, n in zip(epochs, per_epoch)]
            step_s = statistics.median(epoch_step_s[1:] or epoch_step_s) if epoch_step_s else 0.0
            # The training loss at every record (thinned to <= 24 points): the FP8-vs-bf16
            # loss-curve comparison reads these.
            losses = [r["loss"] for r in records
                      if r["kind"] == "train" and r.get("loss") is not None]
            curve = losses[:: max(1, -(-len(losses) // 24))]
            first_ms = 1e3 * epoch_step_s[0] if epoch_step_s else 0.0
            runs.append({"seed": seed, "loss_curve": curve, "hr@10": result.test["hr@10"],
                         "ndcg@10": result.test["ndcg@10"], "step_ms": 1e3 * step_s,
                         "first_epoch_step_ms": first_ms, "epoch": result.epoch})
        row = summarise(option, runs)
        rows.append(row)
        print(f"  {option}: hr@10 {row['hr@10']:.4f} +- {row['hr@10_std']:.4f}", flush=True)
    return rows


def summarise(option: str, runs: list[dict]) -> dict:
    """One option's row: mean and sample standard deviation over its runs (seeds)."""
    row: dict = {"option": option, "seeds": len(runs)}
    for key in ("hr@10", "ndcg@10", "step_ms"):
        values = [r[key] for r in runs]
        row[key] = statistics.mean(values)
        row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["runs"] = runs
    return row


def print_quality(rows: list[dict]) -> None:
    print("\n| option | HR@10 | NDCG@10 | step ms | seeds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['option']} | {r['hr@10']:.4f} +- {r['hr@10_std']:.4f} | "
              f"{r['ndcg@10']:.4f} +- {r['ndcg@10_std']:.4f} | "
              f"{r['step_ms']:.1f} +- {r['step_ms_std']:.1f} | {r['seeds']} |")


def merge(paths: list[Path]) -> list[dict]:
    """The quality rows of several --json files (one per seed range), runs pooled by option."""
    pooled: dict[str, dict[object, dict]] = {}
    for path in paths:
        for row in json.loads(path.read_text()).get("quality", []):
            for run in row["runs"]:  # by seed: overlapping files must not count a run twice
                pooled.setdefault(row["option"], {})[run.get("seed")] = run
    return [summarise(option, list(runs.values())) for option, runs in pooled.items()]


def step_fits(L: int, recompute: str, args: argparse.Namespace, device: torch.device) -> bool:
    """One training step of one L-token user within the memory criterion."""
    small = args.small
    cfg = HSTUConfig(
        num_items=1000, d_model=32 if small else 512, num_layers=2 if small else 8,
        num_heads=2 if small else 4, dqk=16 if small else 128, dv=16 if small else 128,
        max_seq_len=L, rel_bias=False, dropout=0.0, input_dropout=0.0,
    )
    torch.manual_seed(0)
    model = apply_recompute(HSTU(cfg).to(device), recompute)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 1001, (L,), device=device)
    offsets = torch.tensor([0, L], device=device)
    batch = JaggedBatch(ids, offsets, torch.arange(L, device=device) * 60, None)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with hooks, autocast:
            loss = encode(model, batch).float().square().mean()
        loss.backward()
        opt.step()
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del opt, model
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) <= args.mem_cap_gib * GIB
    return saved[0] <= args.cpu_saved_mib * (1 << 20)


def longest_window(recompute: str, args: argparse.Namespace, device: torch.device) -> int:
    good, L = 0, args.search_start
    while L <= args.max_length and step_fits(L, recompute, args, device):
        good, L = L, int(L * 1.5) // args.search_step * args.search_step
    if L > args.max_length:
        return good  # the search's ceiling, not the memory's: reported as ">= good"
    bad = L
    while bad - good > args.search_step:
        mid = (good + bad) // 2 // args.search_step * args.search_step
        if mid <= good:
            break
        good, bad = (mid, bad) if step_fits(mid, recompute, args, device) else (good, mid)
    return good


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU smoke run (tiny everything)")
    parser.add_argument("--users", type=int, default=0, help="users of synthetic-long")
    parser.add_argument("--max-seq-len", type=int, default=0, help="training window")
    parser.add_argument("--epochs", type=int, default=0, help="max epochs per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are first-seed .. first-seed + seeds - 1 "
                        "(split a grid over processes)")
    parser.add_argument("--options", default=",".join(OPTIONS),
                        help="comma list of presets synthetic-long-OPTION "
                        f"(default: {','.join(OPTIONS)})")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--mem-cap-gib", type=float, default=8.0)
    parser.add_argument("--cpu-saved-mib", type=float, default=4.0)
    parser.add_argument("--search-start", type=int, default=0)
    parser.add_argument("--search-step", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=0, help="search ceiling (tokens)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-length", action="store_true")
    parser.add_argument("--data-dir", type=Path, help="where to prepare the data (default: tmp)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="only pool the quality rows of these --json files and print them")
    args = parser.parse_args()
    if args.merge:
        rows = merge(args.merge)
        print_quality(rows)
        if args.json:
            args.json.write_text(json.dumps({"quality": rows}, indent=2))
        return
    small = args.small
    args.users = args.users or (24 if small else 2048)
    args.max_seq_len = args.max_seq_len or (64 if small else 16384)
    args.epochs = args.epochs or (1 if small else 10)
    args.search_start = args.search_start or (64 if small else 16384)
    args.search_step = args.search_step or (32 if small else 2048)
    args.max_length = args.max_length or (2048 if small else 262144)
    device = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        home = args.data_dir or Path(tmp) / "data"
        if not args.skip_quality:
            params = {"users": args.users}
            if small:
                params.update(min_length=32, max_length=128, items=500, categories=10)
            start = time.perf_counter()
            prepare("synthetic-long", synthetic=params, data_dir=home, progress=False)
            print(f"prepared synthetic-long {params} in {time.perf_counter() - start:.1f} s")
            out["quality"] = quality_grid(args, home, Path(tmp) / "runs")
            print_quality(out["quality"])
        if not args.skip_length:
            out["longest"] = {mode: longest_window(mode, args, device)
                              for mode in ("none", "layers")}
            cap = (f"peak reserved <= {args.mem_cap_gib:g} GiB" if device.type == "cuda"
                   else f"CPU stand-in: saved activations <= {args.cpu_saved_mib:g} MiB")
            print(f"\n| recompute | longest trainable window ({cap}) |\n|---|---|")
            for mode, L in out["longest"].items():
                ceiling = " (the search ceiling)" if 1.5 * L > args.max_length else ""
                print(f"| {mode} | {L:,} tokens{ceiling} |")
            ratio = out["longest"]["layers"] / max(out["longest"]["none"], 1)
            print(f"ratio layers / none: {ratio:.2f}x")
    print(f"device: {out['device']}, torch {out['torch']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
