"""Bare all-gather and reduce-scatter over all ranks: the alpha (latency) and beta (seconds per
byte) of the context-parallel cost model in docs/distributed.md.

    torchrun --nproc-per-node 2 benchmarks/collectives.py                 # GPUs (NCCL)
    torchrun --nproc-per-node 2 benchmarks/collectives.py --device cpu    # gloo smoke run

Every size is the bytes each rank contributes (the all-gather's input shard, the
reduce-scatter's output shard), bf16 on CUDA. Times are medians over --reps after --warmup calls,
the max over ranks of each call. The fit is least squares of t = alpha + beta * (C - 1) * bytes,
the bytes each rank receives, over all sizes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from flexgr.distributed.collectives import gather_tokens, reduce_scatter_tokens

MIB = 1 << 20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--sizes-mib", default="0.0625,0.25,1,4,16,64,256")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    return p.parse_args()


def timed_ms(fn, device: torch.device, reps: int, warmup: int) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms)


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(alpha ms, beta ms per byte) of ms = alpha + beta * bytes, least squares."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    beta = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - beta * mx, beta


def main() -> None:
    args = parse_args()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(minutes=5),
        device_id=device if device.type == "cuda" else None,
    )
    C = dist.get_world_size()
    group = dist.group.WORLD
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    rows, fits = [], {"all-gather": [], "reduce-scatter": []}
    for mib in (float(s) for s in args.sizes_mib.split(",")):
        n = max(1, int(mib * MIB) // elem)
        shard = torch.randn(n, device=device).to(dtype)
        full = torch.randn(C * n, device=device).to(dtype)
        for name, fn in (
            ("all-gather", lambda: gather_tokens(shard, group)),
            ("reduce-scatter", lambda: reduce_scatter_tokens(full, group)),
        ):
            ms = timed_ms(fn, device, args.reps, args.warmup)
            received = (C - 1) * n * elem
            fits[name].append((received, ms))
            rows.append((name, f"{n * elem / MIB:g}", f"{ms:.3f}", f"{received / ms / 1e6:.1f}"))
    if dist.get_rank() == 0:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
        print(f"\n{C} x {where}, torch {torch.__version__}, {dtype}\n")
        print("| collective | MiB per rank | median ms (max over ranks) | received GB/s per rank |")
        print("|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        print()
        for name, pts in fits.items():
            alpha, beta = fit(pts)
            rate = 1 / beta / 1e6 if beta > 0 else float("inf")
            print(f"{name}: alpha = {alpha * 1e3:.1f} us, 1/beta = {rate:.1f} GB/s received")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
