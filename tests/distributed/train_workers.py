"""Bodies of the multi-process training tests (run on every rank by tests.distributed.launch)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from flexgr.data import load_prepared, make_split
from flexgr.distributed import ParallelConfig, init_parallel
from flexgr.eval import evaluate
from flexgr.model import HSTU, HSTUConfig
from flexgr.train import Callback, Config, TrainState, fit


class Killed(RuntimeError):
    pass


class KillAfterCheckpoint(Callback):
    """Stops every rank right after the checkpoint of ``step``. The barrier keeps ranks 1.. from
    failing (and the launcher from killing rank 0) before rank 0 has written that checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, state: TrainState) -> None:
        if state.step == self.step:
            dist.barrier()
            raise Killed(f"simulated kill after the checkpoint at step {state.step}")


def fit_body(
    cfg: Config, run_dir: Path, resume: bool = False, kill_step: int | None = None
) -> None:
    callbacks = [KillAfterCheckpoint(kill_step)] if kill_step is not None else []
    fit(cfg, run_dir, resume=resume, console=Console(quiet=True), callbacks=callbacks)


def fit_many_body(jobs: list[tuple[Config, Path]]) -> None:
    """fit_body for each (config, run dir) in turn. The process group is joined here, so every
    fit finds it and leaves it up for the next."""
    dist.init_process_group("gloo")
    for cfg, run_dir in jobs:
        fit_body(cfg, run_dir)


def split_eval_body(home: Path) -> None:
    """Every rank ranks half of the batches; the all-reduced metrics must equal one process's
    metrics on the same weights exactly (same batches, same order of the float sums)."""
    ctx = init_parallel(ParallelConfig())
    data = load_prepared("tiny", data_dir=home)
    split = make_split(data, "loo-val")
    torch.manual_seed(0)  # the same weights on both ranks
    model = HSTU(HSTUConfig(num_items=data.num_items, d_model=16, num_layers=1, dqk=8, dv=8))
    kwargs = {"max_seq_len": 12, "ks": (1, 5, 10), "batch_size": 5, "item_chunk": 7}
    whole = evaluate(model, data, split, "test", **kwargs)
    shared = evaluate(
        model,
        data,
        split,
        "test",
        **kwargs,
        part=(ctx.rank, ctx.world_size),
        reduce=ctx.all_reduce_sum,
    )
    assert whole["users"] > 10 * 2, "too few batches to give both ranks several"
    assert shared == whole, (shared, whole)
