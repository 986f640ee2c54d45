"""Where the training loop's time goes outside the model: the real ``Trainer.run_epoch``, timed.

    python benchmarks/loop_overhead.py --epochs 4 --set model.d_model=8 --set model.num_layers=1 \
        --set model.num_heads=1 --set model.dqk=4 --set model.dv=4 --set model.rel_bias=false \
        --set train.num_negatives=8

Builds a ``Trainer`` for the preset (default ``ml-1m-hstu-large`` under ``gr-compatible``, as
in the issue's full run), runs one untimed epoch, then ``--epochs`` timed ones through the
real ``run_epoch``. The model's forward, the loss, and backward + optimizer step are wrapped
in timers, and so are the loader's ``next`` (batch building, collation, pinning), the per-step
input preparation (masks, positions, bias tables) and the negative draws; everything else is
the loop's own work. A tiny model keeps the model's compute small so the rest is visible.
Before the training epochs the loader is also timed alone (``loader_alone_ms``).

On a CPU every op runs synchronously, so each bucket is its own cost; on CUDA the buckets time
only the host's launches (no synchronisation is added: that would change the loop). Prints a
table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import flexgr.train.loop as loop_module
import flexgr.train.parallel as parallel_module
from flexgr.train.config import apply_overrides, load_preset
from flexgr.train.loop import Trainer
from flexgr.train.progress import TrainProgress
from flexgr.train.rundir import RunDir

MODEL_BUCKETS = ("forward", "loss", "backward + optimizer")


class Timers:
    """Seconds spent inside wrapped callables, by bucket."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, bucket: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[bucket] += time.perf_counter() - start

        return timed


class TimedLoader:
    """``loader`` whose every ``next`` (building, collating, pinning a batch) is timed."""

    def __init__(self, loader: Iterable[Any], timers: Timers) -> None:
        self.loader, self.timers = loader, timers

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.timers.seconds["loader next"] += time.perf_counter() - start
            yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def instrument(trainer: Trainer, timers: Timers) -> None:
    trainer.forward = timers.wrap("forward", trainer.forward)
    trainer.loss_fn = timers.wrap("loss", trainer.loss_fn)
    trainer._descend = timers.wrap("backward + optimizer", trainer._descend)  # type: ignore[method-assign]
    trainer.loader = TimedLoader(trainer.loader, timers)  # type: ignore[assignment]
    loop_module.sample_negatives = timers.wrap("negatives", loop_module.sample_negatives)
    parallel_module.shard_inputs = timers.wrap("prepare", parallel_module.shard_inputs)


def loader_alone_ms(trainer: Trainer, epochs: int = 5) -> float:
    """ms per batch of the loader iterated with no training between (warm caches): the build
    cost itself, which the model's steps inflate on a CPU by evicting what it reads."""
    start, batches = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        trainer.batches.set_epoch(epoch)
        batches += sum(1 for _ in trainer.loader)
    return (time.perf_counter() - start) / batches * 1e3


def run_epochs(trainer: Trainer, progress: TrainProgress, epochs: int) -> None:
    for _ in range(epochs):
        trainer.run_epoch(progress)
        trainer.state.epoch += 1
        trainer.state.batch_in_epoch = 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="ml-1m-hstu-large")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs (after one untimed)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    overrides = ["data.protocol=gr-compatible", *args.overrides]
    cfg = apply_overrides(load_preset(args.preset), overrides)
    timers = Timers()
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "bench")
        run.create(cfg)
        trainer = Trainer(cfg, run, Console(stderr=True), show_progress=False, callbacks=())
        alone_ms = loader_alone_ms(trainer)
        instrument(trainer, timers)
        progress = TrainProgress(Console(quiet=True), False, max_epochs=cfg.train.max_epochs)
        run_epochs(trainer, progress, 1)  # warm-up
        timers.seconds.clear()
        start = time.perf_counter()
        run_epochs(trainer, progress, args.epochs)
        wall = time.perf_counter() - start
        steps = args.epochs * trainer.steps_per_epoch

    per_step = {k: v / steps * 1e3 for k, v in timers.seconds.items()}
    model_ms = sum(per_step.get(k, 0.0) for k in MODEL_BUCKETS)
    wall_ms = wall / steps * 1e3
    outside = wall_ms - model_ms
    loop_own = outside - sum(per_step.get(k, 0.0) for k in ("loader next", "prepare", "negatives"))
    result = {
        "device": str(trainer.device),
        "steps": steps,
        "wall_ms_per_step": round(wall_ms, 3),
        **{f"{k}_ms": round(v, 3) for k, v in sorted(per_step.items())},
        "outside_model_ms": round(outside, 3),
        "loop_own_ms": round(loop_own, 3),
        "loader_alone_ms": round(alone_ms, 3),
        "overrides": overrides,
    }
    from rich.table import Table

    table = Table(title="training loop, ms per step")
    table.add_column("what")
    table.add_column("ms / step", justify="right")
    for key, value in result.items():
        if key.endswith("_ms") or key == "wall_ms_per_step":
            table.add_row(key, f"{value:.3f}")
    Console(stderr=True).print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
