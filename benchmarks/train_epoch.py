"""Time training steps and one evaluation of a preset, and estimate the epoch time.

    python benchmarks/train_epoch.py --preset ml-1m-hstu                 # 50 timed steps
    python benchmarks/train_epoch.py --preset ml-1m-hstu --full-epoch    # one whole epoch
    python benchmarks/train_epoch.py --preset ml-100k-hstu --set train.compile=false
    python benchmarks/train_epoch.py --preset ml-1m-hstu-large --profile --no-eval
    python benchmarks/train_epoch.py --preset ml-1m-hstu-large --set train.cuda_graphs=true \
        --warmup 100    # every shape bucket captured before the timing

Runs the real training path (DataLoader workers, compiled model and bf16 autocast on CUDA, the
loss, AdamW) in a throw-away run directory. Warm-up steps (compilation) are excluded from the
timing; the first evaluation is timed separately from a second one, which shows the cost of
compiling the eval graph. ``--profile`` adds one torch.profiler pass over repeated steps on one
batch (``benchmarks/profiling.py``): kernel time per step against the host time of an
unsynchronised loop, which says whether the step is launch-bound. Prints a table and, last,
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from profiling import profile_calls, synchronise  # benchmarks/profiling.py
from rich.console import Console

from flexgr.train.config import apply_overrides, load_config, load_preset
from flexgr.train.loop import Trainer
from flexgr.train.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="ml-1m-hstu")
    parser.add_argument("--config", type=Path, help="a TOML config instead of a preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    parser.add_argument("--full-epoch", action="store_true", help="time one whole epoch instead")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--profile", action="store_true", help="kernel vs host time per step")
    args = parser.parse_args()

    cfg = load_config(args.config) if args.config else load_preset(args.preset)
    cfg = apply_overrides(cfg, args.overrides)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "bench")
        run.create(cfg)
        trainer = Trainer(cfg, run, console, show_progress=False, callbacks=())
        result = measure(trainer, args, console)
    result["config"] = args.config.name if args.config else args.preset
    result["overrides"] = args.overrides
    print(json.dumps(result))


def measure(trainer: Trainer, args: argparse.Namespace, console: Console) -> dict:
    device = trainer.device
    trainer.model.train()
    batches_per_epoch = trainer.batches.batches_per_epoch
    epoch_tokens = trainer.sequences.num_tokens

    def batches():
        epoch = 1
        while True:
            trainer.batches.set_epoch(epoch)
            yield from trainer.loader
            epoch += 1

    stream = batches()

    def on_device(batch):  # a graphed step copies the pinned batch into its own buffers
        return batch if trainer.graphs is not None else batch.to(device, non_blocking=True)

    start = time.perf_counter()
    warmup = 0 if args.full_epoch else args.warmup
    for _ in range(warmup):
        trainer.train_step(on_device(next(stream)))
    synchronise(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    steps = batches_per_epoch if args.full_epoch else args.steps
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(stream)
        tokens += batch.num_real_tokens  # graph padding is not counted
        trainer.train_step(on_device(batch))
    synchronise(device)
    train_s = time.perf_counter() - start
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "compile": bool(trainer.cfg.train.compile and device.type == "cuda"),
        "autocast": str(trainer.amp_dtype) if trainer.amp_dtype else "fp32",
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 3),
        "timed_steps": steps,
        "timed_s": round(train_s, 3),
        "s_per_step": round(train_s / steps, 4),
        "tokens_per_s": round(tokens / train_s),
        "batches_per_epoch": batches_per_epoch,
        "epoch_tokens": epoch_tokens,
        "epoch_s_estimate": round(epoch_tokens / (tokens / train_s), 2),
    }
    if trainer.graphs is not None:
        result["graph_captures"] = trainer.graphs.captures
        result["graph_replays"] = trainer.graphs.replays
        result["graph_failed"] = trainer.graphs.failed
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.profile:
        batch = on_device(next(stream))
        prof = profile_calls(lambda: trainer.train_step(batch), max(steps // 4, 2), device)
        result.update(prof.summary())
    if not args.no_eval:
        which = trainer.selection_split
        _, first = trainer.evaluate(which)
        metrics, second = trainer.evaluate(which)
        result.update(
            eval_split=which,
            eval_users=metrics["users"],
            eval_first_s=round(first, 3),
            eval_s=round(second, 3),
        )
    from rich.table import Table

    table = Table(title="train_epoch benchmark")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if not isinstance(value, list):  # the profile's top rows are in the JSON line
            table.add_row(key, str(value))
    console.print(table)
    return result


if __name__ == "__main__":
    sys.exit(main())
