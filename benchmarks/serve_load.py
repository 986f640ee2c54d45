"""Load test of ``flexgr serve`` on localhost, and recall/latency of approximate top-k.

``http`` (the default): a fixed number of requests at a fixed concurrency (httpx, async),
bounded in time too; prints p50/p90/p99 latency, requests/s and the server's mean batch size::

    python benchmarks/serve_load.py --run-dir runs/ml100k                      # starts a server
    python benchmarks/serve_load.py --run-dir runs/ml100k --url http://127.0.0.1:8000
    python benchmarks/serve_load.py --run-dir runs/ml100k --mode history --max-batch 1

Ranking runs (``flexgr serve`` on an hstu-ranking run): ``--mode rank`` sends a dataset user and
``--candidates`` items to ``/score`` (per-task predictions; with ``--rank-users N`` only the first
N users, so that the history cache hits), ``--mode rank-history`` the user's last events with
their actions and timestamps (no cache key: the history is encoded every time)::

    python benchmarks/serve_load.py --run-dir runs/ml100k-ranking --mode rank --candidates 100
    python benchmarks/serve_load.py --run-dir runs/ml100k-ranking --mode rank --rank-users 16
    python benchmarks/serve_load.py --run-dir runs/ml100k-ranking --mode rank-history --device cuda

``ann``: exact top-k against FAISS IVF-Flat on a synthetic clustered item table::

    python benchmarks/serve_load.py ann --items 1000000 --dim 64 --probes 8,32,128

Request material (user ids, histories, candidates) comes from the run's dataset.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# ---------------------------------------------------------------- http


def _bodies(args: argparse.Namespace, count: int) -> list[dict[str, Any]]:
    from flexgr.train.rundir import RunDir
    from flexgr.train.setup import load_dataset

    cfg = RunDir(args.run_dir).read_config()
    data = load_dataset(cfg)
    if args.mode.startswith("rank"):
        if not cfg.is_ranking:
            raise SystemExit(f"--mode {args.mode} needs a ranking run; {args.run_dir} is not one")
        return _rank_bodies(data, cfg, args, count)
    mode, k, rng = args.mode, args.k, random.Random(args.seed)
    bodies = []
    for _ in range(count):
        user = rng.randrange(data.num_users)
        if mode == "user":
            bodies.append({"user": data.user_ids[user], "k": k})
            continue
        events = data.events_of(user)
        items = [data.item_ids[i - 1] for i in data.items[events]][-50:]
        times = data.timestamps[events].tolist()[-50:]
        if mode == "history":
            bodies.append({"history": items, "timestamps": times, "k": k})
        else:
            candidates = rng.sample(data.item_ids, min(100, data.num_items))
            bodies.append({"history": items, "timestamps": times, "candidates": candidates})
    return bodies


def _rank_bodies(data: Any, cfg: Any, args: argparse.Namespace, count: int) -> list[dict]:
    """/score bodies for a ranking server: a dataset user (``rank``) or the user's most recent
    ``max_seq_len`` events with their actions (``rank-history``), and ``--candidates`` items."""
    rng = random.Random(args.seed)
    users = min(data.num_users, args.rank_users or data.num_users)
    width = min(args.candidates, data.num_items)
    keep = cfg.data.max_seq_len
    bodies = []
    for _ in range(count):
        user = rng.randrange(users)
        candidates = rng.sample(data.item_ids, width)
        if args.mode == "rank":
            bodies.append({"user": data.user_ids[user], "candidates": candidates})
            continue
        events = data.events_of(user)
        items = [data.item_ids[i - 1] for i in data.items[events]][-keep:]
        actions = {
            name: (data.ratings if name == "rating" else data.actions[name])[events][-keep:]
            for name in cfg.ranking.action_inputs
        }
        bodies.append(
            {
                "history": items,
                "actions": {name: [_number(v) for v in values] for name, values in actions.items()},
                "timestamps": data.timestamps[events].tolist()[-keep:],
                "candidates": candidates,
            }
        )
    return bodies


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)  # JSON null: an unknown rating


def _start_server(run_dir: Path, max_batch: int, max_wait_ms: float, extra: list[str]):
    command = [
        sys.executable, "-m", "flexgr", "serve", "--run-dir", str(run_dir), "--port", "0",
        "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        return process, server_url(process.stdout)
    except SystemExit:
        process.kill()
        raise


def server_url(lines: Iterable[str]) -> str:
    """The URL from ``flexgr serve``'s "serving ... on http://..." line. On CUDA the server
    first warms up and says so; those lines are echoed (stderr) with the time they came."""
    start, last = time.perf_counter(), ""
    for line in lines:
        if " on http://" in line:
            return line.split(" on ", 1)[1].split()[0]
        last = line.strip() or last
        print(f"[server, {time.perf_counter() - start:.1f} s] {last}", file=sys.stderr, flush=True)
    raise SystemExit(f"the server did not start: {last or 'no output'}")


async def _load(
    url: str,
    path: str,
    bodies: list[dict[str, Any]],
    concurrency: int,
    warmup: int,
    max_seconds: float,
) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for body in bodies[:warmup]:  # first calls may compile kernels (Triton on CUDA)
            (await client.post(path, json=body, timeout=600)).raise_for_status()
        before_meta = (await client.get("/metadata")).json()
        before = before_meta["batching"]
        timed = bodies[warmup:]
        latencies: list[float] = []
        errors: dict[int, int] = {}
        next_index = 0
        deadline = time.perf_counter() + max_seconds

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(timed) and time.perf_counter() < deadline:
                body = timed[next_index]
                next_index += 1
                start = time.perf_counter()
                response = await client.post(path, json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors[response.status_code] = errors.get(response.status_code, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after_meta = (await client.get("/metadata")).json()
        after = after_meta["batching"]
    batches = after["batches"] - before["batches"]
    cache = {}
    if "history_cache" in after_meta:  # a ranking server: how often a history was reused
        was, now = before_meta["history_cache"], after_meta["history_cache"]
        hits = now["hits"] - was["hits"]
        looked = hits + now["misses"] - was["misses"] + now["stale"] - was["stale"]
        cache = {"cache_hit_rate": round(hits / looked, 3) if looked else None}
    return {
        "requests": len(latencies),
        "concurrency": concurrency,
        "errors": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(_percentile(latencies, 50) * 1000, 2),
        "p90_ms": round(_percentile(latencies, 90) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "mean_batch": round((after["requests"] - before["requests"]) / max(1, batches), 2),
        "cut_short": len(latencies) < len(timed),
        **cache,
    }


def http_main(args: argparse.Namespace) -> None:
    bodies = _bodies(args, args.warmup + args.requests)
    path = "/recommend" if args.mode in ("user", "history") else "/score"
    process = None
    url = args.url
    if url is None:
        extra = ["--device", args.device] + (["--ann"] if args.ann else [])
        if args.mode.startswith("rank"):
            extra += ["--microbatch", str(args.microbatch)]
        process, url = _start_server(args.run_dir, args.max_batch, args.max_wait_ms, extra)
    try:
        result = asyncio.run(
            _load(url, path, bodies, args.concurrency, args.warmup, args.max_seconds)
        )
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    result = {"mode": args.mode, "url": url, "max_batch": args.max_batch, **result}
    if args.mode.startswith("rank"):
        result["candidates"] = len(bodies[0]["candidates"])
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['mode']}: {result['requests']} requests, concurrency {result['concurrency']}, "
        f"max batch {result['max_batch']}: {result['requests_per_s']} req/s, "
        f"p50 {result['p50_ms']} ms, p90 {result['p90_ms']} ms, p99 {result['p99_ms']} ms, "
        f"max {result['max_ms']} ms, mean batch {result['mean_batch']}, "
        f"errors {result['errors'] or 'none'}"
        + (f", {result['candidates']} candidates" if "candidates" in result else "")
        + (f", cache hit rate {result['cache_hit_rate']}" if "cache_hit_rate" in result else "")
        + (" (cut short by --max-seconds)" * result["cut_short"])
    )


# ---------------------------------------------------------------- ann


def _synthetic_table(items: int, dim: int, clusters: int, mix: int, noise: float, seed: int):
    """L2-normalised item vectors around ``clusters`` centres (trained embedding tables are
    clustered), or uniform on the sphere with ``clusters=0`` (the worst case for any index);
    queries mix ``mix`` random centres (a user with several tastes). Row 0 is padding."""
    import torch
    from torch.nn.functional import normalize

    generator = torch.Generator().manual_seed(seed)
    table = torch.empty(items + 1, dim)
    table[0] = 0
    centres = normalize(torch.randn(max(clusters, 1), dim, generator=generator), dim=1)
    step = 200_000
    for lo in range(1, items + 1, step):
        hi = min(lo + step, items + 1)
        if clusters == 0:
            table[lo:hi] = normalize(torch.randn(hi - lo, dim, generator=generator), dim=1)
            continue
        owner = torch.randint(clusters, (hi - lo,), generator=generator)
        rows = centres[owner] + torch.randn(hi - lo, dim, generator=generator) * noise
        table[lo:hi] = normalize(rows, dim=1)
    if clusters == 0:
        return table, normalize(torch.randn(4096, dim, generator=generator), dim=1)
    picks = torch.randint(clusters, (4096, mix), generator=generator)
    weights = torch.rand(4096, mix, 1, generator=generator)
    queries = (centres[picks] * weights).sum(1)
    return table, normalize(queries + torch.randn(4096, dim, generator=generator) * noise, dim=1)


def ann_main(args: argparse.Namespace) -> None:
    import torch

    from flexgr.serve.ann import ApproximateIndex
    from flexgr.serve.topk import exact_top_k

    table, pool = _synthetic_table(
        args.items, args.dim, args.clusters, args.mix, args.noise, args.seed
    )
    queries = pool[: args.queries]
    k = args.k

    def exact(q: torch.Tensor) -> torch.Tensor:
        return exact_top_k(q, table[1:], k)[1]

    exact(queries[:1])
    single = []
    for row in range(min(args.queries, 50)):
        start = time.perf_counter()
        exact(queries[row : row + 1])
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    truth = exact(queries)
    exact_batch_ms = (time.perf_counter() - start) * 1000 / args.queries
    rows = [
        {
            "method": "exact",
            "recall": 1.0,
            "p50_ms": round(_percentile(single, 50) * 1000, 3),
            "p99_ms": round(_percentile(single, 99) * 1000, 3),
            "batched_ms_per_query": round(exact_batch_ms, 3),
        }
    ]
    start = time.perf_counter()
    index = ApproximateIndex(table, lists=args.lists, probe=1)
    build_s = time.perf_counter() - start
    for probe in args.probes:
        index._index.nprobe = probe
        index.probe = probe
        single = []
        for row in range(args.queries):
            start = time.perf_counter()
            index.search(queries[row : row + 1], k)
            single.append(time.perf_counter() - start)
        start = time.perf_counter()
        found = index.search(queries, k)[1]
        batch_ms = (time.perf_counter() - start) * 1000 / args.queries
        hits = sum(
            len(set(found[r].tolist()) & set(truth[r].tolist())) for r in range(args.queries)
        )
        rows.append(
            {
                "method": f"ivf lists={index.lists} probe={probe}",
                "recall": round(hits / (k * args.queries), 4),
                "p50_ms": round(_percentile(single, 50) * 1000, 3),
                "p99_ms": round(_percentile(single, 99) * 1000, 3),
                "batched_ms_per_query": round(batch_ms, 3),
            }
        )
    shape = (
        f"{args.clusters} clusters, noise {args.noise}, queries mix {args.mix}"
        if args.clusters
        else "uniform"
    )
    header = (
        f"{args.items:,} items x {args.dim} dims ({shape}), {args.queries} "
        f"queries, recall@{k} against exact; index built in {build_s:.1f} s; "
        f"{torch.get_num_threads()} threads"
    )
    if args.json:
        print(json.dumps({"setup": header, "build_s": round(build_s, 2), "rows": rows}))
        return
    print(header)
    print(f"{'method':<28} {'recall':>7} {'p50 ms':>8} {'p99 ms':>8} {'batched ms/q':>13}")
    for row in rows:
        print(
            f"{row['method']:<28} {row['recall']:>7.4f} {row['p50_ms']:>8.3f} "
            f"{row['p99_ms']:>8.3f} {row['batched_ms_per_query']:>13.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    http = sub.add_parser("http", help="load test a server (the default)")
    ann = sub.add_parser("ann", help="approximate top-k recall and latency")
    for p in (parser, http):
        p.add_argument("--run-dir", type=Path)
        p.add_argument("--url", help="a running server (default: start one on a free port)")
        p.add_argument(
            "--mode", choices=("user", "history", "score", "rank", "rank-history"), default="user"
        )
        p.add_argument("--requests", type=int, default=2000)
        # Beyond about 16 connections httpx's own pool costs more CPU than the server (measured
        # on 2 cores: /health alone fell from 274 req/s at 4 connections to 128 at 32).
        p.add_argument("--concurrency", type=int, default=16)
        p.add_argument("--warmup", type=int, default=50)
        p.add_argument("--max-seconds", type=float, default=300)
        p.add_argument("--k", type=int, default=10)
        p.add_argument("--candidates", type=int, default=100, help="rank modes: per request")
        p.add_argument(
            "--rank-users", type=int, default=0, help="rank: only the first N users (0: all)"
        )
        p.add_argument("--microbatch", type=int, default=1024, help="rank modes: the server's")
        p.add_argument("--max-batch", type=int, default=32)
        p.add_argument("--max-wait-ms", type=float, default=2.0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--ann", action="store_true")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", action="store_true")
    ann.add_argument("--items", type=int, default=1_000_000)
    ann.add_argument("--dim", type=int, default=64)
    ann.add_argument("--clusters", type=int, default=2000, help="0: uniform vectors")
    ann.add_argument("--mix", type=int, default=3, help="centres mixed into each query")
    ann.add_argument("--noise", type=float, default=0.1)
    ann.add_argument("--queries", type=int, default=200)
    ann.add_argument("--k", type=int, default=10)
    ann.add_argument("--lists", type=int, default=0, help="0: about 4 sqrt(items)")
    ann.add_argument(
        "--probes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 128]
    )
    ann.add_argument("--seed", type=int, default=0)
    ann.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.command == "ann":
        ann_main(args)
        return
    if args.run_dir is None:
        parser.error("--run-dir is needed (its dataset supplies the requests)")
    http_main(args)


if __name__ == "__main__":
    main()
