"""Context and data parallelism on the HSTU model: longest trainable sequence, throughput, balance.

    torchrun --nproc-per-node 2 benchmarks/distributed.py                      # GPUs (NCCL)
    torchrun --nproc-per-node 2 benchmarks/distributed.py --device cpu --tiny  # CPU/gloo smoke run

Prints one markdown table:

- Longest trainable sequence: one user's sequence of L tokens, one training step (forward,
  backward, AdamW step) under bf16 autocast, on 1 GPU and with CP=2. A length "trains" when the
  step succeeds and the peak memory the caching allocator reserved stays within --mem-cap-gib on
  every rank (torch.cuda.set_per_process_memory_fraction enforces twice the cap as a hard ceiling,
  so a runaway probe fails instead of taking the GPU; a CP probe that really runs out of memory on
  one rank only would stall its partner, so the criterion is the measured peak, not the OOM).
  Lengths grow by 1.5x, then a binary search narrows to --search-step tokens.
- Throughput: jagged batches, lengths uniform in [max_len / 4, max_len], --seqs-per-gpu sequences
  per GPU: 1 GPU, DP over all GPUs, and CP with the batch scaled by C (as the HSTU paper does), so
  every setup has the same tokens per GPU.
- Attention work per rank: pairs (query, visible key) and the measured forward+backward time of
  each rank's local attention (after the all-gather, so no communication in the timing), for the
  head-tail split and for contiguous slices.

--share-gpu runs every rank on cuda:0 over gloo, for machines with one GPU: the length search's
criterion is each process's own reserved peak, which does not depend on where the peer runs or on
the transport (NCCL's buffers are outside the caching allocator either way). Its times mean nothing.

--profile instead prints torch.profiler tables of two throughput steps (1 GPU, then CP=2) on
rank 0: where CP's time overhead goes.

On the CPU (--device cpu) nothing measures memory: the length search then uses a stand-in
criterion, local tokens <= --cpu-token-cap, only to exercise the code path. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from profiling import synchronise  # benchmarks/profiling.py
from torch import Tensor

from flexgr.batch import JaggedBatch
from flexgr.distributed import (
    ParallelConfig,
    ParallelContext,
    attend_gathered,
    balance_report,
    build_cp_mask,
    init_parallel,
    parallelize,
    shard_tokens,
    single_process,
    unwrap,
)
from flexgr.model import HSTU, HSTUConfig
from flexgr.model.spec import shard_inputs
from flexgr.ops.kernel_options import KernelOptions, set_kernel_options

_START = time.time()
GIB = 1 << 30


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{time.time() - _START:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sizes:
    layers: int
    d_model: int
    heads: int
    dqk: int
    dv: int
    items: int
    max_len: int  # throughput: longest sequence
    seqs_per_gpu: int
    search_start: int
    search_step: int
    search_max: int


FULL = Sizes(8, 512, 4, 128, 128, 10_000, 8192, 8, 8192, 1024, 1 << 20)
TINY = Sizes(2, 32, 2, 16, 16, 200, 256, 3, 64, 16, 4096)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="small model and lengths (CPU smoke run)")
    p.add_argument(
        "--backend",
        default=None,
        help="attention backend (default: triton on CUDA, reference on CPU)",
    )
    p.add_argument(
        "--rel-bias", action="store_true", help="with HSTU's relative bias (off: see docs)"
    )
    p.add_argument("--mem-cap-gib", type=float, default=24.0)
    p.add_argument(
        "--pass-mib", type=float, default=64.0,
        help="kernel.cp_pass_mib: MiB of gathered K/V per head pass (0: one head per pass, "
        "negative: no passes)",
    )
    p.add_argument("--autotune", action="store_true", help="kernel.autotune (default off)")
    p.add_argument("--cpu-token-cap", type=int, default=300)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-search", action="store_true")
    p.add_argument(
        "--search-only", action="store_true", help="only the longest-sequence search"
    )
    p.add_argument(
        "--profile", action="store_true",
        help="only profile two throughput steps of 1 GPU and CP=2 (torch.profiler, rank 0)",
    )
    p.add_argument(
        "--share-gpu", action="store_true",
        help="all ranks on cuda:0 over gloo (memory only: one-GPU machines)",
    )
    p.add_argument("--search-start", type=int, default=0, help="first probed length (0: preset)")
    p.add_argument("--search-step", type=int, default=0, help="search resolution (0: preset)")
    return p.parse_args()


# ---------------------------------------------------------------- model, data, step


def build_model(
    sz: Sizes, max_seq_len: int, backend: str, rel_bias: bool, device: torch.device
) -> HSTU:
    torch.manual_seed(0)
    cfg = HSTUConfig(
        num_items=sz.items,
        d_model=sz.d_model,
        num_layers=sz.layers,
        num_heads=sz.heads,
        dqk=sz.dqk,
        dv=sz.dv,
        max_seq_len=max_seq_len,
        len_margin=1,
        alpha=sz.dqk**-0.5,
        rel_bias=rel_bias,
        backend=backend,
    )
    return HSTU(cfg).to(device)


@dataclass
class Batch:
    ids: Tensor
    offsets: Tensor
    timestamps: Tensor
    labels: Tensor  # next item of every token (a random one after the last)


def make_batch(lengths: list[int], items: int, device: torch.device, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ids = torch.randint(1, items + 1, (T,), generator=g)
    labels = torch.cat([ids[1:], torch.randint(1, items + 1, (1,), generator=g)])
    ts = torch.cumsum(torch.randint(0, 3600, (T,), generator=g), 0)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return Batch(ids.to(device), offsets.to(device), ts.to(device), labels.to(device))


def loss_sum(model: HSTU, out_TD: Tensor, labels_T: Tensor, negatives: Tensor) -> Tensor:
    """Sampled softmax over the next item and shared negatives, summed over local tokens."""
    pos = (out_TD * model.item_embeddings(labels_T)).sum(-1, keepdim=True)
    neg = out_TD @ model.item_embeddings(negatives).T
    logits = torch.cat([pos, neg], dim=-1).float() / 0.05
    return (torch.logsumexp(logits, -1) - logits[:, 0]).sum()


class Trainer:
    """One setup: a model parallelised for ``ctx``, an optimizer, and a step function."""

    def __init__(
        self, sz: Sizes, ctx: ParallelContext, max_seq_len: int, backend: str, rel_bias: bool
    ) -> None:
        self.sz, self.ctx = sz, ctx
        self.model = build_model(sz, max_seq_len, backend, rel_bias, ctx.device)
        self.net = parallelize(self.model, ctx)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        self.negatives = torch.randint(1, sz.items + 1, (128,), generator=g).to(ctx.device)

    def step(self, batch: Batch) -> None:
        """One training step on this rank's share of ``batch`` (its dp replica's sequences)."""
        ctx = self.ctx
        sharded = shard_inputs(
            self.model, JaggedBatch(batch.ids, batch.offsets, batch.timestamps), ctx
        )
        total = ctx.all_reduce_sum(torch.tensor(float(sharded.item_ids.numel()), device=ctx.device))
        use_bf16 = ctx.device.type == "cuda"
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = self.net(sharded)
            loss = (
                loss_sum(unwrap(self.net), out, sharded.take(batch.labels), self.negatives) / total
            )
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """values of every rank, rank by rank."""
    if dist.get_backend() == "gloo":
        device = torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [x.tolist() for x in out]


def stage_token_collectives_on_host() -> None:
    """Run CP's token collectives on host copies, so that gloo sees only CPU tensors (its
    reduce-scatter is missing in some torch releases, and its CUDA paths are not relied on). The
    GPU allocations stay those of the NCCL path (the gathered output, the scattered slice), so
    peaks are unchanged."""
    from flexgr.distributed import collectives

    def all_gather(out: Tensor, x: Tensor, group=None) -> None:
        host = torch.empty(out.shape, dtype=out.dtype)
        dist.all_gather_into_tensor(host, x.cpu(), group=group)
        out.copy_(host)

    def reduce_scatter(out: Tensor, x: Tensor, group=None) -> None:
        out.copy_(collectives.reduce_scatter_tokens(x.cpu(), group))  # its CPU path

    collectives._all_gather_single = all_gather
    collectives._reduce_scatter_single = reduce_scatter


# ---------------------------------------------------------------- longest trainable sequence


def probe(
    sz: Sizes, ctx: ParallelContext, L: int, args: argparse.Namespace, backend: str
) -> tuple[bool, float]:
    """Does one sequence of L tokens train? Returns (fits on every rank, max peak GiB)."""
    device = ctx.device
    free(device)
    ok, peak = True, 0.0
    try:
        trainer = Trainer(sz, ctx, L, backend, args.rel_bias)
        batch = make_batch([L], sz.items, device, seed=L)
        for _ in range(2):  # the second step holds the optimizer state too
            trainer.step(batch)
        synchronise(device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_reserved(device) / GIB
            ok = peak <= args.mem_cap_gib
        else:
            ok = -(-L // ctx.cp_size) <= args.cpu_token_cap
        del trainer, batch
    except torch.OutOfMemoryError:
        ok, peak = False, float("inf")
    free(device)
    flags = gather_floats([float(ok), peak], device)
    return all(f[0] == 1.0 for f in flags), max(f[1] for f in flags)


def longest_sequence(
    sz: Sizes, ctx: ParallelContext, args: argparse.Namespace, backend: str, name: str
) -> tuple[int, float]:
    step = sz.search_step
    good, good_peak, bad = 0, 0.0, None
    L = sz.search_start
    while L <= sz.search_max:
        fits, peak = probe(sz, ctx, L, args, backend)
        log(f"{name}: L={L} {'fits' if fits else 'does not fit'} (peak {peak:.2f} GiB)")
        if not fits:
            bad = L
            break
        good, good_peak = L, peak
        L = -(-int(L * 1.5) // step) * step
    if bad is None:
        return good, good_peak
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            break
        fits, peak = probe(sz, ctx, mid, args, backend)
        log(f"{name}: L={mid} {'fits' if fits else 'does not fit'} (peak {peak:.2f} GiB)")
        if fits:
            good, good_peak = mid, peak
        else:
            bad = mid
    return good, good_peak


# ---------------------------------------------------------------- throughput


def jagged_lengths(n: int, max_len: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(max_len // 4, max_len + 1, (n,), generator=g).tolist()


def throughput(
    sz: Sizes, ctx: ParallelContext, args: argparse.Namespace, backend: str
) -> tuple[int, list[float], float]:
    """(global tokens per step, step ms of every rank, peak GiB max over ranks)."""
    device = ctx.device
    free(device)
    trainer = Trainer(sz, ctx, sz.max_len, backend, args.rel_bias)
    per_replica = sz.seqs_per_gpu * ctx.cp_size  # CP: C times the batch, same tokens per GPU
    batches, tokens = [], 0
    for step in range(args.warmup + args.steps):
        lengths = jagged_lengths(per_replica * ctx.dp_size, sz.max_len, seed=step)
        mine = lengths[ctx.dp_rank * per_replica : (ctx.dp_rank + 1) * per_replica]
        batches.append(make_batch(mine, sz.items, device, seed=1000 * step + ctx.dp_rank))
        if step >= args.warmup:
            tokens += sum(lengths)
    # Every batch once, untimed: the kernels tune tiles per length bucket on first sight, and the
    # first setup timed would otherwise pay for the buckets that the later ones reuse.
    for b in batches:
        trainer.step(b)
    synchronise(device)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    for b in batches[args.warmup :]:
        trainer.step(b)
    synchronise(device)
    ms = (time.perf_counter() - t0) * 1e3 / args.steps
    peak = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else 0.0
    del trainer, batches
    free(device)
    per_rank = gather_floats([ms, peak], device)
    return tokens // args.steps, [r[0] for r in per_rank], max(r[1] for r in per_rank)


def profile_steps(
    sz: Sizes, ctx: ParallelContext, args: argparse.Namespace, backend: str, name: str
) -> None:
    """Two throughput steps under torch.profiler; rank 0 prints where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    device = ctx.device
    free(device)
    trainer = Trainer(sz, ctx, sz.max_len, backend, args.rel_bias)
    per_replica = sz.seqs_per_gpu * ctx.cp_size
    lengths = jagged_lengths(per_replica * ctx.dp_size, sz.max_len, seed=0)
    mine = lengths[ctx.dp_rank * per_replica : (ctx.dp_rank + 1) * per_replica]
    batch = make_batch(mine, sz.items, device, seed=ctx.dp_rank)
    for _ in range(2):
        trainer.step(batch)
    synchronise(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 2
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step(batch)
        synchronise(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    del trainer, batch
    free(device)
    if dist.get_rank() != 0:
        return
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy_ms = sum(getattr(e, attr, 0.0) for e in events) / 1e3 / steps
    print(f"\n### profile: {name}, {sum(mine):,} tokens on this replica, rank 0")
    print(f"wall {wall_ms:.1f} ms/step; summed self {attr} {busy_ms:.1f} ms/step "
          "(streams overlap, so this can exceed the wall time)\n")
    print(events.table(sort_by=attr, row_limit=25, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


# ---------------------------------------------------------------- attention work per rank


def time_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    fn()
    synchronise(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronise(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attention_work(
    sz: Sizes, ctx: ParallelContext, scheme: str, backend: str
) -> tuple[int, list[int], list[float], float]:
    """(tokens, pairs per CP rank, local attention fwd+bwd ms per CP rank, max/mean pairs) for the
    first throughput batch of this CP group, split by ``scheme``."""
    device = ctx.device
    lengths = jagged_lengths(sz.seqs_per_gpu * ctx.cp_size * ctx.dp_size, sz.max_len, seed=0)
    lengths = lengths[: sz.seqs_per_gpu * ctx.cp_size]  # dp replica 0's batch, the same on all
    offsets = torch.tensor([0, *lengths], device=device).cumsum(0)
    report = balance_report(offsets, ctx.cp_size, scheme=scheme)
    shard = shard_tokens(offsets, ctx.cp_size, ctx.cp_rank, scheme=scheme)
    mask = build_cp_mask(shard, with_block_mask=backend == "flex")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(ctx.rank)

    def rnd(n: int, d: int) -> Tensor:
        return (
            0.1 * torch.randn(n, sz.heads, d, generator=g, device=device, dtype=dtype)
        ).requires_grad_()

    q = rnd(shard.local_len, sz.dqk)
    k, v = rnd(shard.gathered_len, sz.dqk), rnd(shard.gathered_len, sz.dv)

    def fwd_bwd() -> None:
        out = attend_gathered(
            q, k, v, mask, max_seq_len=sz.max_len, alpha=sz.dqk**-0.5, backend=backend
        )
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    ms = time_ms(fwd_bwd, device, reps=10 if device.type == "cuda" else 2)
    per_rank = gather_floats([ms], device)
    # Ranks of CP group 0 are 0..C-1 (cp is the inner mesh axis).
    times = [per_rank[r][0] for r in range(ctx.cp_size)]
    return sum(lengths), list(report.pairs_per_rank), times, report.imbalance


# ---------------------------------------------------------------- main


def fmt_ranks(values: list[float], unit: str, digits: int = 1) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values) + f" {unit}"


def main() -> None:
    args = parse_args()
    set_kernel_options(KernelOptions(autotune=args.autotune, cp_pass_mib=args.pass_mib))
    local_rank = 0 if args.share_gpu else int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    nccl = device.type == "cuda" and not args.share_gpu
    if args.share_gpu:
        stage_token_collectives_on_host()
    # Triton on CUDA: it compiles once per mask-option set, where flex recompiles for every probed
    # length (50-150 s each on the 2x H200 run).
    backend = args.backend or ("triton" if args.device == "cuda" else "reference")
    sz = TINY if args.tiny else FULL
    if args.search_start or args.search_step:
        sz = dataclasses.replace(
            sz,
            search_start=args.search_start or sz.search_start,
            search_step=args.search_step or sz.search_step,
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Every probe length is a new shape for compiled flex: allow many recompiles, or dynamo
        # would fall back to eager flex, which materialises T x T scores.
        for name in ("cache_size_limit", "recompile_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
    # A short timeout turns a stalled collective (one CP rank out of memory) into an error.
    dist.init_process_group(
        "nccl" if nccl else "gloo",
        timeout=timedelta(minutes=10),
        device_id=device if nccl else None,
    )
    W = dist.get_world_size()
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(0.95, 2 * args.mem_cap_gib * GIB / total), device
        )
    contexts: dict[tuple[int, int], ParallelContext] = {}

    def context(dp: int, cp: int) -> ParallelContext:
        if (dp, cp) == (1, 1):
            return single_process(device)
        if (dp, cp) not in contexts:
            contexts[(dp, cp)] = init_parallel(ParallelConfig(dp=dp, cp=cp), device)
        return contexts[(dp, cp)]

    if args.profile:
        for name, (dp, cp) in (("1 GPU", (1, 1)), ("CP=2 (2x batch)", (W // 2, 2))):
            if W % cp == 0:
                profile_steps(sz, context(dp, cp), args, backend, name)
        dist.barrier()
        dist.destroy_process_group()
        return
    rows: list[tuple[str, ...]] = []
    cap = (
        f"peak <= {args.mem_cap_gib:g} GiB"
        if device.type == "cuda"
        else f"CPU stand-in: <= {args.cpu_token_cap} local tokens"
    )
    if not args.skip_search and W % 2 == 0:
        for name, (dp, cp) in (("1 GPU", (1, 1)), ("CP=2", (W // 2, 2))):
            L, peak = longest_sequence(sz, context(dp, cp), args, backend, name)
            gpus = 1 if cp == 1 else 2
            peak_text = f"peak {peak:.2f} GiB (max over ranks)" if device.type == "cuda" else "-"
            rows.append(
                (
                    f"longest trainable sequence ({cap})",
                    name,
                    str(gpus),
                    "-",
                    f"{L:,} tokens",
                    peak_text,
                )
            )

    setups = [("1 GPU", 1, 1), (f"DP={W}", W, 1)]
    for cp in sorted({2, W}):
        if W % cp == 0 and cp > 1:
            dp = W // cp
            setups.append(
                (f"CP={cp}" + (f" x DP={dp}" if dp > 1 else "") + f" ({cp}x batch)", dp, cp)
            )
    for name, dp, cp in [] if args.search_only else setups:
        log(f"throughput {name}")
        ctx = context(dp, cp)
        tokens, ms, peak = throughput(sz, ctx, args, backend)
        gpus = dp * cp
        tok_s = tokens / (max(ms[:gpus]) / 1e3)
        rows.append(
            (
                f"throughput (lengths {sz.max_len // 4}-{sz.max_len}, {sz.seqs_per_gpu} seqs/GPU)",
                name,
                str(gpus),
                f"{tokens:,}",
                f"{tok_s:,.0f} tokens/s",
                "step "
                + fmt_ranks(ms[:gpus], "ms")
                + (f"; peak {peak:.1f} GiB" if device.type == "cuda" else ""),
            )
        )
        for scheme in ("zigzag", "contiguous") if cp > 1 else ():
            log(f"attention work {name} {scheme}")
            tokens, pairs, times, imbalance = attention_work(sz, ctx, scheme, backend)
            split = "head-tail" if scheme == "zigzag" else "contiguous"
            rows.append(
                (
                    "attention work per rank (one CP group, local fwd+bwd)",
                    f"CP={cp} {split}",
                    str(cp),
                    f"{tokens:,}",
                    f"max/mean pairs {imbalance:.3f}",
                    "pairs "
                    + " / ".join(f"{p:,}" for p in pairs)
                    + "; "
                    + fmt_ranks(times, "ms", 2),
                )
            )
    if dist.get_rank() == 0:
        model = f"HSTU {sz.layers} layers, d={sz.d_model}, H={sz.heads}, dqk={sz.dqk}, dv={sz.dv}"
        dtype = "bf16 autocast" if device.type == "cuda" else "fp32"
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        passes = args.pass_mib
        print(
            f"\n{W} x {where}, torch {torch.__version__}, {model}, {dtype}, backend {backend}, "
            f"relative bias {'on' if args.rel_bias else 'off'}, kernel.cp_pass_mib {passes}\n"
        )
        print("| measurement | setup | GPUs | tokens/step | result | per rank |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
