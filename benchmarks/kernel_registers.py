"""Registers and spills of the attention kernels for sm_90a, compiled without a GPU.

    python benchmarks/kernel_registers.py            # bias inline and as tiles (kernel.rab_tiles)
    python benchmarks/kernel_registers.py --tile-kernels   # only the tiles' fill and reduce

``triton.compile`` for a CUDA target needs no device; ptxas (triton's bundled
``ptxas-blackwell``, the only one that reads triton 3.9's PTX 9.x) prints each kernel's
registers and stack. Pointer and stride arguments are marked divisible by 16, as the JIT marks
them at run time (without the hint nothing is vectorised and every tile spills: a misleading
reading). D = 128, bf16, targets on, the bias on; docs/triton-kernel.md keeps the readings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flexgr.ops.triton_hstu.backward import (  # noqa: E402
    hstu_bwd_dkdv_kernel,
    hstu_bwd_dq_kernel,
    hstu_bwd_merged_kernel,
)
from flexgr.ops.triton_hstu import rab_tiles  # noqa: E402
from flexgr.ops.triton_hstu.forward import hstu_fwd_kernel  # noqa: E402
from flexgr.ops.triton_hstu.rab_tile_kernels import rab_fill_kernel, rab_reduce_kernel  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
_BF16 = {"Q", "K", "V", "Out", "DO", "GradK", "GradV", "DQ"}
_F32_PTR = {"PosW", "TsW", "DPosW", "DTsW", "Bias", "DBias", "DQacc"}
_I64_PTR = {"Ts", "NextTs"}
_F32 = {"alpha", "out_scale", "bucket_div"}


def _arg_type(name: str) -> str:
    if name in _BF16:
        return "*bf16"
    if name in _F32_PTR:
        return "*fp32"
    if name in _I64_PTR:
        return "*i64"
    if name in _F32:
        return "fp32"
    if name[0].isupper() and name != "T":  # the kernels' tables: int32 pointers
        return "*i32"
    return "i32"


def resources(fn, constexprs: dict[str, object], warps: int, stages: int) -> str:  # noqa: ANN001
    """'regs R, stack S B' of ``fn`` compiled with ``constexprs``."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            continue
        # The reduce kernel accumulates the time-bucket gradient in float64.
        fp64 = fn is rab_reduce_kernel and name == "DTsW"
        kind = signature[name] = "*fp64" if fp64 else _arg_type(name)
        if kind.startswith("*") or "stride" in name:
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        run = subprocess.run([str(PTXAS), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", run.stderr)
    stack = re.search(r"(\d+) bytes stack frame", run.stderr)
    return f"{regs.group(1) if regs else '?'} regs, {stack.group(1) if stack else '?'} B stack"


def main() -> None:
    base = dict(
        DQK=128, DV=128, BLOCK_DQK=128, BLOCK_DV=128, MASK_BLOCK_Q=128, MASK_BLOCK_KV=128,
        HAS_TARGETS=True, HAS_CONTEXT=False, HAS_WINDOW=False, HAS_TAIL=False,
        HAS_GLOBAL=False, HAS_RAB=True, FAST=True, DOT_PRECISION="tf32",
    )
    runs = [
        ("fwd", hstu_fwd_kernel, {}, (128, 32, 4, 3)),
        ("fwd", hstu_fwd_kernel, {}, (128, 64, 8, 3)),
        ("fwd", hstu_fwd_kernel, {}, (64, 32, 4, 3)),
        ("fwd", hstu_fwd_kernel, {}, (128, 64, 4, 3)),
        ("dq", hstu_bwd_dq_kernel, {}, (64, 64, 4, 3)),
        ("dk/dv", hstu_bwd_dkdv_kernel, {"FUSE_DQ": False}, (64, 64, 4, 3)),
        ("dk/dv fused", hstu_bwd_dkdv_kernel, {"FUSE_DQ": True}, (64, 128, 8, 3)),
        ("dk/dv fused", hstu_bwd_dkdv_kernel, {"FUSE_DQ": True}, (32, 64, 4, 3)),
        ("merged", hstu_bwd_merged_kernel, {}, (64, 64, 4, 3)),
    ]
    print(f"# triton {triton.__version__}, sm_90a, D=128 bf16, bias on")
    if "--tile-kernels" in sys.argv[1:]:
        runs = []
    else:
        print("| kernel | tile (BM, BN, warps, stages) | bias inline | bias as tiles |")
        print("|---|---|---|---|")
    for name, fn, extra, (bm, bn, warps, stages) in runs:
        if fn is hstu_bwd_merged_kernel:
            tile = {"KV_BLOCK_M": bm, "KV_BLOCK_N": bn, "Q_BLOCK_M": bm, "Q_BLOCK_N": bn}
        else:
            tile = {"BLOCK_M": bm, "BLOCK_N": bn}
        cells = []
        for tiles in (False, True):
            consts = dict(base, **tile, **extra, RAB_TILES=tiles)
            if "RAB_LANES" in fn.arg_names:
                consts["RAB_LANES"] = 1 if tiles else 16
            cells.append(resources(fn, consts, warps, stages))
        print(f"| {name} | {bm}, {bn}, {warps}, {stages} | {cells[0]} | {cells[1]} |", flush=True)
    # The bias-as-tiles kernels around them, with the constexprs their launches use.
    print("\n| tile kernel | mask blocks | constexprs | resources |")
    print("|---|---|---|---|")
    for block in (128, 32, 16):
        for name, fn, meta in (("fill", rab_fill_kernel, rab_tiles.fill_meta(block, block)),
                               ("reduce", rab_reduce_kernel, rab_tiles.reduce_meta(block, block))):
            warps = meta.pop("num_warps")
            consts = ", ".join(f"{k}={v}" for k, v in meta.items() if not k.startswith("MASK"))
            print(f"| {name} | {block} | {consts}, {warps} warps | "
                  f"{resources(fn, meta, warps, 1)} |", flush=True)


if __name__ == "__main__":
    main()
