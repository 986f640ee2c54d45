"""What the relative bias costs the Triton kernels, per tile and backward mode, in one run.

    python benchmarks/rab_cost.py                 # CUDA: 16 x [2048, 4096], H=4, D=128, bf16
    python benchmarks/rab_cost.py --quick         # tiny shapes (the interpreter on CPU)
    python benchmarks/rab_cost.py --rab-tiles     # also the bias as tiles (kernel.rab_tiles)

For each forward tile: forward ms without and with the bias (positional + time buckets, as
``benchmarks/model_step.py`` trains it), their ratio, and the compiled kernel's registers and
spills. For each backward mode (split, fused, merged): forward + backward ms without and with the
bias. The model step's bias cost (issue 15: <= 1.3x) is the sum of these per layer.

``--rab-tiles`` adds the bias as tiles to both tables, in the same run: per forward tile a
"tiles ms" column (the per-layer fill kernel included, the per-batch slot tables not: they are
built once, outside the timing, and timed on their own), per backward mode a "f+b tiles ms"
column (the backward's second fill and the reduce kernel included), and the tiles' memory (per
batch and per layer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def compiled_info(fn) -> list[tuple[int, int, int]]:  # noqa: ANN001 - a triton JITFunction
    """(num_warps, registers, spills) of every binary compiled for ``fn`` so far."""
    out = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for kernel in getattr(cache, "values", lambda: [])():
            try:
                kernel._init_handles()
            except Exception:  # noqa: BLE001 - older/newer triton: report what is there
                pass
            warps = getattr(getattr(kernel, "metadata", None), "num_warps", -1)
            out.append((warps, getattr(kernel, "n_regs", -1), getattr(kernel, "n_spills", -1)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--forward-only", action="store_true", help="skip the backward table")
    parser.add_argument("--tiles", type=int, default=5, help="time the first N forward tiles")
    parser.add_argument(
        "--rab-tiles", action="store_true",
        help="also time kernel.rab_tiles (the bias as precomputed tiles) against the inline path",
    )
    args = parser.parse_args()
    if args.quick and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if torch.cuda.is_available():
        from triton.testing import do_bench

    from flexgr.masks import build_hstu_mask
    from flexgr.ops.kernel_options import kernel_options_set
    from flexgr.ops.rab import RelativeBias
    from flexgr.ops.triton_backend import hstu_attention_triton
    from flexgr.ops.triton_hstu import launch, tuning
    from flexgr.ops.triton_hstu.forward import hstu_fwd_kernel
    from flexgr.ops.triton_hstu.tuning import TileConfig

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    B, N, H, D = (16, 4096, 4, 128) if not args.quick else (2, 96, 2, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(N // 2, N + 1, (B,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    T = int(lengths.sum())
    q, k, v = (torch.randn(T, H, D, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3))
    ts = torch.cumsum(torch.randint(0, 1000, (T,), generator=gen), 0).to(device)
    pos_w = (torch.randn(2 * N - 1, generator=gen) * 0.1).to(device).requires_grad_()
    ts_w = (torch.randn(129, generator=gen) * 0.1).to(device).requires_grad_()
    rab = RelativeBias.from_timestamps(pos_w, ts_w, ts, offsets)
    mask = build_hstu_mask(offsets, block_size=128 if not args.quick else 32)
    alpha = 1.0 / D**0.5
    grad = torch.randn(T, H, D, generator=gen).to(device, dtype)

    def fwd(bias: RelativeBias | None) -> torch.Tensor:
        return hstu_attention_triton(q, k, v, mask, max_seq_len=N, alpha=alpha, rab=bias)

    tiles_on = args.rab_tiles
    tiles_note = ""
    if tiles_on:  # the per-batch part, once: built here, then found in launch's cache
        with kernel_options_set(rab_tiles=True):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            tab = launch.mask_tables(mask, rab)
            if cuda:
                torch.cuda.synchronize()
            build_ms = (time.perf_counter() - start) * 1e3
        tiles = tab.rab_tiles
        assert tiles is not None
        per_batch = sum(t.numel() * t.element_size() for t in tiles.tensors())
        # The fp32 bias values of every visited pair; the backward adds as much for dS.
        per_layer = tiles.n_slots * tab.mask_block_q * tab.mask_block_kv * 4
        tiles_note = (
            f"# rab_tiles: {tiles.n_slots} visited block pairs, slot tables "
            f"{per_batch / 2**10:.1f} KiB per batch (built in {build_ms:.1f} ms, one sync), bias "
            f"values {per_layer / 2**20:.2f} MiB per layer (x2 in the backward)"
        )

    def tiled(fn):  # noqa: ANN001, ANN202 - fn with the bias as tiles
        def run() -> object:
            with kernel_options_set(rab_tiles=True):
                return fn()
        return run

    def fwd_bwd(bias: RelativeBias | None) -> None:
        fwd(bias).backward(grad)

    def ms(fn) -> float:  # noqa: ANN001
        if not cuda:  # one timed call: checks the script, the times mean nothing
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return float(do_bench(fn, warmup=3, rep=20, return_mode="median"))

    print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"B={B}, lengths in [{N // 2}, {N}], T={T}, H={H}, D={D}, {dtype}")
    if tiles_note:
        print(tiles_note)
    extra_head = " tiles ms | tiles / no bias |" if tiles_on else ""
    print("\n| forward tile (m, n, warps, stages) | no bias ms | bias ms | bias / no bias "
          f"| regs, spills (no bias / bias) |{extra_head}")
    print("|---|---|---|---|---|" + ("---|---|" if tiles_on else ""))
    tiles = (TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 3), TileConfig(64, 32, 4, 3),
             TileConfig(128, 64, 8, 3), TileConfig(128, 32, 4, 3))
    tiles = tiles[: args.tiles]
    if args.quick:
        tiles = (TileConfig(32, 32, 4, 1),)
    with torch.no_grad(), kernel_options_set(autotune=False):
        for cfg in tiles:
            tuning.force("fwd", cfg)
            try:
                before = len(compiled_info(hstu_fwd_kernel))
                plain = ms(lambda: fwd(None))
                biased = ms(lambda: fwd(rab))
                info = compiled_info(hstu_fwd_kernel)[before:]
                regs = " / ".join(f"{r}, {s}" for _, r, s in info) or "-"
                extra = ""
                if tiles_on:
                    with_tiles = ms(tiled(lambda: fwd(rab)))
                    extra = f" {with_tiles:.3f} | {with_tiles / plain:.2f}x |"
                print(f"| {tuple(vars(cfg).values())} | {plain:.3f} | {biased:.3f} | "
                      f"{biased / plain:.2f}x | {regs} |{extra}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a tile this device cannot run
                print(f"| {tuple(vars(cfg).values())} | failed: {type(exc).__name__} | | | |")
        tuning.force("fwd", None)
    if args.forward_only:
        return
    extra_head = " f+b tiles ms | tiles / no bias |" if tiles_on else ""
    print(f"\n| backward mode | f+b no bias ms | f+b bias ms | bias / no bias |{extra_head}")
    print("|---|---|---|---|" + ("---|---|" if tiles_on else ""))
    for mode in ("split", "fused", "merged"):
        with kernel_options_set(autotune=False, backward=mode):
            plain = ms(lambda: fwd_bwd(None))
            biased = ms(lambda: fwd_bwd(rab))
            extra = ""
            if tiles_on:
                with_tiles = ms(tiled(lambda: fwd_bwd(rab)))
                extra = f" {with_tiles:.3f} | {with_tiles / plain:.2f}x |"
        print(f"| {mode} | {plain:.3f} | {biased:.3f} | {biased / plain:.2f}x |{extra}",
              flush=True)


if __name__ == "__main__":
    main()
