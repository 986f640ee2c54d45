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

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.nn.parallel import DistributedDataParallel

from flexgr.distributed.collectives import all_gather_tokens
from flexgr.distributed.mesh import ParallelContext, check_mesh
from flexgr.distributed.rng import DropoutRows
from flexgr.distributed.rng import replicate_dropout as replicate_dropout_of
from flexgr.distributed.sharding import TokenShard


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


class ShardedForward(nn.Module):
    """``forward(sharded)``: the model on one rank's :class:`~flexgr.model.ShardedInputs`.

    With ``dropout_rows`` (models whose dropout is row-wise over tokens) the model's dropouts
    draw their masks for the whole world batch and keep this rank's rows, so a parallel step
    draws exactly what one process draws for the combined batch."""

    def __init__(self, model: nn.Module, dropout_rows: DropoutRows | None = None) -> None:
        super().__init__()
        self.model = model
        self.dropout_rows = dropout_rows

    def forward(self, sharded) -> Tensor:  # noqa: ANN001 - ShardedInputs (import cycle)
        bound = (
            self.dropout_rows.bound(sharded.world_rows, sharded.world_tokens)
            if self.dropout_rows is not None
            else contextlib.nullcontext()
        )
        with bound:
            return self.model(sharded.item_ids, sharded.inputs)


def parallelize(
    model: nn.Module, ctx: ParallelContext, *, replicate_dropout: bool = False
) -> nn.Module:
    """What the trainer calls once, after moving the model to ``ctx.device``: a module whose
    ``forward(sharded)`` takes this rank's inputs (the model spec's ``prepare_sharded``) and
    returns this rank's [T_r, d] outputs, under DDP when the world has more than one rank.

    The model's spec says what it supports: context parallelism (cp > 1) and row-wise dropout
    (``replicate_dropout``, see :class:`ShardedForward`).
    """
    from flexgr.model.registry import spec_of  # models import distributed code, not back

    try:
        spec = spec_of(model)
    except ValueError as err:
        raise TypeError(f"{err}; parallelize needs one (e.g. HSTU)") from None
    caps = spec.capabilities
    if ctx.cp_size > 1 and not caps.context_parallel:
        raise TypeError(
            f"parallel.cp={ctx.cp_size} needs a model with context parallelism (HSTU's pointwise "
            f"attention, whose partial sums over key shards add); {spec.name} has none"
        )
    if replicate_dropout and not caps.row_wise_dropout:
        raise TypeError(
            f"replicate_dropout needs row-wise dropout (HSTU); {spec.name}'s dropout is not "
            "row-wise over tokens"
        )
    rows = replicate_dropout_of(model) if replicate_dropout else None
    if spec.parallelize is not None:
        return spec.parallelize(model, ctx)
    return apply_data_parallel(ShardedForward(model, rows), ctx)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain model inside DDP / ShardedForward (for state_dict, eval, export)."""
    if isinstance(module, DistributedDataParallel):
        module = module.module
    if isinstance(module, ShardedForward):
        module = module.model
    return module


def gather_outputs(x_local: Tensor, shard: TokenShard, group: ProcessGroup | None) -> Tensor:
    """This CP group's outputs in GLOBAL token order [T, ...], on every rank of the group. Detached:
    for evaluation and inspection; train on local sums (every rank backpropagating a loss of the
    gathered tensor would count each token's gradient C times)."""
    x_local = x_local.detach()
    if shard.cp_size == 1 or group is None:
        return x_local
    with torch.no_grad():
        gathered = all_gather_tokens(shard.pad_to_shard(x_local), group)
    return gathered[shard.slot_of_token]
