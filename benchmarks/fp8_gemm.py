"""FP8 row-wise vs BF16 for HSTU's UVQK and output GEMMs (ULTRA-HSTU: 1.99x with a fused bias).

    python benchmarks/fp8_gemm.py              # H100/H200: d = 512, 1024; tokens 16k-64k
    python benchmarks/fp8_gemm.py --small      # CPU check of the script (emulated FP8)

For each shape it times, in the same run:

- ``bf16``: ``x @ w (+ bias)`` in bf16 (what ``model.fp8 = false`` runs);
- ``fp8 gemm``: ``torch._scaled_mm`` on operands quantised beforehand (the GEMM alone, the
  number to compare with the paper's kernel, which fuses the quantisation into the LayerNorm);
- ``fp8 linear``: :func:`flexgr.ops.fp8.fp8_linear`, quantising x and w on every call (what
  ``model.fp8 = true`` runs today).

UVQK is ``[T, d] @ [d, 4d]`` (H dqk = H dv = d), output ``[T, d] @ [d, d] + bias``. Times are
``triton.testing.do_bench`` medians on CUDA (wall-clock medians on CPU); ratios are bf16 time
over fp8 time from the same run. Prints a table (and --json writes the rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexgr.ops.fp8 import fp8_linear, quantize_rowwise, uses_scaled_mm


def bench(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=reps * 10, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def shapes(small: bool) -> list[tuple[str, int, int, int]]:
    """(name, tokens, K, N)."""
    dims, tokens = ((64, 128), (512, 2048)) if small else ((512, 1024), (16384, 32768, 65536))
    out = []
    for d in dims:
        for T in tokens:
            out += [("uvqk", T, d, 4 * d), ("output", T, d, d)]
    return out


def time_shape(name: str, T: int, K: int, N: int, device: torch.device, reps: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, K, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(K, N, device=device, generator=g) * K**-0.5).to(torch.bfloat16)
    bias = torch.zeros(N, device=device, dtype=torch.bfloat16) if name == "output" else None

    def plain() -> torch.Tensor:
        y = x @ w
        return y + bias if bias is not None else y

    def linear() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fp8_linear(x, w, bias)

    row = {"gemm": name, "tokens": T, "K": K, "N": N, "device": str(device)}
    row["bf16_ms"] = bench(plain, device, reps)
    row["fp8_linear_ms"] = bench(linear, device, reps)
    row["scaled_mm"] = uses_scaled_mm(x, w)
    if row["scaled_mm"]:
        xq, sx = quantize_rowwise(x)
        wq, sw = quantize_rowwise(w.t())
        b_col, sw_row = wq.contiguous().t(), sw.t().contiguous()

        def gemm() -> torch.Tensor:
            return torch._scaled_mm(
                xq, b_col, scale_a=sx, scale_b=sw_row, bias=bias, out_dtype=torch.bfloat16
            )

        row["fp8_gemm_ms"] = bench(gemm, device, reps)
    return row


def run(small: bool, reps: int) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    return [time_shape(*shape, device, reps) for shape in shapes(small)]


def print_table(rows: list[dict]) -> None:
    head = f"{'gemm':7} {'tokens':>7} {'K':>5} {'N':>5} {'bf16 ms':>9} {'fp8 gemm':>9} "
    head += f"{'ratio':>6} {'fp8 lin':>9} {'ratio':>6}"
    print(head)
    for r in rows:
        gemm = r.get("fp8_gemm_ms")
        gemm_text = f"{gemm:9.3f} {r['bf16_ms'] / gemm:6.2f}" if gemm else f"{'-':>9} {'-':>6}"
        print(
            f"{r['gemm']:7} {r['tokens']:7d} {r['K']:5d} {r['N']:5d} {r['bf16_ms']:9.3f} "
            f"{gemm_text} {r['fp8_linear_ms']:9.3f} {r['bf16_ms'] / r['fp8_linear_ms']:6.2f}"
        )
    device = rows[0]["device"] if rows else "?"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU (emulated FP8)"
    print(f"device: {name}, torch {torch.__version__}; ratio = bf16 time / fp8 time, same run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes on CPU (a smoke run)")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions (default 5 / 20)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    rows = run(args.small, args.reps or (5 if args.small else 20))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
