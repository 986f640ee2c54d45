"""The trainer's loader on a versioned-example store: examples/s, and is a training step starved?

    python benchmarks/late_materialization_train.py            # the synthetic-vlm preset's data
    python benchmarks/late_materialization_train.py --small    # 64 users

Builds the synthetic multi-tenant store of the ``synthetic-vlm`` preset (or a smaller one), then
for the versioned loader (data.source=versioned: tier scans, snapshots, checks), for fat rows of
the same requests (histories stored whole, same batches) and for the table path (per-user
sequences of the same table; other examples, for scale):

1. **loader only**: one pass of the trainer's DataLoader over the epoch, no training step;
2. **with the step**: ``--steps`` real CPU training steps of the preset's model
   (``--model preset``) or of a tiny one (``--model tiny``, a step short enough to expose the
   loader), timing the wait for each batch and the step itself.

One JSON line per configuration: ``examples_per_s`` (loader only), ``wait_ms`` and ``step_ms``
(means per step), ``starved_fraction`` = wait / (wait + step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from flexgr.data import load_prepared, make_split
from flexgr.train import apply_overrides, load_preset
from flexgr.train.batches import BatchRows, EpochBatches, TrainBatch, TrainSequences
from flexgr.train.loop import Trainer
from flexgr.train.rundir import RunDir
from flexgr.train.versioned_source import (
    SYNTHETIC,
    AffinityBatches,
    PrefetchLoader,
    VersionedSequences,
    train_batch,
)
from flexgr.vlm import FatRowSlicer, Tenant, fat_rows_from_log
from flexgr.vlm.dataset import canonical_log, prepare_synthetic, read_meta, training_log
from flexgr.vlm.examples import ExampleRows

TINY = ["model.d_model=16", "model.num_layers=1", "model.dqk=8", "model.dv=8"]


class FatRowSequences(Dataset[TrainBatch]):
    """The same examples, rows and batches as a VersionedSequences, read from fat rows."""

    def __init__(self, store: VersionedSequences, fat, max_seq_len: int) -> None:
        self.fat, self.max_seq_len = fat, max_seq_len
        self.requests = store.rows.table.column("request_id").to_numpy()
        self.lengths, self.users = store.lengths, store.users
        self.slicer = FatRowSlicer(Tenant("train", max_seq_len), ())

    def __len__(self) -> int:
        return len(self.requests)

    def lengths_in(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        return self.lengths[rows]

    def __getitem__(self, part: BatchRows) -> TrainBatch:  # type: ignore[override]
        requests = self.requests[np.asarray(part.rows, dtype=np.int64)]
        rows = ExampleRows(self.fat.take(requests), np.full(len(requests), "fat"), requests)
        return train_batch(self.slicer(rows), self.max_seq_len, 1, part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=4, help="training steps per configuration")
    parser.add_argument("--model", choices=("preset", "tiny", "both"), default="preset")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept if given")
    args = parser.parse_args()
    spec, log_max_len = SYNTHETIC["synthetic-multitenant"]
    if args.small:
        spec = dataclasses.replace(spec, users=64)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vlm-train-bench-"))
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        bench(args, spec, log_max_len, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, spec, log_max_len: int, work: Path) -> None:
    started = time.perf_counter()
    store = work / "store"
    if not (store / "vlm.json").is_file():
        prepare_synthetic(store, spec, log_max_len=log_max_len)
    meta = read_meta(store)
    data = load_prepared(meta.table_path(store))
    split = make_split(data, meta.protocol)
    train = training_log(canonical_log(spec), data, split)
    fat = fat_rows_from_log(train, spec.request_spec(log_max_len))
    print(json.dumps({
        "config": "dataset", "users": spec.users, "examples": meta.examples,
        "train_events": meta.events, "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0],
    }), flush=True)  # fmt: skip
    models = ["preset", "tiny"] if args.model == "both" else [args.model]
    for model in models:
        cfg = load_preset("synthetic-vlm")
        extra = TINY if model == "tiny" else []
        cfg = apply_overrides(cfg, [f"data.dataset={store}", "train.device=cpu", *extra])
        run = RunDir(work / f"run-{model}")
        if not run.root.exists():
            run.create(cfg)
        trainer = Trainer(cfg, run, Console(quiet=True), False, [])
        versioned = trainer.sequences
        assert isinstance(versioned, VersionedSequences)
        sources = {
            "versioned": versioned,
            "fat_row": FatRowSequences(versioned, fat, cfg.data.max_seq_len),
            "table": TrainSequences(data, split, cfg.data.max_seq_len),
        }
        for name, seqs in sources.items():
            for affinity in (False, True) if name != "table" else (False,):
                for depth in (0, 2):
                    line = measure(trainer, seqs, affinity, depth, args.steps)
                    line.update(config=f"{model}/{name}", model=model, source=name)
                    print(json.dumps(line), flush=True)
    print(json.dumps({"config": "total", "wall_s": time.perf_counter() - started,
                      "load_avg_1m": os.getloadavg()[0]}))  # fmt: skip


def measure(trainer: Trainer, seqs, affinity: bool, depth: int, steps: int) -> dict:
    t = trainer.cfg.train
    if affinity:
        order = AffinityBatches(len(seqs), t.batch_size, t.seed, seqs.users, 1024)
    else:
        order = EpochBatches(len(seqs), t.batch_size, t.seed)
    order.set_epoch(1)
    rows = [BatchRows(b, 0, int(seqs.lengths_in(np.asarray(b), 1).sum()), 1) for b in order]
    loader = DataLoader(seqs, sampler=rows, batch_size=None)  # as train_loader, 0 workers
    source = PrefetchLoader(loader, depth) if depth else loader
    examples, start = 0, time.perf_counter()
    if depth == 0:  # loader only: one pass, nothing else running
        for batch in loader:
            examples += len(batch.users)
        loader_rate = examples / (time.perf_counter() - start)
    waits, step_times = [], []
    it = iter(source)
    for _ in range(steps):
        begin = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:  # a short epoch (the table has one sequence per user): again
            it = iter(source)
            batch = next(it)
        waits.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        float(trainer.train_step(batch))
        step_times.append(time.perf_counter() - begin)
    del it
    wait, step = float(np.mean(waits[1:])), float(np.mean(step_times[1:]))  # first: warm-up
    return {
        "affinity": affinity, "prefetch": depth,
        "examples_per_s": loader_rate if depth == 0 else None,
        "wait_ms": 1e3 * wait, "step_ms": 1e3 * step, "starved_fraction": wait / (wait + step),
        "steps": len(step_times) - 1,
    }  # fmt: skip


if __name__ == "__main__":
    main()
