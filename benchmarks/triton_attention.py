"""Triton HSTU kernel vs the flex backend vs SDPA FlashAttention: one table of median ms.

    PYTHONPATH=. python3 benchmarks/triton_attention.py [--ablations] [--json PATH]

bf16, H=4, D=128, jagged lengths uniform in [N/2, N]. SDPA (softmax, is_causal) runs on the
padded [B, H, N, D] batch, as a library without jagged support must. Block masks are built once
per batch (shared by all layers in a model) and are not timed. TF/s counts useful FLOPs only:
4 D per visible (query, key) pair and head forward, 14 D for forward + backward (the backward's
five products against the forward's two), with the visible pairs of each row's own mask (SDPA is
credited with the causal pairs of the jagged batch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexgr.ops.kernel_options import kernel_options_set
from flexgr.masks import build_hstu_mask, dense_hstu_mask
from flexgr.ops.flex import hstu_attention_flex
from flexgr.ops.triton_backend import hstu_attention_triton

H, D = 4, 128
SHAPES = [(64, 1024), (16, 4096), (8, 8192)]


@dataclass
class Row:
    case: str
    shape: str
    impl: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    pairs: int = 0
    note: str = ""


def median_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


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
        m = dense_hstu_mask(torch.tensor([L], device="cuda"), L, num_targets=nt,
                            max_attn_len=max_attn_len)
        total += int(m.sum())
    return total


def triton_row(case: str, shape: str, q, k, v, mask, N: int, impl: str, pairs: int) -> Row:
    def fwd() -> torch.Tensor:
        return hstu_attention_triton(q, k, v, mask, max_seq_len=N, alpha=1.0 / D**0.5)

    start = time.perf_counter()
    with_backward(fwd, [q, k, v])()  # compile + tune outside the timed region
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    note = f"first call {first_s:.1f} s" if first_s > 1.0 else ""
    return Row(case, shape, impl, median_ms(fwd), median_ms(with_backward(fwd, [q, k, v])), pairs,
               note)


def flex_row(case: str, shape: str, q, k, v, mask, N: int, pairs: int) -> Row:
    def fwd() -> torch.Tensor:
        return hstu_attention_flex(q, k, v, mask, max_seq_len=N, alpha=1.0 / D**0.5)

    with_backward(fwd, [q, k, v])()
    return Row(case, shape, "flex", median_ms(fwd), median_ms(with_backward(fwd, [q, k, v])), pairs)


def sdpa_row(shape: str, B: int, N: int, pairs: int) -> Row:
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def fwd() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
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
    torch.cuda.empty_cache()


def bench_shape(B: int, N: int, gen: torch.Generator, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    shape = f"{B}x{N}"
    lengths = torch.randint(N // 2, N + 1, (B,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).cuda()
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    causal_p = int((lengths * (lengths + 1) // 2).sum())
    cases = {"causal": dict()}
    if not args.causal_only:
        cases["targets<=20"] = dict(num_targets=torch.randint(0, 21, (B,), generator=gen).cuda())
        cases["window256"] = dict(max_attn_len=256)
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
        flags = dict(k[10])
        mask = "targets" if flags["HAS_TARGETS"] else "window" if flags["HAS_WINDOW"] else "causal"
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
    args = parser.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for B, N in shapes:
        rows += bench_shape(B, N, gen, args)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}; bf16, H={H}, D={D}, median ms (do_bench)\n")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    print_tuning(args.tuning)

if __name__ == "__main__":
    main()
