"""Bodies of the 2-process load-balancing test (run on every rank by tests.distributed.launch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flexgr.train.load_balance import BalancedLengthSampler, attention_load


def rank_loads_body(full: np.ndarray, steps: int, out: Path) -> None:
    """Each rank computes only its own part's lengths, as its data loader would; the loads are
    then gathered over gloo (the check that every rank agrees, and the report)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    kw = {"alpha": 1.6, "max_len": 4096, "selection": "recent", "seed": 7, "full_lengths": full,
              "batch_size": 16, "dp_size": world, "warmup": 5, "every": 10, "beta": 2560.0}
    sampler = BalancedLengthSampler(**kw)
    mine = {"plain": [], "balanced": [], "target": []}
    for step in range(steps):
        epoch, parts = sampler.parts(step)
        rows = parts[rank]
        plain = sampler.plain_lengths(rows, epoch)
        balanced = sampler.input_lengths(rows, full[rows], epoch)
        assert np.all((balanced >= 1) & (balanced <= full[rows]))
        mine["plain"].append(attention_load(plain, sampler.beta))
        mine["balanced"].append(attention_load(balanced, sampler.beta))
        mine["target"].append(sampler.target_at(step) or 0.0)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        # every rank estimated the same targets without communicating
        assert all(g["target"] == mine["target"] for g in gathered)
        # the per-rank loads rank 0 can compute alone equal what each rank computed
        for step in range(steps):
            local = sampler.rank_loads(step)
            assert np.allclose(local, [g["balanced"][step] for g in gathered])
        out.write_text(json.dumps(gathered))
    torch.distributed.barrier()
