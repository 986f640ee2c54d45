"""Where a ranking preset's training step spends its time: building the batch on the host,
copying it to the device, the model's per-batch ``prepare``, and the whole step.

    python benchmarks/ranking_step.py --preset synthetic-ranking-gesr --device cuda
    python benchmarks/ranking_step.py --preset synthetic-ranking-hstu --device cuda --profile
    python benchmarks/ranking_step.py --preset ml-100k-gesr-ranking --device cpu --steps 5

Runs the ranking trainer's own path (``RankingTrainer``: its batches, autocast, loss and AdamW)
in a throw-away run directory. ``--warmup`` steps first (compiles, tile tuning), then each part
is timed over ``--steps`` batches with the device synchronised around it, and the median per
batch is reported. ``step`` includes ``prepare``; ``build`` and ``copy`` are what the trainer's
loop adds on top (it builds batches inline, on the training thread). ``--profile`` adds one
torch.profiler pass over the step (``benchmarks/profiling.py``): kernel time per step against
the host time of an unsynchronised loop (far above the kernel time means the step is
launch- or host-bound) and the top kernels and host ops. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from profiling import profile_calls, synchronise  # benchmarks/profiling.py


def timed_ms(call: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall milliseconds of one call with the device synchronised around it, and its value."""
    synchronise(device)
    start = time.perf_counter()
    value = call()
    synchronise(device)
    return (time.perf_counter() - start) * 1e3, value


def measure(trainer: Any, steps: int, warmup: int, profile: bool) -> dict[str, Any]:
    device, t = trainer.device, trainer.cfg.train
    trainer.model.train()
    rows, impressions = trainer._epoch_examples(1)
    batches = trainer._epoch_batches(1, 0, rows, impressions)

    def next_batch() -> Any:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # a short epoch: start it again
            batches = trainer._epoch_batches(1, 0, rows, impressions)
            return next(batches)

    for _ in range(warmup):
        trainer.train_step(next_batch().to(device))
    build, copy, prepare, step = [], [], [], []
    impressions_n = history_n = 0
    for _ in range(steps):
        ms, cpu_batch = timed_ms(next_batch, device)
        build.append(ms)
        ms, batch = timed_ms(lambda: cpu_batch.to(device), device)
        copy.append(ms)
        with torch.no_grad(), trainer._begin_step():
            prepare.append(timed_ms(lambda: trainer.spec.prepare(trainer.model, batch), device)[0])
        step.append(timed_ms(lambda: trainer.train_step(batch), device)[0])
        impressions_n += cpu_batch.num_candidates
        history_n += cpu_batch.num_history
    parts = {"build": build, "copy": copy, "prepare": prepare, "step": step}
    result: dict[str, Any] = {f"{k}_ms": round(statistics.median(v), 3) for k, v in parts.items()}
    loop_ms = result["build_ms"] + result["copy_ms"] + result["step_ms"]
    result.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        autocast=str(trainer.amp_dtype) if trainer.amp_dtype else "fp32",
        batch_size=t.batch_size,
        steps=steps,
        warmup=warmup,
        impressions_per_batch=impressions_n / steps,
        history_events_per_batch=history_n / steps,
        impressions_per_s=round(impressions_n / steps / loop_ms * 1e3),
    )
    if profile:
        batch = next_batch().to(device)
        prof = profile_calls(lambda: trainer.train_step(batch), max(steps // 2, 2), device)
        result.update(prof.summary())
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from flexgr.ranking.train import RankingTrainer
    from flexgr.train.config import ConfigError, apply_overrides, load_preset
    from flexgr.train.rundir import RunDir

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="synthetic-ranking-gesr")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed batches (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiles)")
    parser.add_argument("--profile", action="store_true", help="a torch.profiler pass too")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    try:
        cfg = apply_overrides(
            load_preset(args.preset), [f"train.device={args.device}", *args.overrides]
        )
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    if not cfg.is_ranking:
        parser.error(
            f"--preset {args.preset} is not a ranking preset (benchmarks/train_epoch.py times it)"
        )
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "bench")
        run.create(cfg)
        trainer = RankingTrainer(cfg, run, Console(quiet=True), show_progress=False, callbacks=())
        result = measure(trainer, args.steps, args.warmup, args.profile)
    result.update(preset=args.preset, overrides=args.overrides)
    table = Table(title=f"ranking step: {args.preset}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key not in ("top_kernels", "top_host_ops"):
            table.add_row(key, str(value))
    console.print(table)
    for key in ("top_kernels", "top_host_ops"):
        for row in result.get(key, []):
            console.print(f"{key}: {row}", highlight=False)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
