"""The device mesh: named axes ``dp`` (data-parallel replicas) and ``cp`` (context parallelism).

``cp`` is the inner axis, so a CP group is C consecutive ranks. torchrun numbers ranks node by
node, so a CP group stays on one host (on NVLink) whenever C divides the GPUs per node; its
all-gathers run every layer, the DP all-reduce only once a step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from flexgr.distributed.collectives import all_reduce_sum
from flexgr.distributed.config import ParallelConfig, ParallelConfigError

AXES = ("dp", "cp")
V = TypeVar("V")


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits. ``mesh`` is None in a plain single process (no torchrun)."""

    config: ParallelConfig  # resolved: config.dp * config.cp == world size
    device: torch.device
    mesh: DeviceMesh | None
    rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0

    @property
    def dp_size(self) -> int:
        return self.config.dp

    @property
    def cp_size(self) -> int:
        return self.config.cp

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cp_group(self) -> ProcessGroup | None:
        return self.mesh.get_group("cp") if self.mesh is not None else None

    @property
    def dp_group(self) -> ProcessGroup | None:
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def world_group(self) -> ProcessGroup | None:
        return dist.group.WORLD if self.mesh is not None else None

    def group(self, over: str) -> ProcessGroup | None:
        if over not in ("world", "dp", "cp"):
            raise ValueError(f"over must be 'world', 'dp' or 'cp', got {over!r}")
        return {"world": self.world_group, "dp": self.dp_group, "cp": self.cp_group}[over]

    def all_reduce_sum(self, x: Tensor, over: str = "world") -> Tensor:
        """Sum of ``x`` over the ranks of ``over``. Sums over local tokens (loss sums, token
        counts, hits) reduce over "world": every token of the global batch lives on exactly one
        rank. Values every CP rank computes identically reduce over "dp"."""
        return all_reduce_sum(x, self.group(over))

    def from_main(self, value: V) -> V:
        """Rank 0's ``value`` on every rank (pickled and broadcast); ``value`` without a mesh."""
        if self.mesh is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def single_process(device: torch.device | str | None = None) -> ParallelContext:
    device = torch.device(device) if device is not None else _default_device()
    return ParallelContext(config=ParallelConfig(1, 1), device=device, mesh=None)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_parallel(
    config: ParallelConfig, device: torch.device | str | None = None
) -> ParallelContext:
    """Join the torchrun world (WORLD_SIZE, RANK, MASTER_ADDR, ... from the environment) and build
    the (dp, cp) mesh. NCCL on CUDA, gloo on CPU. Without torchrun (no WORLD_SIZE) and with
    dp = cp = 1 this is a plain single process and touches no process group.

    Raises ParallelConfigError, on every rank and before any collective, when the settings do not
    fit the world size.
    """
    if dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = config.resolve(world_size)
    device = torch.device(device) if device is not None else _default_device()
    if world_size == 1 and not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
        return ParallelContext(config=resolved, device=device, mesh=None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, device_id=device if device.type == "cuda" else None
        )
    mesh = init_device_mesh(device.type, (resolved.dp, resolved.cp), mesh_dim_names=AXES)
    return ParallelContext(
        config=resolved,
        device=device,
        mesh=mesh,
        rank=dist.get_rank(),
        dp_rank=mesh.get_local_rank("dp"),
        cp_rank=mesh.get_local_rank("cp"),
    )


def check_mesh(ctx: ParallelContext) -> None:
    """The mesh must span the whole world: gradients are reduced over the default group."""
    if ctx.mesh is None:
        return
    if ctx.mesh.size() != dist.get_world_size():
        raise ParallelConfigError(
            f"the (dp, cp) mesh has {ctx.mesh.size()} ranks but the world has {dist.get_world_size()}"
        )


def destroy_parallel(ctx: ParallelContext) -> None:
    if ctx.mesh is not None and dist.is_initialized():
        dist.destroy_process_group()
