"""Run a test body in N local processes joined into one gloo world (as torchrun would)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, world: int, port: int, body: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # CI has 2 cores for all ranks
    try:
        body(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(body: Callable[..., None], world: int, *args: Any) -> None:
    """Calls ``body(*args)`` on ranks 0..world-1; an exception on any rank fails the test with
    that rank's traceback (the others are terminated)."""
    mp.spawn(_entry, args=(world, _free_port(), body, args), nprocs=world, join=True)
