"""Scoring throughput of GESR's mixture of attention against the plain two-tower ranker.

    python benchmarks/gesr.py                                   # CPU, the ML-100K presets' sizes
    python benchmarks/gesr.py --device cuda --requests 64 --candidates 64,512,2048
    python benchmarks/gesr.py --device cuda --precision bf16 --preset-size ml-1m
    python benchmarks/gesr.py --device cuda --compile           # model.compile_scorer = true

Each row times ``prepare`` plus the forward of one batch of ``--requests`` requests, each a
history of ``--history`` events and ``--candidates`` candidates (synthetic ids and ratings),
under ``torch.no_grad`` in eval mode, and prints one JSON line: candidates scored per second
(the median over ``--repeats`` timed calls after ``--warmup``; the variants take turns within
each repeat) for the two-tower ranker, GESR with no expert (MLPG over the towers), with each
expert alone and with all of them, and each one's throughput relative to the two-tower's in the
same process. On CPU it also
prints the thread's CPU time per batch (``cpu_ms``, ``candidates_per_cpu_s``): with the
default one thread that leaves out the time spent waiting for a core on a shared machine.
Every line also counts what one call dispatches (benchmarks/op_count.py, one extra call outside
the timing): ``ops_per_call``, the aten ops that launch a kernel on CUDA (a proxy for the
launches), ``host_reads_per_call`` (each a device-to-host sync on CUDA) and
``uploads_per_call`` (tensors made from host data, each a blocking copy on CUDA).
``--compile`` scores the GESR variants with ``model.compile_scorer = true`` (the forward under
torch.compile, compiled in the warm-up); their counts then cover the eager ``prepare`` only
(the dispatcher does not see inside compiled kernels).

The models are the presets' (``ml-100k-two-tower-ranking`` and ``ml-100k-gesr-ranking``, or
the ml-1m ones) with their own sizes; only the expert set changes. Nothing is cached across
calls: both models run their item tower on every candidate (a serving cache of the item tower
would speed both up alike), and GESR's prepare is in the timing (it reads nothing on the host:
``host_reads_per_call`` says so).

``--serving`` times one request at a time instead (``--history`` events, each of
``--candidates``), for the GESR preset's model (``--experts`` to change its expert set), one
line per serving path (flexgr.gesr.falcon), milliseconds per request:

- ``whole``: the model's forward on history + candidates (``Ranker.score(falcon=False)``);
- ``falcon``: the history encoded, then the candidates over it, item side computed per call;
- ``falcon+items``: the same with the item side cached (:func:`flexgr.gesr.falcon.item_side`);
- ``falcon+items+history``: the history found in a ``HistoryStore`` (its content check
  included), only the candidates run (``Ranker.score(cache_key=...)`` on a repeat call);
- ``...+fp8``: the last with ``quantise_linears(model, min_features=--fp8-min-features)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from op_count import OpCount, count_ops

VARIANTS: list[tuple[str, str, list[str] | None]] = [
    ("two-tower", "two-tower-ranking", None),
    ("gesr:none", "gesr-ranking", []),  # MLPG over the towers alone: the gating's own cost
    ("gesr:match", "gesr-ranking", ["match"]),
    ("gesr:cross", "gesr-ranking", ["cross"]),
    ("gesr:self", "gesr-ranking", ["self"]),
    ("gesr:cross+self", "gesr-ranking", ["cross", "self"]),
    ("gesr:all", "gesr-ranking", ["match", "cross", "self"]),
]
TASKS = (["like", "dislike", "rating"], ["bce", "bce", "mse"])


def preset_options(preset: str, num_items: int, max_seq_len: int) -> dict[str, Any]:
    from flexgr.train.config import load_preset

    options = load_preset(preset).model_options()
    options.update(
        num_items=num_items,
        max_seq_len=max_seq_len,
        action_inputs=["rating"],
        action_vocab=[11],
        tasks=TASKS[0],
        task_kinds=TASKS[1],
    )
    return options


def synthetic_batch(requests: int, history: int, candidates: int, num_items: int, seed: int):
    """``requests`` histories of ``history`` events (random items, ratings 1..5, increasing
    timestamps) and ``candidates`` random candidates each."""
    from flexgr.ranking.batch import RankingBatch

    g = torch.Generator().manual_seed(seed)
    H, C = requests * history, requests * candidates
    steps = torch.randint(1, 4000, (requests, history), generator=g)
    timestamps = (1_000_000 + steps.cumsum(1)).reshape(-1)
    return RankingBatch(
        history_items=torch.randint(1, num_items + 1, (H,), generator=g),
        history_actions=torch.randint(1, 11, (H, 1), generator=g),
        history_timestamps=timestamps,
        history_offsets=torch.arange(0, H + 1, history),
        candidates=torch.randint(1, num_items + 1, (C,), generator=g),
        candidate_offsets=torch.arange(0, C + 1, candidates),
        query_time=timestamps.view(requests, history)[:, -1] + 60,
    )


def scoring_call(model, batch, device: torch.device, precision: str):
    """A no-argument function: prepare + forward of ``batch``, finished (CUDA synchronised)."""
    from flexgr.model.registry import spec_of

    spec = spec_of(model)
    amp = precision == "bf16" and device.type == "cuda"

    def call() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model(batch, spec.prepare(model, batch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return call


def count_fields(count: OpCount) -> dict[str, int]:
    return {
        "ops_per_call": count.ops,
        "host_reads_per_call": count.host_reads,
        "uploads_per_call": count.uploads,
    }


def prepare_call(model, batch):
    """A no-argument function: ``prepare`` of ``batch`` alone (what --compile leaves eager)."""
    from flexgr.model.registry import spec_of

    spec = spec_of(model)

    def call() -> None:
        with torch.no_grad():
            spec.prepare(model, batch)

    return call


def time_round_robin(
    calls: dict[str, Any], warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """(median wall seconds, median CPU seconds of this thread) of each call. The calls take
    turns within every repeat, so a load that changes over the run (a shared machine) slows
    them alike; with one CPU thread the thread's CPU time leaves out the time it waited for
    a core, so it stays steady on a busy machine."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            call()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.thread_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in calls}


