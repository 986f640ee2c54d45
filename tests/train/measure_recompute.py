"""Saved activations per layer and CPU step time for train.recompute = none / selective / layers.

    PYTHONPATH=. OMP_NUM_THREADS=1 python tests/train/measure_recompute.py [memory] [time]

memory: MiB per HSTU layer that the forward keeps for the backward (tests/train/memory.py's
counter), fp32, relative bias off, at two shapes: d = 512 (4 heads of 128), 8 layers, one
3,072-token sequence; and ml-1m-hstu-large (d = 50, 2 heads of 25, 8 layers) at 128 x 200.
Two attentions each: the dense reference (what CPU runs; it saves O(N^2) score tensors) and
``kernel_like`` (saves q, k, v only, as the Triton kernel's autograd does). Only the forward
runs: a count needs no backward.

time: the median CPU step (forward + backward) of 7 after 2 warm-ups at a small shape, as a
ratio to none. Indicative only (one thread of a shared CPU); GPU step time is not measured.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig
from flexgr.model.registry import spec_of
from flexgr.train.recompute import apply_recompute
from tests.conftest import make_offsets
from tests.train.memory import count_retained, kernel_like

MODES = ("none", "selective", "layers")
MiB = 2**20

SHAPES = {
    "d512 x 8 layers, 1 x 3,072 tokens": (
        {"d_model": 512, "num_heads": 4, "dqk": 128, "dv": 128, "max_seq_len": 3072},
        [3072],
    ),
    "ml-1m-hstu-large, 128 x 200": (
        {"d_model": 50, "num_heads": 2, "dqk": 25, "dv": 25, "max_seq_len": 200},
        [200] * 128,
    ),
}


def build(options: dict, mode: str, lengths: list[int], kernel: bool):
    torch.manual_seed(0)
    cfg = HSTUConfig(
        num_items=1000, num_layers=8, rel_bias=False, backend="reference", **options
    )
    model = apply_recompute(HSTU(cfg), mode)
    n = sum(lengths)
    ts = torch.arange(n) * 60
    offsets = make_offsets(lengths)
    batch = JaggedBatch(torch.randint(1, 1001, (n,)), offsets, ts, ts[offsets[1:] - 1] + 60)
    inputs = spec_of(model).prepare(model, batch)
    if kernel:
        inputs = dataclasses.replace(inputs, attention=kernel_like(inputs.attention))
    return model, batch, inputs


def memory() -> None:
    print("| shape | attention | none | selective | layers | (MiB per layer; attention's own) |")
    for name, (options, lengths) in SHAPES.items():
        for kernel in (False, True):
            cells = []
            for mode in MODES:
                model, batch, inputs = build(options, mode, lengths, kernel)
                with count_retained(model) as retained:
                    model(batch.item_ids, inputs)
                cells.append(
                    f"{retained.per_layer() / MiB:.1f} ({retained.attention_per_layer() / MiB:.1f})"
                )
                del model, inputs, retained
            label = "q, k, v only (kernel_like)" if kernel else "dense reference"
            print(f"| {name} | {label} | " + " | ".join(cells) + " |", flush=True)


def step_times() -> None:
    options = {"d_model": 128, "num_heads": 4, "dqk": 32, "dv": 32, "max_seq_len": 256}
    lengths = [256, 200, 131, 250]
    for kernel in (False, True):
        medians = {}
        for mode in MODES:
            model, batch, inputs = build(options, mode, lengths, kernel)
            samples = []
            for i in range(9):
                start = time.perf_counter()
                model(batch.item_ids, inputs).sum().backward()
                if i >= 2:
                    samples.append(time.perf_counter() - start)
            medians[mode] = statistics.median(samples)
        label = "kernel_like" if kernel else "dense reference"
        ratios = ", ".join(f"{m} {medians[m] / medians['none']:.2f}" for m in MODES)
        print(f"{label}: none {medians['none'] * 1e3:.0f} ms/step; vs none: {ratios}", flush=True)


if __name__ == "__main__":
    what = sys.argv[1:] or ["memory", "time"]
    if "memory" in what:
        memory()
    if "time" in what:
        step_times()
