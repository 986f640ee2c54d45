"""M-FALCON for HSTU ranking: cached vs uncached candidate throughput, and throughput vs m.

    python benchmarks/falcon_ranking.py --device cuda             # H200: 1024 cands, 4096 events
    python benchmarks/falcon_ranking.py --device cpu --quick      # tiny sizes: checks it runs
    python benchmarks/falcon_ranking.py --device cpu --history 512 --candidates 256 \
        --microbatch 32 --d-model 64 --layers 2 --ms 64,256,1024 --threads 1

One request: ``--history`` events (interleaved: 2 tokens each) and ``--candidates`` (m)
candidates of an ``hstu-ranking`` model (``--layers``, ``--d-model``, ``--heads``; the HSTU
paper's small industrial ranking setting is l=3, d=512). Four ways to get every candidate's
task logits, all equal (tests/ranking/test_falcon.py; the script prints the largest gap):

- ``uncached, b_m = m``: all candidates the targets of one pass over history + candidates
  (the paper's single-microbatch baseline);
- ``uncached, b_m``: each microbatch of ``--microbatch`` candidates the targets of its own pass,
  the history recomputed per microbatch (``Ranker.score(falcon=False)``);
- ``M-FALCON, b_m``: the history once (keys and values per layer), then the microbatches
  against the cache (``Ranker.score``);
- ``M-FALCON, cache hit``: a later request of the same user and history
  (``Ranker.score(cache_key=...)`` hitting ``Ranker.history_cache``): the microbatches only;
- ``M-FALCON, cache hit, CUDA graph`` (CUDA only): the same, each microbatch a replay of the
  pass captured on the cache (what ``Ranker.score`` runs on a hit; the capture is outside the
  timing, made by the warm-up).

The first table is at m = ``--candidates``; the second is candidates per second against m in
``--ms`` (default 256 ... 16384) at fixed b_m. Times are medians of ``--reps`` after a warm-up,
with the device synchronised; the model runs in ``--dtype`` (bf16 on CUDA by default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from profiling import synchronise  # benchmarks/profiling.py

from flexgr.model.hstu.inputs import backend_choice
from flexgr.model.registry import build_model, spec_of
from flexgr.ranking.batch import RankingBatch
from flexgr.ranking.falcon import candidate_logits, encode_ranking_history

QUICK = {"history": 24, "candidates": 16, "microbatch": 4, "ms": "8,16,32", "d_model": 16,
         "layers": 2, "heads": 2, "reps": 2}  # fmt: skip


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up."""
    fn()
    synchronise(device)
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronise(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


class Request:
    """One user's history (with actions) and candidate pool on the device."""

    def __init__(self, num_items: int, history: int, pool: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = torch.randint(1, num_items + 1, (history,), generator=g).to(device)
        self.actions = torch.randint(0, 11, (history, 1), generator=g).to(device)
        gaps = torch.randint(0, 4000, (history,), generator=g)
        self.timestamps = (1_000_000 + torch.cumsum(gaps, 0)).to(device)
        self.query_time = int(self.timestamps[-1]) + 60
        self.pool = torch.randint(1, num_items + 1, (pool,), generator=g).to(device)

    def uncached(self, model, candidates: torch.Tensor, microbatch: int) -> torch.Tensor:
        """Each microbatch the targets of one pass over the whole history (the old path)."""
        device, out, n = candidates.device, [], self.items.shape[0]
        for start in range(0, candidates.numel(), microbatch):
            chunk = candidates[start : start + microbatch]
            batch = RankingBatch(
                self.items,
                self.actions,
                self.timestamps,
                torch.tensor([0, n], device=device),
                chunk,
                torch.tensor([0, chunk.numel()], device=device),
                torch.tensor([self.query_time], device=device),
            )
            out.append(model(batch, spec_of(model).prepare(model, batch)))
        return torch.cat(out)

    def encode(self, model):
        return encode_ranking_history(
            model, self.items, self.actions, self.timestamps, self.query_time
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--history", type=int, default=4096, help="events in the history")
    p.add_argument("--candidates", type=int, default=1024, help="m of the first table")
    p.add_argument("--microbatch", type=int, default=256, help="b_m")
    p.add_argument("--ms", default="256,512,1024,2048,4096,8192,16384", help="m of table 2")
    p.add_argument("--layout", choices=["interleaved", "merged"], default="interleaved")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--no-uncached", action="store_true", help="skip the uncached rows of table 2")
    p.add_argument("--delta-query", action="store_true",
                   help="M-FALCON's candidate step on the delta-query kernel (kernel.delta_query)")
    args = p.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.delta_query:
        from flexgr.ops.kernel_options import KernelOptions, set_kernel_options

        set_kernel_options(KernelOptions(delta_query=True))
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    ms = [int(m) for m in args.ms.split(",")]
    L, M, bm = args.history, args.candidates, args.microbatch

    torch.manual_seed(0)
    num_items = 100_000
    options = {
        "num_items": num_items,
        "max_seq_len": L,
        "d_model": args.d_model,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "dqk": args.d_model // args.heads,
        "dv": args.d_model // args.heads,
        "layout": args.layout,
        "action_inputs": ["rating"],
        "action_vocab": [11],
        "tasks": ["like", "dislike", "rating"],
        "task_kinds": ["bce", "bce", "mse"],
    }
    model = build_model("hstu-ranking", options).to(device=device, dtype=dtype).eval()
    request = Request(num_items, L, max([M, *ms]), device)
    chosen = backend_choice(model.encoder.cfg, device, training=False).backend
    cpu = f"cpu, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    tokens = (2 if args.layout == "interleaved" else 1) * L
    print(
        f"# {device} ({name}), {dtype_name}, {args.layout}, history {L} events ({tokens} "
        f"tokens), d={args.d_model}, {args.layers} layers, {args.heads} heads, "
        f"history attention backend {chosen}, candidate step "
        f"{'delta-query kernel' if args.delta_query else 'batched matmuls'}"
    )

    with torch.no_grad():
        cands = request.pool[:M]
        cache = request.encode(model)
        check = min(M, 64)
        gap = (
            (candidate_logits(model, cache, cands[:check], microbatch=bm).float()
             - request.uncached(model, cands[:check], check).float()).abs().max().item()
        )  # fmt: skip
        print(f"# largest |M-FALCON - uncached| over {check} candidates: {gap:.3g} ({dtype_name})")
        print(f"# history cache: {cache.nbytes() / 2**20:.1f} MiB per user")

        def falcon(candidates: torch.Tensor) -> None:
            candidate_logits(model, request.encode(model), candidates, microbatch=bm)

        def hit(candidates: torch.Tensor) -> None:
            candidate_logits(model, cache, candidates, microbatch=bm)

        graphs = device.type == "cuda"

        def replay(candidates: torch.Tensor) -> None:
            candidate_logits(model, cache, candidates, microbatch=bm, cuda_graph=True)

        if graphs:
            got = candidate_logits(model, cache, cands, microbatch=bm, cuda_graph=True)
            want = candidate_logits(model, cache, cands, microbatch=bm)
            print(f"# largest |CUDA graph - eager| cache-hit logit gap: "
                  f"{(got.float() - want.float()).abs().max().item():.3g}")

        rows = [
            (f"uncached, b_m = m = {M}", timed(lambda: request.uncached(model, cands, M),
                                              device, args.reps)),
            (f"uncached, b_m = {bm}", timed(lambda: request.uncached(model, cands, bm),
                                           device, args.reps)),
            (f"M-FALCON, b_m = {bm}", timed(lambda: falcon(cands), device, args.reps)),
            (f"M-FALCON, b_m = {bm}, cache hit", timed(lambda: hit(cands), device, args.reps)),
        ]  # fmt: skip
        if graphs:
            rows.append((f"M-FALCON, b_m = {bm}, cache hit, CUDA graph",
                         timed(lambda: replay(cands), device, args.reps)))
        base = rows[0][1]
        print(f"\n## {M} candidates over {L} events\n")
        print("| path | ms per request | candidates / s | vs b_m = m uncached |")
        print("| --- | --- | --- | --- |")
        for name, sec in rows:
            print(f"| {name} | {sec * 1e3:.2f} | {M / sec:,.0f} | {base / sec:.2f}x |")

        print(f"\n## candidates / s against m, b_m = {bm}, {L} events\n")
        header = ["m", "M-FALCON", "M-FALCON, cache hit"] + (["cache hit, CUDA graph"] if graphs else [])
        if not args.no_uncached:
            header += [f"uncached, b_m = {bm}", "M-FALCON vs uncached"]
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
        for m in ms:
            pool = request.pool[:m]
            full = timed(lambda pool=pool: falcon(pool), device, args.reps)
            cached = timed(lambda pool=pool: hit(pool), device, args.reps)
            cells = [f"{m}", f"{m / full:,.0f}", f"{m / cached:,.0f}"]
            if graphs:
                cells.append(f"{m / timed(lambda pool=pool: replay(pool), device, args.reps):,.0f}")
            if not args.no_uncached:
                old = timed(lambda pool=pool: request.uncached(model, pool, bm), device, args.reps)
                cells += [f"{m / old:,.0f}", f"{old / full:.2f}x"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