def serving_calls(model, history: tuple, candidates: torch.Tensor) -> dict[str, Any]:
    """No-argument functions scoring one request by each serving path (see the docstring)."""
    from flexgr.gesr.falcon import (
        candidate_logits,
        encode_ranking_history,
        history_content,
        item_side,
    )
    from flexgr.model.hstu.falcon import HistoryStore
    from flexgr.model.registry import spec_of
    from flexgr.ranking.batch import RankingBatch

    items, actions, timestamps, query_time = history
    n, m = len(items), len(candidates)
    batch = RankingBatch(
        items,
        actions,
        timestamps,
        torch.tensor([0, n]),
        candidates,
        torch.tensor([0, m]),
        torch.tensor([query_time]),
    )
    spec = spec_of(model)
    store = HistoryStore()
    store.put("user", history_content(model, *history), encode_ranking_history(model, *history))
    item_side(model)  # built once per model, outside the timing

    def whole() -> None:
        model(batch, spec.prepare(model, batch))

    def falcon() -> None:
        cache = encode_ranking_history(model, *history)
        candidate_logits(model, cache, candidates, microbatch=m, use_item_side=False)

    def falcon_items() -> None:
        candidate_logits(model, encode_ranking_history(model, *history), candidates, microbatch=m)

    def falcon_cached() -> None:
        cache = store.get("user", history_content(model, *history))
        assert cache is not None
        candidate_logits(model, cache, candidates, microbatch=m)

    return {
        "whole": whole,
        "falcon": falcon,
        "falcon+items": falcon_items,
        "falcon+items+history": falcon_cached,
    }


