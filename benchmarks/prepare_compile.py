"""Per-batch preparation (mask and kernel tables) and eager vs compiled training steps.

    python benchmarks/prepare_compile.py            # on a GPU: the tables in BENCHMARKS.md
    python benchmarks/prepare_compile.py --quick    # fewer steps

Part 1 times building the built-in mask of one batch, two ways: the exact builder (block pairs
that share a sequence, found with nonzero: host syncs) and the band builder (fixed-size
per-block statistics, ``build_hstu_mask(..., max_len=N)``), each plus the Triton kernel's
tables, and HSTU's whole ``prepare``. It also runs each under
``torch.cuda.set_sync_debug_mode("error")``, which raises at the first host sync.

Part 2 times HSTU training steps (prepare, forward, sampled-softmax loss, backward, AdamW; bf16
autocast) eagerly and under ``torch.compile(dynamic=True)`` on batches of changing packed
length, and counts the graphs dynamo compiled after warm-up (recompiles). Prints tables, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flexgr.batch import JaggedBatch  # noqa: E402
from flexgr.masks import build_hstu_mask  # noqa: E402
from flexgr.model import HSTU, HSTUConfig, get_spec  # noqa: E402
from flexgr.train.loss import sampled_softmax_loss  # noqa: E402

SHAPES = [(64, 1024), (16, 4096), (8, 8192)]


def jagged(B: int, N: int, seed: int, device: torch.device, num_items: int) -> JaggedBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T = int(offsets[-1])
    ts = torch.cumsum(torch.randint(0, 1000, (T,), generator=g), 0)
    ids = torch.randint(1, num_items + 1, (T,), generator=g)
    return JaggedBatch(ids, offsets, ts, ts[offsets[1:] - 1] + 5).to(device)


def per_call_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / reps * 1e3


def syncs(fn: Callable[[], object]) -> str:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as err:
        return "sync: " + str(err).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def mask_rows(device: torch.device, reps: int) -> list[dict]:
    from flexgr.ops.kernel_options import kernel_options_set
    from flexgr.ops.triton_hstu import launch

    rows = []
    for B, N in SHAPES:
        # Four batches of different packed lengths, called in turn: a builder that recompiled
        # or re-tuned per length would show here.
        batches = [jagged(B, N, seed, device, 1000) for seed in range(4)]
        model = HSTU(HSTUConfig(num_items=1000, max_seq_len=N, d_model=64, dqk=32, dv=32,
                                num_layers=1, backend="triton")).to(device)
        prep = get_spec("hstu").prepare
        turn = iter(range(1 << 30))

        def next_batch() -> JaggedBatch:
            return batches[next(turn) % len(batches)]

        def band(compiled: bool) -> Callable[[], object]:
            def build() -> object:
                b = next_batch()
                with kernel_options_set(compile_prepare=compiled):
                    return launch.mask_tables(
                        build_hstu_mask(b.offsets, total_len=b.num_tokens, max_len=N), None)
            return build

        def whole_prepare(compiled: bool) -> Callable[[], object]:
            def run() -> object:
                with kernel_options_set(compile_prepare=compiled):
                    return prep(model, next_batch())
            return run

        def exact() -> object:
            b = next_batch()
            return launch.mask_tables(build_hstu_mask(b.offsets, total_len=b.num_tokens), None)

        cases = {
            "exact mask + tables": exact,
            "band mask + tables, eager": band(False),
            "band mask + tables, compiled": band(True),
            "HSTU prepare, eager band": whole_prepare(False),
            "HSTU prepare, compiled band": whole_prepare(True),
        }
        for name, fn in cases.items():
            for _ in range(4):  # every length once: compilation happens here, not timed
                fn()
            rows.append({"shape": f"{B}x{N}", "what": name,
                         "ms": per_call_ms(fn, device, reps), "host_syncs": syncs(fn)})
    return rows


def step_rows(device: torch.device, steps: int) -> list[dict]:
    from torch._dynamo.utils import counters

    from flexgr.ops.kernel_options import KernelOptions, set_kernel_options

    configs = {
        "ml-1m-hstu-large": (dict(num_items=3883, d_model=50, num_layers=8, num_heads=2,
                                  dqk=25, dv=25, max_seq_len=200), 128, 200),
        "8x512 long": (dict(num_items=100_000, d_model=512, num_layers=8, num_heads=4,
                            dqk=128, dv=128, max_seq_len=4096), 16, 4096),
    }
    rows = []
    for name, (dims, B, N) in configs.items():
        batches = [jagged(B, N, seed, torch.device("cpu"), dims["num_items"])
                   for seed in range(steps + 4)]
        for mode in ("eager", "eager, compiled prepare", "compiled"):
            torch.manual_seed(0)
            model = HSTU(HSTUConfig(dropout=0.0, input_dropout=0.0, **dims)).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            forward = torch.compile(model, dynamic=True) if mode == "compiled" else model
            set_kernel_options(KernelOptions(autotune=False, compile_prepare=mode != "eager"))
            prep = get_spec("hstu").prepare

            def step(cpu_batch: JaggedBatch) -> None:
                batch = cpu_batch.to(device, non_blocking=True)
                inputs = prep(model, batch)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    states = forward(batch.item_ids, inputs)
                targets = torch.roll(batch.item_ids, -1)
                negatives = torch.randint(1, dims["num_items"] + 1, (batch.num_tokens, 128),
                                          device=device)
                loss = sampled_softmax_loss(states.float(), targets, negatives,
                                            model.item_embeddings().float(), 0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            start = time.perf_counter()
            for b in batches[:4]:  # warm-up: compilation, tile tuning
                step(b)
            torch.cuda.synchronize(device)
            warm_s = time.perf_counter() - start
            graphs = counters["stats"]["unique_graphs"]
            times = []
            for b in batches[4:]:
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                step(b)
                torch.cuda.synchronize(device)
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append({"model": name, "mode": mode, "warmup_s": warm_s,
                         "step_ms": statistics.median(times),
                         "new_graphs_after_warmup": counters["stats"]["unique_graphs"] - graphs})
            del model, opt, forward
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    # Tile tuning off: the timed steps meet new length buckets, and tuning them would be timed.
    from flexgr.ops.kernel_options import KernelOptions, set_kernel_options

    set_kernel_options(KernelOptions(autotune=False))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    masks = mask_rows(device, 5 if args.quick else 20)
    print("| shape | what | ms per batch | host syncs |\n| --- | --- | --- | --- |")
    for r in masks:
        print(f"| {r['shape']} | {r['what']} | {r['ms']:.3f} | {r['host_syncs']} |", flush=True)
    steps = [] if args.skip_steps else step_rows(device, 6 if args.quick else 16)
    if steps:
        print("| model | mode | warm-up s (4 steps) | step ms (median) | graphs after warm-up |")
        print("| --- | --- | --- | --- | --- |")
        for r in steps:
            print(f"| {r['model']} | {r['mode']} | {r['warmup_s']:.1f} | {r['step_ms']:.2f} | "
                  f"{r['new_graphs_after_warmup']} |", flush=True)
    print(json.dumps({"masks": masks, "steps": steps}))


if __name__ == "__main__":
    main()
