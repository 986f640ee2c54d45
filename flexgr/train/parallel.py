"""The parallel setting of a run: the mesh, the wrapped model, and each step's forward.

One process is the case world size = 1 of the same code: its step prepares the batch's inputs
with the model's spec, runs the (possibly compiled) model, and every reduction is a no-op.

Per step, with ``row_total`` tokens in the global batch (all replicas together):

* the replica's sequences are sharded over its CP ranks (the model spec's ``prepare_sharded``);
* dropout masks and negatives are drawn for all ``row_total`` rows from the torch generator,
  which is seeded alike and advanced alike on every rank, and each rank keeps its rows: the
  draws equal those of one process on the combined batch;
* each rank backpropagates ``sum of its token losses / row_total`` and DDP sums the gradients,
  so the step is the single-process step on the combined batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flexgr.distributed import (
    ParallelConfig,
    ParallelConfigError,
    ParallelContext,
    init_parallel,
    parallelize,
    rank_local_rng,
)
from flexgr.model.registry import spec_of
from flexgr.model.spec import shard_inputs
from flexgr.train.batches import TrainBatch
from flexgr.train.config import Config

V = TypeVar("V")


class ParallelSetupError(ValueError):
    """The parallel settings do not fit this launch (raised the same on every rank)."""


def launched_world_size() -> int:
    """Processes in this launch: torchrun's WORLD_SIZE, 1 for a plain ``python`` run."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_parallel(cfg: Config, world_size: int) -> ParallelConfig:
    """The resolved (dp, cp), or a one-line error that says what to change."""
    if world_size > 1:
        # Both would make a rank's step depend on its own share of the batch (its targets, its
        # sequence count), so the step would no longer be one process's step on the whole
        # batch, nor the random generators advance alike on every rank.
        if cfg.train.negatives == "in_batch":
            raise ParallelSetupError(
                "train.negatives = 'in_batch' runs in one process (its candidates would be each "
                "rank's own targets); use 'uniform' or 'full' under torchrun"
            )
        if cfg.train.cuda_graphs:
            raise ParallelSetupError(
                "train.cuda_graphs runs in one process (its padded step is one process's "
                "whole batch); set train.cuda_graphs=false under torchrun"
            )
        if cfg.model_options().get("drop_path", 0.0):
            raise ParallelSetupError(
                "model.drop_path runs in one process (its per-sequence draws are not replicated "
                "over ranks yet); set model.drop_path=0 under torchrun"
            )
    try:
        return ParallelConfig(dp=cfg.parallel.dp, cp=cfg.parallel.cp).resolve(world_size)
    except ParallelConfigError as err:
        hint = ""
        if world_size == 1:
            hint = (
                "; this is a single process: launch with torchrun --nproc-per-node N "
                "-m flexgr train ..."
            )
        raise ParallelSetupError(f"{err}{hint}") from None


def parallel_device(name: str) -> torch.device:
    """``train.device`` for one rank of a launch: each rank takes the GPU of its LOCAL_RANK."""
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "auto":
        return local if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ParallelSetupError(f"train.device = {name!r}, but CUDA is not available")
    if device.index is not None:
        raise ParallelSetupError(
            f"train.device = {name!r} names one GPU for every rank; under torchrun use "
            "train.device=cuda (or auto): rank r takes cuda:LOCAL_RANK"
        )
    return local


def start_parallel(cfg: Config) -> tuple[ParallelContext | None, bool]:
    """(context, whether this call created the process group); (None, False) for one process.

    Settings are checked before any collective, so a bad launch fails on every rank at once.
    """
    world = launched_world_size()
    check_parallel(cfg, world)
    if world == 1:
        return None, False
    device = parallel_device(cfg.train.device)
    created = not dist.is_initialized()
    ctx = init_parallel(ParallelConfig(dp=cfg.parallel.dp, cp=cfg.parallel.cp), device)
    return ctx, created


def stop_parallel(ctx: ParallelContext | None, created: bool) -> None:
    if ctx is not None and created and dist.is_initialized():
        dist.destroy_process_group()


class FailedOnMain(RuntimeError):
    """Raised on ranks 1.. when work done on rank 0 alone failed (rank 0 raises the original)."""


def on_main(ctx: ParallelContext, work: Callable[[], V]) -> V:
    """``work()`` on rank 0 only (file writes, downloads); every rank returns its result or
    raises, so a failure there does not leave the other ranks waiting in a collective."""
    result: V | None = None
    error: Exception | None = None
    if ctx.is_main:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - whatever it is, the other ranks must hear
            error = err
    message = ctx.from_main(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise FailedOnMain(f"rank 0 failed: {message}")
    return ctx.from_main(result)  # type: ignore[return-value]


class ParallelStep:
    """The forward of one training step on this process's share of the step's batch.

    At world size 1 it calls the ``forward`` it is given (the model, or the compiled model)
    with plain dropout.
    Under torchrun it runs the DDP-wrapped model eagerly: compiling it would trace DDP, the CP
    collectives and the dropout binding, which has not been validated on GPUs yet. Attention
    kernels are Triton either way, and the loss and evaluation stay compiled.
    """

    def __init__(self, ctx: ParallelContext, model: nn.Module, seed: int) -> None:
        self.ctx = ctx
        self.seed = seed
        self.model = model
        self.spec = spec_of(model)
        self.single = ctx.world_size == 1
        # Row-wise dropout (HSTU) is drawn for the world batch and indexed; other models' (e.g.
        # SASRec's attention dropout on a padded local batch) draw from a rank-local generator.
        # One process draws as it always did.
        self.row_wise = self.spec.capabilities.row_wise_dropout
        self.net: nn.Module | None = None
        if not self.single:
            self.net = parallelize(model, ctx, replicate_dropout=self.row_wise)

    def outputs(
        self,
        part: TrainBatch,
        step: int,
        autocast: AbstractContextManager,
        forward: Callable[..., Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(this process's output states [T_r, d], their targets [T_r], their world rows)."""
        sharded = shard_inputs(
            self.model, part.jagged, self.ctx, part.row_offset, part.row_total, self.spec
        )
        rng = (
            contextlib.nullcontext()
            if self.row_wise or self.single
            else rank_local_rng(self.seed, step, self.ctx.rank, self.ctx.device)
        )
        with rng, autocast:
            if self.net is None:
                states = (forward or self.model)(sharded.item_ids, sharded.inputs)
            else:
                states = self.net(sharded)
        targets, rows = sharded.take(part.targets), sharded.world_rows
        kept = getattr(sharded.inputs, "output_rows", None)
        if kept is not None:  # attention truncation: outputs for the kept rows only
            targets, rows = targets[kept], rows[kept]
        return states, targets, rows
