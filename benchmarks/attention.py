"""HSTU attention speed and bf16 accuracy, every method timed in the same run.

    python benchmarks/attention.py            # CUDA only; prints one table per section

Speed: bf16, H=4, D=128, jagged lengths uniform in [N/2, N]; median ms from
triton.testing.do_bench. SDPA FlashAttention (softmax, causal) runs on the padded [B, H, N, D]
batch, as a library without jagged support would. The block mask is built once per batch and
shared by every layer, so its build time is a separate column.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexgr.masks import build_hstu_mask
from flexgr.ops import hstu_attention
from flexgr.ops.flex import hstu_attention_flex

H, D = 4, 128
SHAPES = [(64, 1024), (16, 4096), (8, 8192)]


_START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - _START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def jagged_lengths(B: int, N: int, gen: torch.Generator) -> list[int]:
    return torch.randint(N // 2, N + 1, (B,), generator=gen).tolist()


def causal_pairs(lengths: list[int]) -> int:
    return sum(L * (L + 1) // 2 for L in lengths)


def fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def speed_table(methods: list[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for B, N in SHAPES:
        lengths = jagged_lengths(B, N, gen)
        T = sum(lengths)
        offsets = torch.tensor([0] + lengths, device="cuda").cumsum(0)
        q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        max_seq_len = N
        mask = build_hstu_mask(offsets, total_len=T)
        mask_ms = bench(lambda: build_hstu_mask(offsets, total_len=T))
        times: dict[str, tuple[float, float]] = {}

        padded = [torch.zeros(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        for p in padded:
            p.requires_grad_(True)

        def sdpa() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(*padded, is_causal=True)

        times["sdpa_fa_padded"] = (bench(sdpa), bench(fwd_bwd(sdpa, padded)))
        for m in methods:
            if m.startswith("flex"):
                method = m.split("_")[1]
                fn = lambda method=method: hstu_attention_flex(  # noqa: E731
                    q, k, v, mask, max_seq_len=max_seq_len, alpha=1.0 / math.sqrt(D), method=method
                )
            else:
                fn = lambda m=m: hstu_attention(  # noqa: E731
                    q, k, v, offsets, max_seq_len=max_seq_len, alpha=1.0 / math.sqrt(D), backend=m,
                    mask=mask, validate=False,
                )
            log(f"{B}x{N} {m}")
            try:
                times[m] = (bench(fn), bench(fwd_bwd(fn, [q, k, v])))
            except torch.OutOfMemoryError:
                times[m] = (float("nan"), float("nan"))
            torch.cuda.empty_cache()
        base_f, base_fb = times["sdpa_fa_padded"]
        pairs = causal_pairs(lengths)
        for name, (f, fb) in times.items():
            tflops = 4 * D * pairs * H / (f * 1e-3) / 1e12
            rows.append((f"{B}x{N}", T, name, f, fb, base_f / f, base_fb / fb, tflops, mask_ms))
    print("\n## Speed (bf16, H=4, D=128, lengths uniform in [N/2, N]; ratio = SDPA time / method time)\n")
    print("| B x N | T | method | fwd ms | fwd+bwd ms | fwd speed-up vs SDPA | fwd+bwd speed-up vs SDPA | fwd TF/s (useful jagged causal pairs) | mask build ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.2f}x | {r[6]:.2f}x | {r[7]:.0f} | {r[8]:.2f} |")


def accuracy_table(methods: list[str]) -> None:
    """bf16 relative error against an fp64 reference, and the FlashAttention rule:
    error <= 2x (fwd) / 5x (bwd) that of the same-dtype eager reference."""
    gen = torch.Generator().manual_seed(1)
    lengths = jagged_lengths(16, 1024, gen)
    T = sum(lengths)
    offsets = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    base = [torch.randn(T, H, D, device="cuda", dtype=torch.float64, generator=None) for _ in range(3)]
    kw = dict(max_seq_len=1024, alpha=1.0 / math.sqrt(D))
    mask = build_hstu_mask(offsets, total_len=T)

    def run(dtype: torch.dtype, method: str) -> list[torch.Tensor]:
        q, k, v = (x.to(dtype).requires_grad_(True) for x in base)
        if method == "reference":
            out = hstu_attention(q, k, v, offsets, backend="reference", **kw)
        else:
            out = hstu_attention_flex(q, k, v, mask, method=method.split("_")[1], **kw)
        g = torch.ones_like(out)
        return [out, *torch.autograd.grad(out, [q, k, v], g)]

    ref = run(torch.float64, "reference")

    def errs(vals: list[torch.Tensor]) -> list[float]:
        assert all(not torch.isnan(x).any() for x in vals), "NaN"
        return [float((a.double() - b).norm() / b.norm()) for a, b in zip(vals, ref)]

    eager = errs(run(torch.bfloat16, "reference"))
    print("\n## bf16 accuracy (16 sequences, lengths in [512, 1024]; relative L2 error vs fp64)\n")
    print("| method | out | dq | dk | dv | FA rule (fwd <= 2x, bwd <= 5x eager) |")
    print("|---|---|---|---|---|---|")
    print(f"| eager bf16 reference | {eager[0]:.1e} | {eager[1]:.1e} | {eager[2]:.1e} | {eager[3]:.1e} | - |")
    for m in methods:
        if not m.startswith("flex"):
            continue
        log(f"accuracy {m}")
        e = errs(run(torch.bfloat16, m))
        ok = e[0] <= 2 * eager[0] and all(a <= 5 * b for a, b in zip(e[1:], eager[1:]))
        ratios = "/".join(f"{a / b:.2f}" for a, b in zip(e, eager))
        print(f"| {m} | {e[0]:.1e} | {e[1]:.1e} | {e[2]:.1e} | {e[3]:.1e} | {'pass' if ok else 'FAIL'} ({ratios}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="flex_split,flex_shift,reference")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    methods = args.methods.split(",")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    speed_table(methods)
    if not args.skip_accuracy:
        accuracy_table(methods)


if __name__ == "__main__":
    main()
