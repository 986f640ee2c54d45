"""Triton HSTU kernel vs the flex backend vs SDPA FlashAttention: one table of median ms.

    PYTHONPATH=. python3 benchmarks/triton_attention.py [--ablations] [--json PATH]
    PYTHONPATH=. python3 benchmarks/triton_attention.py --sparse    # the sparse-mask table only
    PYTHONPATH=. python3 benchmarks/triton_attention.py --quick     # tiny shapes; CPU works
    PYTHONPATH=. python3 benchmarks/triton_attention.py --profile   # causal vs SLA: kernels vs host

bf16, H=4, D=128, jagged lengths uniform in [N/2, N]. SDPA (softmax, is_causal) runs on the
padded [B, H, N, D] batch, as a library without jagged support must. Block masks are built once
per batch (shared by all layers in a model) and are not timed. TF/s counts useful FLOPs only:
4 D per visible (query, key) pair and head forward, 14 D for forward + backward (the backward's
five products against the forward's two), with the visible pairs of each row's own mask (SDPA is
credited with the causal pairs of the jagged batch).

The sparse-mask table (issue 15's targets) times masks against causal on the same batch, in
one run: local window 256 forward vs causal forward at 16x4096, and ULTRA-HSTU semi-local
attention (K1 = 256 local, K2 = 256 global, both modes) forward + backward vs causal on one
sequence of 16384 tokens, with the key blocks each mask's tables make the kernel visit.

``--quick`` runs tiny shapes (H=2, D=16, fp32, windows of 16 and 32, 32-blocks in the sparse
table) to check the script:
without CUDA the kernels run in Triton's interpreter and the times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexgr.masks import (
    and_masks,
    build_custom_mask,
    build_hstu_mask,
    build_semi_local_mask,
    dense_hstu_mask,
    jagged,
    semi_local,
)
from flexgr.masks.block import HSTUMask
from flexgr.ops.flex import hstu_attention_flex
from flexgr.ops.kernel_options import kernel_options_set
from flexgr.ops.triton_backend import hstu_attention_triton
from flexgr.ops.triton_hstu.visits import query_tile_trips

H, D = 4, 128
DEVICE = "cuda"
DTYPE = torch.bfloat16
SHAPES = [(64, 1024), (16, 4096), (8, 8192)]
WINDOW = 256  # the local-window case of the main table and of the sparse table
WINDOW_SHAPE = (16, 4096)  # sparse table: window forward vs causal forward
SLA = (256, 256)  # (K1 local, K2 global)
SLA_SHAPE = (1, 16384)  # sparse table: SLA fwd+bwd vs causal, one sequence of N tokens
MASK_BLOCK = 128  # BlockMask block size of the sparse table


def use_quick_mode() -> None:
    """Tiny shapes; the interpreter when there is no GPU (set before triton.language loads)."""
    global H, D, DEVICE, DTYPE, SHAPES, WINDOW, WINDOW_SHAPE, SLA, SLA_SHAPE, MASK_BLOCK
    H, D, DTYPE, SHAPES = 2, 16, torch.float32, [(2, 128)]
    WINDOW, WINDOW_SHAPE, SLA, SLA_SHAPE = 16, (2, 160), (32, 32), (1, 256)
    MASK_BLOCK = 32  # so that the tiny shapes still have blocks to skip
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        DEVICE = "cpu"


@dataclass
class Row:
    case: str
    shape: str
    impl: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    pairs: int = 0
    note: str = ""
    blocks: int = 0  # mask blocks the kernel's query tiles visit (partial + full)
    # The same calls replayed from a CUDA graph (sparse table): the kernels' time without the
    # ~0.3 ms of host work per call that bounds short sparse kernels (BENCHMARKS.md).
    graph_fwd_ms: float | None = None
    graph_fwd_bwd_ms: float | None = None


def median_ms(fn: Callable[[], object]) -> float:
    if DEVICE != "cuda":  # --quick on CPU: one timed call (interpreted, meaningless)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def graphed_ms(fn: Callable[[], object]) -> float | None:
    """Median ms of replaying ``fn``'s launches from one CUDA graph (None off CUDA). ``fn``
    must not sync with the host (tiles tuned and tile orders built by earlier calls)."""
    if DEVICE != "cuda":
        return None
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(do_bench(graph.replay, warmup=25, rep=200, return_mode="median"))


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def visited_blocks(mask: HSTUMask) -> int:
    """Mask blocks the forward visits: its loop trips at tiles of one mask block."""
    bm = mask.block_mask
    mbq, mbkv = (int(b) for b in bm.BLOCK_SIZE)
    return int(query_tile_trips(bm, mbq, mbkv).total.sum())


def with_backward(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def visible_pairs(lengths: torch.Tensor, num_targets: torch.Tensor | None, max_attn_len: int) -> int:
    """Exact count of (query, key) pairs the HSTU mask allows, one sequence at a time."""
    total = 0
    for i, L in enumerate(lengths.tolist()):
        nt = None if num_targets is None else num_targets[i : i + 1]
        m = dense_hstu_mask(torch.tensor([L], device=DEVICE), L, num_targets=nt,
                            max_attn_len=max_attn_len)
        total += int(m.sum())
    return total


def triton_row(case: str, shape: str, q, k, v, mask, N: int, impl: str, pairs: int,
               graphs: bool = False) -> Row:
    def fwd() -> torch.Tensor:
        return hstu_attention_triton(q, k, v, mask, max_seq_len=N, alpha=1.0 / D**0.5)

    start = time.perf_counter()
    with_backward(fwd, [q, k, v])()  # compile + tune outside the timed region
    synchronize()
    first_s = time.perf_counter() - start
    note = f"first call {first_s:.1f} s" if first_s > 1.0 else ""
    row = Row(case, shape, impl, median_ms(fwd), median_ms(with_backward(fwd, [q, k, v])), pairs,
              note, visited_blocks(mask))
    if graphs:
        row.graph_fwd_ms = graphed_ms(fwd)
        row.graph_fwd_bwd_ms = graphed_ms(with_backward(fwd, [q, k, v]))
    return row


def flex_row(case: str, shape: str, q, k, v, mask, N: int, pairs: int) -> Row:
    def fwd() -> torch.Tensor:
        return hstu_attention_flex(q, k, v, mask, max_seq_len=N, alpha=1.0 / D**0.5)

    with_backward(fwd, [q, k, v])()
    return Row(case, shape, "flex", median_ms(fwd), median_ms(with_backward(fwd, [q, k, v])), pairs,
               blocks=visited_blocks(mask))


def sdpa_row(shape: str, B: int, N: int, pairs: int) -> Row:
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
               for _ in range(3))
    backends = [SDPBackend.FLASH_ATTENTION] if DEVICE == "cuda" else [SDPBackend.MATH]

    def fwd() -> torch.Tensor:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return Row("causal", shape, "sdpa_fa2_padded", median_ms(fwd),
               median_ms(with_backward(fwd, [q, k, v])), pairs)


def run_with(options: dict[str, object], fn: Callable[[], Row]) -> Row:
    """``fn()`` with some kernel options changed (flexgr.ops.kernel_options)."""
    with kernel_options_set(**options):
        return fn()


def safe(rows: list[Row], make: Callable[[], Row], label: Row) -> None:
    try:
        rows.append(make())
    except Exception as exc:  # keep the table going; say what failed
        traceback.print_exc(file=sys.stderr)
        label.note = f"FAILED: {type(exc).__name__}: {str(exc)[:80]}"
        rows.append(label)
    r = rows[-1]
    print(f"[row] {r.case} {r.shape} {r.impl}: fwd {fmt(r.fwd_ms)} fwd+bwd {fmt(r.fwd_bwd_ms)} "
          f"{r.note}", flush=True)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bench_shape(B: int, N: int, gen: torch.Generator, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    shape = f"{B}x{N}"
    lengths = torch.randint(N // 2, N + 1, (B,), generator=gen)
    offsets, q, k, v = packed_inputs(lengths)
    causal_p = int((lengths * (lengths + 1) // 2).sum())
    cases = {"causal": dict()}
    if not args.causal_only:
        nt = torch.randint(0, 21, (B,), generator=gen).to(DEVICE)
        cases["targets<=20"] = dict(num_targets=nt)
        cases[f"window{WINDOW}"] = dict(max_attn_len=WINDOW)
    for case, kw in cases.items():
        mask = build_hstu_mask(offsets, **kw)
        pairs = causal_p if case == "causal" else visible_pairs(
            lengths, kw.get("num_targets"), kw.get("max_attn_len", 0))
        safe(rows, lambda: triton_row(case, shape, q, k, v, mask, N, "triton", pairs),
             Row(case, shape, "triton"))
        if case == "causal":
            for mode in ("split", "fused", "merged"):
                safe(rows, lambda: run_with({"backward": mode}, lambda: triton_row(
                    case, shape, q, k, v, mask, N, f"triton bwd={mode}", pairs)),
                    Row(case, shape, f"triton bwd={mode}"))
        if (case == "causal" or args.flex_all) and not args.no_flex:
            safe(rows, lambda: flex_row(case, shape, q, k, v, mask, N, pairs),
                 Row(case, shape, "flex"))
        if case == "causal" and args.ablations and N == 8192:
            for label, opts in (("no fast silu", {"fast_silu": False}),
                                ("no LPT tile order", {"tile_order": "natural"}),
                                ("LPT order in bwd too", {"tile_order": "lpt_all"})):
                safe(rows, lambda: run_with(opts, lambda: triton_row(
                    case, shape, q, k, v, build_hstu_mask(offsets), N, f"triton {label}", pairs)),
                    Row(case, shape, f"triton {label}"))
            mask64 = build_hstu_mask(offsets, block_size=64)
            safe(rows, lambda: triton_row(case, shape, q, k, v, mask64, N,
                                          "triton mask block 64", pairs),
                 Row(case, shape, "triton mask block 64"))
    del q, k, v
    safe(rows, lambda: sdpa_row(shape, B, N, causal_p), Row("causal", shape, "sdpa_fa2_padded"))
    return rows


def packed_inputs(lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(DEVICE)
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, H, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
               for _ in range(3))
    return offsets, q, k, v


def sla_pairs(lengths: list[int], local: int, global_: int, mode: str) -> int:
    """Visible pairs of semi_local, per sequence in closed form."""
    total = 0
    for L in lengths:
        for i in range(L):  # row i sees keys [max(0, i - local), i] and the global part
            near = min(i, local) + 1
            if mode == "global_keys":
                total += near + max(0, min(global_, i - local))
            else:
                total += i + 1 if i >= L - global_ else near
    return total


def bench_sparse(gen: torch.Generator, args: argparse.Namespace) -> list[Row]:
    """Sparse masks against causal on the same batch: window forward at WINDOW_SHAPE, SLA
    forward + backward at SLA_SHAPE (one sequence of exactly N tokens, the paper's setting)."""
    rows: list[Row] = []
    B, N = WINDOW_SHAPE
    shape = f"{B}x{N}"
    lengths = torch.randint(N // 2, N + 1, (B,), generator=gen)
    offsets, q, k, v = packed_inputs(lengths)
    causal_p = int((lengths * (lengths + 1) // 2).sum())
    for case, kw in (("causal", {}), (f"window{WINDOW}", {"max_attn_len": WINDOW})):
        mask = build_hstu_mask(offsets, block_size=MASK_BLOCK, **kw)
        pairs = causal_p if not kw else visible_pairs(lengths, None, WINDOW)
        safe(rows, lambda c=case, m=mask, p=pairs: triton_row(c, shape, q, k, v, m, N, "triton", p,
                                                              graphs=True),
             Row(case, shape, "triton"))
    del q, k, v
    B, N = SLA_SHAPE
    shape = f"{B}x{N}"
    lengths = torch.full((B,), N)
    offsets, q, k, v = packed_inputs(lengths)
    k1, k2 = SLA
    causal = build_hstu_mask(offsets, block_size=MASK_BLOCK)
    safe(rows, lambda: triton_row("causal", shape, q, k, v, causal, N, "triton",
                                  N * (N + 1) // 2 * B, graphs=True),
         Row("causal", shape, "triton"))
    for mode in ("global_keys", "tail_rows"):
        case = f"sla_{mode} {k1}+{k2}"
        pairs = sla_pairs([N] * B, k1, k2, mode)
        mask = build_semi_local_mask(offsets, k1, k2, mode=mode, max_len=N, block_size=MASK_BLOCK)
        safe(rows, lambda c=case, m=mask, p=pairs: triton_row(c, shape, q, k, v, m, N, "triton", p,
                                                              graphs=True),
             Row(case, shape, "triton"))
        if not args.no_flex and DEVICE == "cuda":
            rule = and_masks(jagged(offsets), semi_local(offsets, k1, k2, mode=mode))
            custom = build_custom_mask(rule, offsets, block_size=MASK_BLOCK)
            safe(rows, lambda c=case, m=custom, p=pairs: flex_row(c, shape, q, k, v, m, N, p),
                 Row(case, shape, "flex"))
    return rows


def profile_sparse() -> None:
    """Where a sparse mask's forward time goes at SLA_SHAPE: for causal and both SLA modes,
    the wall time of one call against the summed device time of the kernels it launched
    (torch.profiler), and the kernels by device time. Wall far above kernel time means host
    work (table unpacking, launches), not the kernels."""
    from profiling import profile_calls  # benchmarks/profiling.py

    B, N = SLA_SHAPE
    offsets, q, k, v = packed_inputs(torch.full((B,), N))
    k1, k2 = SLA
    masks = {"causal": build_hstu_mask(offsets, block_size=MASK_BLOCK)}
    for mode in ("global_keys", "tail_rows"):
        masks[f"sla_{mode}"] = build_semi_local_mask(
            offsets, k1, k2, mode=mode, max_len=N, block_size=MASK_BLOCK
        )
    for case, mask in masks.items():
        def fwd(m=mask) -> torch.Tensor:
            return hstu_attention_triton(q, k, v, m, max_seq_len=N, alpha=1.0 / D**0.5)

        with torch.no_grad():
            fwd()  # compile and tune outside the profile
            p = profile_calls(fwd, 10, DEVICE)
        wall_ms = median_ms(lambda m=mask: fwd(m))
        print(f"\n## {case} {B}x{N} forward: wall {wall_ms:.3f} ms (do_bench median), "
              f"kernels {p.device_ms:.3f} ms per call (profiler), "
              f"host {p.host_ms:.3f} ms per call (unsynchronised loop)")
        print(p.events.table(sort_by="self_device_time_total" if DEVICE == "cuda" else
                             "self_cpu_time_total", row_limit=8))
        print_python_host(fwd, f"{case} forward")
        print_python_host(with_backward(fwd, [q, k, v]), f"{case} forward + backward")


def print_python_host(fn: Callable[[], object], label: str) -> None:
    """Where the host time of ``calls`` unsynchronised calls goes, by Python function (cProfile,
    top 14 by own time): which of flexgr's wrappers, Triton's launcher and torch's ops cost."""
    import cProfile
    import pstats

    calls = 200 if DEVICE == "cuda" else 1  # the interpreter takes ~1 s a call
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    synchronize()
    print(f"\n### Python host time of {label}, {calls} calls (cProfile; us per call = "
          f"tottime / {calls} x 1e6)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def print_sparse_table(rows: list[Row]) -> None:
    """Each sparse row against the Triton causal row of its shape (same run, same batch), called
    from Python and replayed from a CUDA graph (the kernels alone, no host work per call)."""
    causal = {r.shape: r for r in rows if r.case == "causal" and r.impl == "triton"}
    print("\n| mask | B×N | impl | fwd ms | fwd+bwd ms | fwd / causal fwd "
          "| fwd+bwd / causal fwd+bwd | graph: fwd / causal | graph: fwd+bwd / causal "
          "| pairs / causal | blocks / causal |")
    print("|" + "---|" * 11)

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.3f}" if a and b else "-"

    for r in rows:
        ref = causal.get(r.shape)
        if ref is None or r is ref:
            continue
        print(f"| {r.case} | {r.shape} | {r.impl} | {fmt(r.fwd_ms)} | {fmt(r.fwd_bwd_ms)} "
              f"| {ratio(r.fwd_ms, ref.fwd_ms)} | {ratio(r.fwd_bwd_ms, ref.fwd_bwd_ms)} "
              f"| {ratio(r.graph_fwd_ms, ref.graph_fwd_ms)} "
              f"| {ratio(r.graph_fwd_bwd_ms, ref.graph_fwd_bwd_ms)} "
              f"| {ratio(r.pairs, ref.pairs)} | {ratio(r.blocks, ref.blocks)} |")
    for r in causal.values():
        print(f"(causal {r.shape}: fwd {fmt(r.fwd_ms)} / graph {fmt(r.graph_fwd_ms)} ms, fwd+bwd "
              f"{fmt(r.fwd_bwd_ms)} / graph {fmt(r.graph_fwd_bwd_ms)} ms)")
    print("(goals, issue 15: window forward / causal forward <= 0.20 at 16x4096; SLA 256+256 "
          "fwd+bwd / causal <= 0.15 at 1x16384)")


def tflops(row: Row, ms: float | None, per_pair: int) -> str:
    if ms is None or not row.pairs:
        return "-"
    return f"{per_pair * D * row.pairs * H / ms / 1e9:.0f}"


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_table(rows: list[Row]) -> None:
    sdpa = {r.shape: r for r in rows if r.impl == "sdpa_fa2_padded"}
    head = ("| case | B×N | impl | fwd ms | fwd+bwd ms | bwd/fwd | fwd TF/s | fwd+bwd TF/s "
            "| SDPA/fwd | SDPA/fwd+bwd |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        ref = sdpa.get(r.shape)
        ratio_f = ratio_b = "-"
        if ref and r.fwd_ms and ref.fwd_ms:
            ratio_f = f"{ref.fwd_ms / r.fwd_ms:.2f}x"
        if ref and r.fwd_bwd_ms and ref.fwd_bwd_ms:
            ratio_b = f"{ref.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x"
        bwd = "-"
        if r.fwd_ms and r.fwd_bwd_ms:
            bwd = f"{(r.fwd_bwd_ms - r.fwd_ms) / r.fwd_ms:.2f}"
        impl = r.impl + (f" ({r.note})" if r.note else "")
        print(f"| {r.case} | {r.shape} | {impl} | {fmt(r.fwd_ms)} | {fmt(r.fwd_bwd_ms)} | {bwd} "
              f"| {tflops(r, r.fwd_ms, 4)} | {tflops(r, r.fwd_bwd_ms, 14)} | {ratio_f} | {ratio_b} |")


def print_tuning(with_candidates: bool) -> None:
    """The tiles (and backward mode) the tuner picked per bucket, optionally every candidate."""
    from flexgr.ops.triton_hstu import launch, tuning
    
    def cfg_str(c: object) -> str:
        if isinstance(c, tuple):  # merged: (dk/dv tile, dq tile)
            return "+".join(cfg_str(x) for x in c)
        return f"({c.block_m},{c.block_n},{c.num_warps},{c.num_stages})"  # type: ignore[attr-defined]
    
    def label(k: tuple) -> str:
        if len(k) == 2 and isinstance(k[0], tuple):  # tuning.pick's (key, kernel options)
            k = k[0]
        flags = dict(k[10])
        mask = ("targets" if flags["HAS_TARGETS"] else "sla" if flags.get("HAS_GLOBAL")
                else "window" if flags["HAS_WINDOW"] else "causal")
        return f"{k[0]} P~2^{k[6]} N~2^{k[7]} {mask}"
    
    print("\ntuned tiles (block_m, block_n, warps, stages):")
    for k, v in tuning.chosen().items():
        line = f"  {label(k)}: {cfg_str(v)}"
        if with_candidates:
            line += "  candidates ms: " + ", ".join(
                f"{cfg_str(c)}={ms:.3f}" for c, ms in tuning.timings().get(k, {}).items())
        print(line)
    print("backward mode chosen:", {label(k): v for k, v in launch.bwd_choices().items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ablations", action="store_true", help="fast-silu / tile-order / mask-64 rows at N=8192")
    parser.add_argument("--causal-only", action="store_true")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--tuning", action="store_true", help="print every tile candidate's time")
    parser.add_argument("--flex-all", action="store_true", help="flex rows for targets and window too")
    parser.add_argument("--shapes", default="", help="e.g. 16x4096,8x8192")
    parser.add_argument("--json", default="")
    parser.add_argument("--sparse", action="store_true",
                        help="only the sparse-mask table (window and SLA vs causal)")
    parser.add_argument("--no-sparse", action="store_true", help="skip the sparse-mask table")
    parser.add_argument("--profile", action="store_true",
                        help="only profile causal and SLA forwards at the SLA shape")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes to check the script (runs on CPU in the interpreter)")
    args = parser.parse_args()
    if args.quick:
        use_quick_mode()
        args.no_flex = args.no_flex or DEVICE != "cuda"  # flex has no CPU backward
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.profile:
        profile_sparse()
        return
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    if not args.sparse:
        for B, N in shapes:
            rows += bench_shape(B, N, gen, args)
    sparse: list[Row] = []
    if args.sparse or not (args.no_sparse or args.causal_only):
        sparse = bench_sparse(gen, args)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter)"
    print(f"\n{device}, torch {torch.__version__}, triton {__import__('triton').__version__}; "
          f"{str(DTYPE).removeprefix('torch.')}, H={H}, D={D}, median ms (do_bench)\n")
    if rows:
        print_table(rows)
    if sparse:
        print_sparse_table(sparse)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows + sparse], f, indent=1)
    print_tuning(args.tuning)

if __name__ == "__main__":
    main()