def serving_main(args: argparse.Namespace, history_len: int) -> None:
    import copy

    from flexgr.gesr.quantise import quantise_linears
    from flexgr.model.registry import build_model

    options = preset_options(f"{args.preset_size}-gesr-ranking", args.num_items, history_len)
    if args.experts is not None:
        options["experts"] = [e for e in args.experts.split(",") if e]
    torch.manual_seed(0)
    model = build_model("gesr-ranking", options).eval()
    quantised = copy.deepcopy(model)
    fp8_modules = quantise_linears(quantised, min_features=args.fp8_min_features)
    batch = synthetic_batch(1, history_len, 1, args.num_items, seed=0)
    history = (
        batch.history_items,
        batch.history_actions,
        batch.history_timestamps,
        int(batch.query_time[0]),
    )
    g = torch.Generator().manual_seed(1)
    for count in [int(c) for c in args.candidates.split(",")]:
        candidates = torch.randint(1, args.num_items + 1, (count,), generator=g)
        calls = serving_calls(model, history, candidates)
        fp8 = serving_calls(quantised, history, candidates)["falcon+items+history"]
        calls["falcon+items+history+fp8"] = fp8
        with torch.no_grad():
            timed = time_round_robin(calls, args.warmup, args.repeats)
            counts = {name: count_ops(call) for name, call in calls.items()}
        whole_cpu = timed["whole"][1]
        for name, (seconds, cpu_seconds) in timed.items():
            line = {
                "serving": name,
                "experts": options["experts"],
                "preset_size": args.preset_size,
                "threads": torch.get_num_threads(),
                "history": history_len,
                "candidates": count,
                "ms_per_request": round(seconds * 1e3, 3),
                "cpu_ms_per_request": round(cpu_seconds * 1e3, 3),
                "cpu_speedup_over_whole": round(whole_cpu / cpu_seconds, 2),
                **count_fields(counts[name]),
            }
            if name.endswith("fp8"):
                line["fp8_modules"] = len(fp8_modules)
            print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--preset-size", choices=["ml-100k", "ml-1m"], default="ml-100k")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--history", type=int, default=0, help="0: the preset's max_seq_len")
    parser.add_argument("--candidates", default="8,64,512", help="per request, comma-separated")
    parser.add_argument("--num-items", type=int, default=1682)
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: steady on a shared machine, where OpenMP threads contend); "
        "0: torch's default",
    )
    parser.add_argument(
        "--compile", action="store_true", help="GESR variants with model.compile_scorer = true"
    )
    parser.add_argument("--serving", action="store_true", help="per-request serving paths")
    parser.add_argument("--experts", default=None, help="--serving: comma-separated, '' none")
    parser.add_argument("--fp8-min-features", type=int, default=64)
    args = parser.parse_args()

    from flexgr.model.registry import build_model
    from flexgr.train.config import load_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gesr_preset = f"{args.preset_size}-gesr-ranking"
    history = args.history or load_preset(gesr_preset).data.max_seq_len
    if args.serving:
        if device.type != "cpu":
            parser.error("--serving times the CPU paths only")
        serving_main(args, history)
        return
    wanted = args.variants.split(",")
    unknown = set(wanted) - {v[0] for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {[v[0] for v in VARIANTS]}")
    for candidates in [int(c) for c in args.candidates.split(",")]:
        batch = synthetic_batch(args.requests, history, candidates, args.num_items, seed=0)
        batch = batch.to(device)
        calls, preps = {}, {}
        for name, arch, experts in VARIANTS:
            if name not in wanted:
                continue
            options = preset_options(f"{args.preset_size}-{arch}", args.num_items, history)
            if experts is not None:
                options["experts"] = experts
                options["compile_scorer"] = args.compile
            torch.manual_seed(0)
            model = build_model(arch, options).to(device).eval()
            calls[name] = scoring_call(model, batch, device, args.precision)
            if experts is not None and args.compile:
                preps[name] = prepare_call(model, batch)
        timed = time_round_robin(calls, args.warmup, args.repeats)
        counted = {name: preps.get(name, call) for name, call in calls.items()}
        counts = {name: count_ops(call) for name, call in counted.items()}
        base = timed.get("two-tower")
        for name, (seconds, cpu_seconds) in timed.items():
            line = {
                "variant": name,
                "device": args.device,
                "precision": args.precision,
                "preset_size": args.preset_size,
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "requests": args.requests,
                "history": history,
                "candidates_per_request": candidates,
                "batch_ms": round(seconds * 1e3, 3),
                "candidates_per_s": round(batch.num_candidates / seconds, 1),
                "compiled": name in preps,
                **count_fields(counts[name]),
            }
            if device.type == "cpu":
                line["cpu_ms"] = round(cpu_seconds * 1e3, 3)
                line["candidates_per_cpu_s"] = round(batch.num_candidates / cpu_seconds, 1)
            if base is not None:
                line["relative_to_two_tower"] = round(base[0] / seconds, 4)
                if device.type == "cpu":
                    line["cpu_relative_to_two_tower"] = round(base[1] / cpu_seconds, 4)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
