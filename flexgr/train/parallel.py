"""What training does differently under torchrun: the mesh, the wrapped model, sharded steps.

A run with one process never comes here, so its code path (and its numbers) are the same as
before data and context parallelism existed.

Per step, with ``row_total`` tokens in the global batch (all replicas together):

* the replica's sequences are sharded over its CP ranks (``shard_hstu_batch``);
* dropout masks and negatives are drawn for all ``row_total`` rows from the torch generator,
  which is seeded alike and advanced alike on every rank, and each rank keeps its rows: the
  draws equal those of one process on the combined batch;
* each rank backpropagates ``sum of its token losses / row_total`` and DDP sums the gradients,
  so the step is the single-process step on the combined batch.
"""

from __future__ import annotations

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
    shard_hstu_batch,
)
from flexgr.model.hstu import HSTU
from flexgr.train.batches import ReplicaBatch
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
    """The forward of one training step on this rank's share of a global batch.

    It runs eagerly, also where one process compiles the model (CUDA): compiling it would trace
    DDP, the CP collectives, the sharding's host syncs and the dropout binding, which has not
    been validated on GPUs yet. Attention kernels are compiled or Triton either way, and the
    loss and evaluation stay compiled.
    """

    def __init__(self, ctx: ParallelContext, model: nn.Module, seed: int) -> None:
        self.ctx = ctx
        self.seed = seed
        self.hstu = isinstance(model, HSTU)
        # HSTU's dropout is row-wise over tokens, so it can be drawn for the world batch and
        # indexed; SASRec's attention dropout runs on a padded local batch and cannot.
        self.net = parallelize(model, ctx, replicate_dropout=self.hstu)

    def outputs(
        self, part: ReplicaBatch, step: int, autocast: AbstractContextManager
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(this rank's output states [T_r, d], their targets [T_r], their world rows [T_r])."""
        batch = part.batch
        if self.hstu:
            sharded = shard_hstu_batch(
                batch.item_ids,
                batch.offsets,
                cp_rank=self.ctx.cp_rank,
                cp_size=self.ctx.cp_size,
                timestamps=batch.timestamps,
                query_time=batch.query_time,
                row_offset=part.row_offset,
                row_total=part.row_total,
            )
            with autocast:
                states = self.net(sharded)
            return states, sharded.take(batch.targets), sharded.world_rows
        rows = torch.arange(
            part.row_offset, part.row_offset + batch.num_tokens, device=batch.item_ids.device
        )
        with rank_local_rng(self.seed, step, self.ctx.rank, self.ctx.device), autocast:
            states = self.net(batch.item_ids, batch.offsets, batch.timestamps, batch.query_time)
        return states, batch.targets, rows
