"""Collectives used by context and data parallelism."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

# torch 2.13 renamed these (the old names warn); the GPU image's 2.11 has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_tokens(x_SX: Tensor, group: ProcessGroup) -> Tensor:
    """[S, ...] on every rank -> [world * S, ...], rank-major (no autograd)."""
    world = dist.get_world_size(group)
    out = x_SX.new_empty((world * x_SX.shape[0], *x_SX.shape[1:]))
    _all_gather_single(out, x_SX.contiguous(), group=group)
    return out


def reduce_scatter_tokens(g_CSX: Tensor, group: ProcessGroup) -> Tensor:
    """[world * S, ...] on every rank -> [S, ...]: this rank's slice summed over ranks (no
    autograd; the adjoint of :func:`gather_tokens`)."""
    world = dist.get_world_size(group)
    g_CSX = g_CSX.contiguous()
    S = g_CSX.shape[0] // world
    if g_CSX.device.type == "cpu":
        # gloo lacks reduce_scatter in some torch releases; CPU is the test path, so the
        # extra traffic of a full all-reduce does not matter there.
        dist.all_reduce(g_CSX, group=group)
        rank = dist.get_rank(group)
        return g_CSX[rank * S : (rank + 1) * S].clone()
    out = g_CSX.new_empty((S, *g_CSX.shape[1:]))
    _reduce_scatter_single(out, g_CSX, group=group)
    return out


class _GatherTokens(torch.autograd.Function):
    """All-gather equal-length token shards along dim 0; the backward sums the gradient of every
    rank's copy back onto the owner (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x_SX: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return gather_tokens(x_SX, group)

    @staticmethod
    def backward(ctx, g_CSX: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return reduce_scatter_tokens(g_CSX, ctx.group), None


def all_gather_tokens(x_SX: Tensor, group: ProcessGroup) -> Tensor:
    """[S, ...] on every rank -> [world * S, ...], rank-major, differentiable."""
    return _GatherTokens.apply(x_SX, group)


def all_reduce_sum(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum over ``group`` (a copy; None means no distribution). Not differentiable: for loss
    normalisers, counts and metrics."""
    out = x.detach().clone()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, group=group)
    return out
