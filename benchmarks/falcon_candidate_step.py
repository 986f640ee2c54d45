"""M-FALCON's cached candidate pass (a cache hit), against the pre-change candidate step.

    python benchmarks/falcon_candidate_step.py --threads 1 --dtype fp32
    python benchmarks/falcon_candidate_step.py --threads 1 --dtype bf16

One ``hstu-ranking`` model (interleaved: 2 tokens per event), one history encoded once, then
``candidate_logits`` over ``--candidates`` candidates in microbatches of ``--microbatch``, the
cache reused (what a ``HistoryStore`` hit runs). Two candidate steps are timed in the same
process, their repetitions interleaved so that a shared machine's noise falls on both:

- ``current``: :class:`flexgr.model.hstu.falcon._CachedAttention` as it is;
- ``einsum fp32``: the step before the prepared layout (:class:`EinsumStep` below: every
  microbatch up-casts the whole cached K and V to fp32, einsums over [m, H, L], and gathers and
  buckets the bias row over all L history tokens), kept here only as the baseline.

Prints the medians, their ratio and the largest gap between the two steps' logits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor

from flexgr.model.hstu import falcon
from flexgr.model.hstu.inputs import BiasWeights
from flexgr.model.registry import build_model
from flexgr.ops.rab import time_bucket
from flexgr.ranking.falcon import candidate_logits, encode_ranking_history


@dataclass(frozen=True)
class EinsumStep:
    """The candidate step before the prepared layout (the baseline; same results)."""

    cache: falcon.HistoryCache
    index: int

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, max_seq_len: int, alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor:  # fmt: skip
        cache = self.cache
        k_h, v_h = cache.keys[self.index], cache.values[self.index]
        acc = torch.promote_types(q.dtype, torch.float32)
        q_c = q.to(acc)
        s_hist = alpha * torch.einsum("mhd,lhd->mhl", q_c, k_h.to(acc))
        s_self = alpha * (q_c * k.to(acc)).sum(-1)
        if bias is not None:
            pos_w, ts_w = bias
            N, L = (pos_w.numel() + 1) // 2, cache.length
            pos = torch.arange(L, device=q.device)
            rel = (N - 1 + pos - L).clamp(0, 2 * N - 2)
            buckets = time_bucket(cache.query_time - cache.timestamps, ts_w.numel() - 1)
            s_hist = s_hist + (pos_w[rel] + ts_w[buckets]).to(acc)
            zero = torch.zeros(1, dtype=torch.int64, device=q.device)
            s_self = s_self + (pos_w[N - 1] + ts_w[time_bucket(zero, ts_w.numel() - 1)]).to(acc)
        attn = torch.einsum("mhl,lhd->mhd", F.silu(s_hist), v_h.to(acc))
        attn = (attn + F.silu(s_self).unsqueeze(-1) * v.to(acc)) / max_seq_len
        return attn.to(v.dtype)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--history", type=int, default=1024, help="events (2 tokens each)")
    p.add_argument("--candidates", type=int, default=256, help="m")
    p.add_argument("--microbatch", type=int, default=64, help="b_m")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--profile", action="store_true",
                   help="then profile the current step: kernels by device time vs host time")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    torch.manual_seed(0)
    num_items, n = 10_000, args.history
    options = {
        "num_items": num_items, "max_seq_len": n, "d_model": args.d_model,
        "num_layers": args.layers, "num_heads": args.heads,
        "dqk": args.d_model // args.heads, "dv": args.d_model // args.heads,
        "layout": "interleaved", "action_inputs": ["rating"], "action_vocab": [11],
        "tasks": ["like", "rating"], "task_kinds": ["bce", "mse"],
    }  # fmt: skip
    model = build_model("hstu-ranking", options).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, num_items + 1, (n,), generator=g).to(device)
    actions = torch.randint(0, 11, (n, 1), generator=g).to(device)
    timestamps = (1_000_000 + torch.cumsum(torch.randint(0, 4000, (n,), generator=g), 0)).to(device)
    query_time = int(timestamps[-1]) + 60
    candidates = torch.randint(1, num_items + 1, (args.candidates,), generator=g).to(device)

    current = falcon._CachedAttention
    steps = {"current": current, "einsum fp32": EinsumStep}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    logits: dict[str, Tensor] = {}
    with torch.no_grad():
        cache = encode_ranking_history(model, items, actions, timestamps, query_time)
        try:
            for rep in range(args.reps + 1):  # the first round warms up
                for name, step in steps.items():
                    falcon._CachedAttention = step  # candidate_pass builds one per layer
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    out = candidate_logits(model, cache, candidates, microbatch=args.microbatch)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if rep:
                        seconds[name].append(time.perf_counter() - start)
                    logits[name] = out.float()
        finally:
            falcon._CachedAttention = current
    gap = (logits["current"] - logits["einsum fp32"]).abs().max().item()
    ms = {name: statistics.median(s) * 1e3 for name, s in seconds.items()}
    print(
        f"# {device}, {torch.get_num_threads()} threads, {args.dtype}, history {n} events "
        f"({2 * n} tokens), d={args.d_model}, {args.layers} layers, {args.heads} heads, "
        f"m={args.candidates}, b_m={args.microbatch}, median of {args.reps}"
    )
    for name, value in ms.items():
        print(f"{name}: {value:.2f} ms per cached pass")
    print(f"einsum fp32 / current: {ms['einsum fp32'] / ms['current']:.2f}x")
    print(f"largest |current - einsum fp32| logit gap: {gap:.3g}")
    if args.profile:
        with torch.no_grad():
            print_profile(lambda: candidate_logits(model, cache, candidates,
                                                   microbatch=args.microbatch), device)


def print_profile(call, device: torch.device) -> None:  # noqa: ANN001
    """Kernels of 3 cached passes by device time, and the host time of one pass."""
    from profiling import profile_calls  # benchmarks/profiling.py

    p = profile_calls(call, 3, device)
    launches = sum(e.count for e in p.kernels) // 3
    print(f"## profile: kernels {p.device_ms:.2f} ms per pass, {launches} kernel launches per "
          f"pass, host {p.host_ms:.2f} ms per pass (unsynchronised)")
    for e in p.top_kernels(10):
        print(f"  {e.self_device_time_total / 3e3:7.3f} ms {e.count // 3:5d}x  {e.key[:80]}")
    for e in p.top_host(10):
        print(f"  host {e.self_cpu_time_total / 3e3:7.3f} ms {e.count // 3:5d}x  {e.key[:70]}")


if __name__ == "__main__":
    main()
