"""Data parallelism over the whole (dp, cp) world with DDP, and the one call that applies both.

Why DDP and not FSDP2: these models are small (ML-1M HSTU ~0.2M parameters plus a 3.7k x 50 item
table; the 8-layer d=512 benchmark model ~10M plus its table), so a full replica per GPU costs
little memory, while FSDP2 would add an all-gather per layer in forward and again in backward plus
a reduce-scatter, all on the critical path. DDP does one bucketed all-reduce per step that
overlaps the backward. FSDP2 pays off once parameters and optimizer state stop fitting (item
tables of tens of millions of rows); docs/distributed.md says what changes then.

Gradients are SUMMED over all dp * cp ranks (a comm hook replaces DDP's mean): each rank
backpropagates its share of the global loss, ``sum over its tokens / global token count``, and the
sum of those shares is exactly the loss of one process on the combined batch. CP ranks hold
different tokens of the same sequences, so their gradients must be summed too; reducing over the
whole world does dp and cp in one collective.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flexgr.distributed.hstu_cp import ContextParallelHSTU
from flexgr.distributed.mesh import ParallelContext, check_mesh
from flexgr.distributed.rng import replicate_dropout as replicate_dropout_of
from flexgr.model.hstu import HSTU


def _sum_allreduce(group, bucket):  # unannotated: DDP compares annotations to real classes
    """Comm hook: sum (not average) each gradient bucket over ``group``."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_data_parallel(module: nn.Module, ctx: ParallelContext) -> nn.Module:
    """DDP over every rank with summed gradients; the module itself when there is one rank."""
    if ctx.mesh is None or ctx.world_size == 1:
        return module
    check_mesh(ctx)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(module, device_ids=device_ids)
    ddp.register_comm_hook(None, _sum_allreduce)
    return ddp


def parallelize(
    model: nn.Module, ctx: ParallelContext, *, replicate_dropout: bool = False
) -> nn.Module:
    """What the trainer calls once, after moving the model to ``ctx.device``.

    HSTU: returns a module whose ``forward(batch)`` takes an ``HSTUShardBatch`` (from
    ``shard_hstu_batch``) and returns this rank's [T_r, d] outputs; CP is applied when cp > 1 and
    DDP when the world has more than one rank. Other models (SASRec): cp must be 1, and the model
    keeps its own forward signature under DDP.

    ``replicate_dropout`` (HSTU only): the model's dropouts draw their masks for the world batch
    and keep this rank's rows (``flexgr.distributed.rng``), so training draws exactly what one
    process draws for the combined batch and the generators stay in lockstep across ranks.
    """
    if isinstance(model, HSTU):
        wrapped = ContextParallelHSTU(model, ctx.cp_group, ctx.cp_size)
        if replicate_dropout:
            wrapped.dropout_rows = replicate_dropout_of(model)
        return apply_data_parallel(wrapped, ctx)
    if replicate_dropout:
        raise TypeError(
            f"replicate_dropout needs an HSTU model; {type(model).__name__}'s dropout is not "
            "row-wise over tokens"
        )
    if ctx.cp_size > 1:
        raise TypeError(
            f"parallel.cp={ctx.cp_size} needs an HSTU model: context parallelism relies on HSTU's "
            f"pointwise attention, whose partial sums over key shards add; {type(model).__name__} "
            f"uses softmax attention"
        )
    return apply_data_parallel(model, ctx)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain model inside DDP / ContextParallelHSTU (for state_dict, eval, export)."""
    if isinstance(module, DistributedDataParallel):
        module = module.module
    if isinstance(module, ContextParallelHSTU):
        module = module.model
    return module
