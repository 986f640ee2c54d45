"""One end-to-end HSTU training step (forward, backward, AdamW), flex vs triton attention, with MFU.

    python benchmarks/model_step.py                       # CUDA: 8 layers, d=512, H=4, dqk=dv=128
    python benchmarks/model_step.py --device cpu --tiny   # smoke test of the script itself
    python benchmarks/model_step.py --backends triton --profile   # + the step's top kernels

Lengths are jagged, uniform in [N/2, N] with N = 4096 by default. Each backend is timed in the
same run (triton.testing.do_bench, median). MFU counts the useful FLOPs of the step (projections
and the attention's causal pairs, forward and backward) over the measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from typing import Callable

import torch
import torch.nn.functional as F

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, encode
from flexgr.ops.kernel_options import KernelOptions, set_kernel_options
from flexgr.train.recompute import apply_recompute


def step_flops(cfg: HSTUConfig, lengths: list[int]) -> float:
    T = sum(lengths)
    H, d = cfg.num_heads, cfg.d_model
    proj = 2 * d * (2 * H * cfg.dv + 2 * H * cfg.dqk) + 2 * H * cfg.dv * d  # per token, fwd
    pairs = sum(L * (L + 1) // 2 for L in lengths)
    attn_fwd = 2 * pairs * H * (cfg.dqk + cfg.dv)
    # backward: 2x the projections; attention backward recomputes scores: 2.5x its forward
    return cfg.num_layers * (3 * proj * T + 3.5 * attn_fwd)


def measure_peak(device: torch.device) -> float:
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def print_profile(step: Callable[[], None], label: str, device: torch.device) -> None:
    """Where a step's time goes: kernels by device time (3 steps), and the host time per step
    of an unsynchronised loop (far above the device total: launch-bound)."""
    from profiling import profile_calls  # benchmarks/profiling.py

    p = profile_calls(step, 3, device)
    print(f"\n## {label}: kernels {p.device_ms:.1f} ms per step over {len(p.kernels)} kernel "
          f"names, host {p.host_ms:.1f} ms per step (unsynchronised)", file=sys.stderr)
    for e in p.top_kernels(15):
        print(f"  {e.self_device_time_total / 3e3:8.2f} ms  {e.count // 3:5d}x  {e.key[:90]}",
              file=sys.stderr)
    sys.stderr.flush()


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of a kernel option: true/false, an int, or the string."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise SystemExit(f"--kernel {text!r}: expected KEY=VALUE")
    value: object = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    elif raw.lstrip("-").isdigit():
        value = int(raw)
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--backends", default="triton,flex")
    parser.add_argument("--no-rel-bias", action="store_true", help="drop the relative attention bias")
    parser.add_argument(
        "--rab-lanes", default="",
        help="comma list of L, time triton once per kernel.rab_lanes=L (bias on only; "
        "default: the library's default)",
    )
    parser.add_argument("--kernel", action="append", default=[], metavar="KEY=VALUE",
                        help="a kernel option for every row, e.g. tuning_threads=8 (flexgr.ops."
                        "kernel_options.KernelOptions; ints and true/false parsed)")
    parser.add_argument("--recompute", default="",
                        help="comma list of train.recompute modes (selective, layers) to time as "
                        "extra triton rows, e.g. selective,layers (ULTRA-HSTU's memory vs time)")
    parser.add_argument("--compare-no-bias", action="store_true",
                        help="also time triton without the bias in the same run (bias cost ratio)")
    parser.add_argument("--rab-tiles", action="store_true",
                        help="also time triton with kernel.rab_tiles (the bias as tiles)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print the kernels of 3 steps by device time")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        dims = dict(d_model=32, num_layers=2, num_heads=2, dqk=16, dv=16)
        args.batch, args.max_len = 4, 64
    else:
        dims = dict(d_model=512, num_layers=8, num_heads=4, dqk=128, dv=128)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.max_len // 2, args.max_len + 1, (args.batch,), generator=gen).tolist()
    num_items = 100_000
    ids = torch.randint(1, num_items + 1, (sum(lengths),), generator=gen).to(device)
    offsets = torch.tensor([0] + lengths).cumsum(0).to(device)
    ts = torch.cumsum(torch.randint(0, 1000, (sum(lengths),), generator=gen), 0).to(device)
    negatives = torch.randint(1, num_items + 1, (512,), generator=gen).to(device)
    names = ["reference"] if device.type == "cpu" else args.backends.split(",")
    copies = args.rab_lanes.split(",") if args.rab_lanes and not args.no_rel_bias else [""]
    if args.rab_tiles and not args.no_rel_bias:
        copies.append("tiles")
    if args.compare_no_bias and not args.no_rel_bias:
        copies.append("no bias")
    copies += [f"recompute={m}" for m in args.recompute.split(",") if m]
    runs = [(b, c) for b in names for c in (copies if b == "triton" else [""])]
    rows = []
    try:
        kernel_base = KernelOptions(**dict(parse_option(kv) for kv in args.kernel))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--kernel: {exc}") from None
    for backend, copy in runs:
        label = backend
        recompute = copy.removeprefix("recompute=") if copy.startswith("recompute=") else "none"
        if recompute != "none":
            set_kernel_options(kernel_base)
            label = f"{backend} {copy}"
        elif copy == "no bias":
            set_kernel_options(kernel_base)
            label = f"{backend} no bias"
        elif copy == "tiles":
            set_kernel_options(dataclasses.replace(kernel_base, rab_tiles=True))
            label = f"{backend} rab_tiles"
        elif copy:
            set_kernel_options(dataclasses.replace(kernel_base, rab_lanes=int(copy)))
            label = f"{backend} L={copy}"
        else:
            set_kernel_options(kernel_base)
        torch.manual_seed(0)
        cfg = HSTUConfig(num_items=num_items, max_seq_len=args.max_len, dropout=0.0,
                         input_dropout=0.0, backend=backend,
                         rel_bias=not args.no_rel_bias and copy != "no bias", **dims)
        model = apply_recompute(HSTU(cfg).to(device), recompute)  # type: ignore[arg-type]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                user = encode(model, JaggedBatch(ids, offsets, ts))
                pos = model.item_embeddings(ids)
                neg = model.item_embeddings(negatives)
                logits = torch.cat([(user * pos).sum(-1, keepdim=True), user @ neg.T], dim=-1)
                loss = F.cross_entropy(logits.float() / 0.05, torch.zeros_like(ids))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        start = time.time()
        train_step()
        first_s = time.time() - start
        peak_gib = float("nan")
        if device.type == "cuda":
            from triton.testing import do_bench

            ms = float(do_bench(train_step, warmup=3, rep=20, return_mode="median"))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            train_step()
            torch.cuda.synchronize()
            peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            start = time.time()
            train_step()
            ms = (time.time() - start) * 1e3
        if args.profile:
            print_profile(train_step, label, device)
        rows.append((label, ms, first_s, peak_gib))
        print(f"{label}: first call {first_s:.1f} s, step {ms:.1f} ms", file=sys.stderr, flush=True)
        del model, opt
    flops = step_flops(cfg, lengths)
    peak = measure_peak(device) if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}, torch {torch.__version__}; B={args.batch}, lengths in "
          f"[{args.max_len // 2}, {args.max_len}], T={sum(lengths)}, {dims}")
    print(f"useful FLOPs per step: {flops / 1e12:.2f} TFLOP; measured bf16 matmul peak: {peak / 1e12:.0f} TF/s\n")
    print("| backend | step ms | first call s | TF/s | MFU | speed-up vs flex | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    base = dict((b, ms) for b, ms, _, _ in rows).get("flex")
    for backend, ms, first_s, peak_gib in rows:
        tfs = flops / (ms * 1e-3) / 1e12
        mfu = flops / (ms * 1e-3) / peak
        ratio = f"{base / ms:.2f}x" if base else "-"
        print(f"| {backend} | {ms:.1f} | {first_s:.1f} | {tfs:.0f} | {mfu:.1%} | {ratio} "
              f"| {peak_gib:.2f} |")


if __name__ == "__main__":
    main()
