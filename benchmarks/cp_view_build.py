"""Per-batch cost of the context-parallel Triton path's global view (layout, restricted block
mask, slot maps), which every CP step builds once and its layers share.

    TRITON_INTERPRET=1 python benchmarks/cp_view_build.py            # CPU
    python benchmarks/cp_view_build.py --device cuda                 # GPU

One batch of --seqs sequences with lengths uniform in [max_len / 4, max_len] (the throughput
batch of benchmarks/distributed.py for one CP=2 group), C = --cp; prints the build time of every
rank's view, --reps times each (a new CPMask each time, so nothing is cached).
"""

from __future__ import annotations

import argparse
import time

import torch

from flexgr.distributed import build_cp_mask, shard_tokens
from flexgr.distributed.cp_triton import _global_view


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.max_len // 4, args.max_len + 1, (args.seqs,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(args.device)
    times = []
    for rank in range(args.cp):
        for _ in range(args.reps):
            mask = build_cp_mask(shard_tokens(offsets, args.cp, rank), with_block_mask=False)
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _global_view(mask)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(f"rank {rank}: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    print(f"T = {int(offsets[-1]):,} tokens, {args.seqs} sequences, CP = {args.cp}, {args.device}")
    print("; ".join(times))


if __name__ == "__main__":
    main()
