"""Per-batch preparation (mask and kernel tables) and eager vs compiled training steps.

    python benchmarks/prepare_compile.py            # on a GPU: the tables in BENCHMARKS.md
    python benchmarks/prepare_compile.py --quick    # fewer steps

Part 1 times building the built-in mask of one batch: the exact builder (block pairs that
share a sequence, found with nonzero: host syncs) and the band builder (fixed-size per-block
statistics, ``build_hstu_mask(..., max_len=N)``) under each ``kernel.prepare`` (eager ops, one
compiled graph, the two Triton launches of flexgr/ops/triton_hstu/prepare.py), each plus the
Triton kernel's tables, and HSTU's whole ``prepare`` under each. It also runs each under
``torch.cuda.set_sync_debug_mode("error")``, which raises at the first host sync, and checks
that the Triton tables equal the eager ones bit for bit on the device.

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

        def band(mode: str) -> Callable[[], object]:
            def build() -> object:
                b = next_batch()
                with kernel_options_set(prepare=mode):
                    return launch.mask_tables(
                        build_hstu_mask(b.offsets, total_len=b.num_tokens, max_len=N), None)
            return build

        def whole_prepare(mode: str) -> Callable[[], object]:
            def run() -> object:
                with kernel_options_set(prepare=mode):
                    return prep(model, next_batch())
            return run

        def exact() -> object:
            b = next_batch()
            return launch.mask_tables(build_hstu_mask(b.offsets, total_len=b.num_tokens), None)

        identical = all(triton_equals_eager(b, N) for b in batches)
        cases = {
            "exact mask + tables": exact,
            "band mask + tables, eager": band("eager"),
            "band mask + tables, compiled": band("compiled"),
            "band mask + tables, triton": band("triton"),
            "HSTU prepare, eager band": whole_prepare("eager"),
            "HSTU prepare, compiled band": whole_prepare("compiled"),
            "HSTU prepare, triton": whole_prepare("triton"),
        }
        for name, fn in cases.items():
            for _ in range(4):  # every length once: compilation happens here, not timed
                fn()
            row = {"shape": f"{B}x{N}", "what": name, "ms": per_call_ms(fn, device, reps),
                   "host_syncs": syncs(fn)}
            if "triton" in name:
                row["identical_to_eager"] = identical
            rows.append(row)
    return rows


def triton_equals_eager(batch: JaggedBatch, max_len: int) -> bool:
    """The Triton tables equal the eager band_tables and bias tables bit for bit on this
    device (the tests check it in the interpreter)."""
    from flexgr.masks.band import band_tables
    from flexgr.masks.block import padded_length
    from flexgr.ops.rab import next_timestamps
    from flexgr.ops.triton_hstu import prepare

    T = batch.num_tokens
    P = padded_length(T, batch.device)
    args = (batch.offsets, None, T, P, 0, 0, 0, max_len, 128)
    band, bias = prepare.band_and_bias_tables(
        batch.offsets, None, batch.timestamps, batch.query_time, *args[2:])
    want = band_tables(*args)
    nxt = next_timestamps(batch.timestamps, batch.offsets, batch.query_time)
    same = all(torch.equal(a, b) for a, b in zip(band, want, strict=True))
    return same and torch.equal(bias.next_timestamps, nxt) and torch.equal(
        bias.positions, want.pos_id[:T].long())


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
        # kernel.prepare of each mode: how the per-batch tables are built.
        prepare_of = {"eager": "eager", "eager, compiled prepare": "compiled",
                      "eager, triton prepare": "triton", "compiled": "triton"}
        for mode, prepare_mode in prepare_of.items():
            torch.manual_seed(0)
            model = HSTU(HSTUConfig(dropout=0.0, input_dropout=0.0, **dims)).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            forward = torch.compile(model, dynamic=True) if mode == "compiled" else model
            set_kernel_options(KernelOptions(autotune=False, prepare=prepare_mode))
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
    print("| shape | what | ms per batch | host syncs | identical to eager |")
    print("| --- | --- | --- | --- | --- |")
    for r in masks:
        same = {True: "yes", False: "NO"}.get(r.get("identical_to_eager"), "")
        print(f"| {r['shape']} | {r['what']} | {r['ms']:.3f} | {r['host_syncs']} | {same} |",
              flush=True)
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
