"""VISTA measurements: stage-2 cost against history length, QLA against SiLU attention, and
ML-100K ranking quality against HSTU.

    python benchmarks/vista.py stage2 --device cpu                    # L = 1k .. 100k, tiny model
    python benchmarks/vista.py qla --device cpu                       # step time vs L
    python benchmarks/vista.py quality --device cpu --seeds 42 43 44  # ML-100K, VISTA vs HSTU
    python benchmarks/vista.py quality --models vista vista-rec vista-qla hstu
    python benchmarks/vista.py stage2 --device cuda --hstu-max-len 131072   # later, on a GPU

``stage2`` prints one JSON line per history length L: forward FLOPs (flexgr.flops) and latency
of VISTA's stage 2 scoring M candidates from a stored summary of S rows, of HSTU ranking over
the whole ``[history; candidates]`` sequence (merged tokens, target-aware mask; timed up to
``--hstu-max-len``, beyond that FLOPs only: the dense CPU path holds an [L, L] score matrix),
and of stage 1 (summarising the history, SiLU or QLA: the export-time cost, paid once per
summary refresh instead of per request). ``saved_vs_recompute`` is the share of inference FLOPs
a request saves by reading the summary instead of recomputing stage 1 (the paper's "94% fewer
GPUs" reads as this ratio); ``saved_vs_hstu`` the share against HSTU over the full history.

``qla`` prints one JSON line per L: the forward + backward time of one attention call over one
sequence of L tokens (H heads of width d), QLA (flexgr.vista.qla: eager, and on CUDA also its
Triton kernels, ``qla_eager_ms`` / ``qla_triton_ms``; ``qla_ms`` is the faster) and HSTU's SiLU
attention (flexgr.ops.hstu_attention: the dense reference on CPU, the Triton kernel on CUDA;
timed up to ``--silu-max-len``).

``quality`` trains each of ``--models`` for each seed and prints one JSON line per run: the
test metrics of the epoch selected on validation NE of like, the selected epoch and the wall
time. Models: ``vista`` (ml-100k-vista-ranking), ``vista-rec`` (with the reconstruction loss,
weight 0.1), ``vista-qla`` (its QLA summariser) and ``hstu`` (ml-100k-ranking; the same training
settings). Runs go to ``--out``; a finished run is reread.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 100_000]


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- stage 2 vs L


def _ranking_batch(L: int, M: int, num_items: int, seed: int):
    from flexgr.ranking.batch import RankingBatch

    g = torch.Generator().manual_seed(seed)
    return RankingBatch(
        history_items=torch.randint(1, num_items + 1, (L,), generator=g),
        history_actions=torch.randint(0, 11, (L, 1), generator=g),
        history_timestamps=torch.arange(L, dtype=torch.int64),
        history_offsets=torch.tensor([0, L]),
        candidates=torch.randint(1, num_items + 1, (M,), generator=g),
        candidate_offsets=torch.tensor([0, M]),
        query_time=torch.tensor([L]),
    )


def stage1_flops(cfg, L: int, attention: str) -> float:
    """Forward FLOPs of the summariser over one history of L events (S seeds): projections
    on S + L tokens; SiLU attention over the seed mask's S (S + L) + L (L + 1) / 2 pairs, or
    QLA's state update and read-out, 2 dk dv each per token and head."""
    from flexgr.flops import layer_flops

    layer_cfg = cfg.summariser_config().layer_config()
    S, H = cfg.num_seeds, layer_cfg.num_heads
    tokens = S + L
    base = layer_flops(layer_cfg, tokens, 0)
    if attention == "qla":
        attn = 2.0 * 2 * tokens * H * layer_cfg.dqk * layer_cfg.dv
    else:
        pairs = S * (S + L) + L * (L + 1) // 2
        attn = layer_flops(layer_cfg, tokens, pairs).attention
    return cfg.summary_layers * (base.uvqk + base.output + attn)


def stage2(args: argparse.Namespace) -> None:
    from flexgr.flops import model_flops
    from flexgr.model.hstu.model import HSTUConfig
    from flexgr.model.registry import build_model, spec_of
    from flexgr.vista.model import prepare_stage2
    from flexgr.vista.target import target_layer_config

    device = torch.device(args.device)
    d, S, M, layers, items = args.d_model, args.seeds, args.candidates, args.layers, 1000
    max_len = max(args.lengths)
    common = {"num_items": items, "max_seq_len": max_len, "d_model": d, "dropout": 0.0}
    vista = build_model("vista-ranking", {
        **common, "num_seeds": S, "summary_layers": args.summary_layers, "target_layers": layers,
        "reconstruction_weight": 0.0,
    }).to(device).eval()  # fmt: skip
    hstu = build_model("hstu-ranking", {
        **common, "layout": "merged", "num_layers": layers, "dqk": d, "dv": d,
        "input_dropout": 0.0, "rel_bias": False,
    }).to(device).eval()  # fmt: skip
    hstu_spec = spec_of(hstu)
    s2_cfg = dataclasses.replace(target_layer_config(d, 1, layers, S, 0.0), contextual_len=S)
    s2_flops = model_flops(s2_cfg, [S + M], [M]).forward
    hstu_cfg = HSTUConfig(num_items=items, d_model=d, num_layers=layers, dqk=d, dv=d)
    summary = torch.randn(1, S, d, device=device)
    for L in args.lengths:
        batch = _ranking_batch(L, M, items, seed=L).to(device)
        target = prepare_stage2(vista, batch.candidate_offsets, batch.num_candidates)
        with torch.no_grad():
            score = functools.partial(vista.score, summary, batch.candidates, target)
            s2_s = timed(score, device, args.reps)
            hstu_s = None
            if L <= args.hstu_max_len:
                forward = functools.partial(hstu, batch, hstu_spec.prepare(hstu, batch))
                hstu_s = timed(forward, device, max(1, args.reps // 5))
        hstu_flops = model_flops(hstu_cfg, [L + M], [M]).forward
        silu1, qla1 = stage1_flops(vista.cfg, L, "silu"), stage1_flops(vista.cfg, L, "qla")
        row = {
            "L": L, "S": S, "M": M, "d": d, "layers": layers, "device": args.device,
            "stage2_flops": s2_flops, "stage2_ms": 1e3 * s2_s,
            "hstu_flops": hstu_flops, "hstu_ms": None if hstu_s is None else 1e3 * hstu_s,
            "stage1_silu_flops": silu1, "stage1_qla_flops": qla1,
            "saved_vs_recompute_silu": 1 - s2_flops / (s2_flops + silu1),
            "saved_vs_recompute_qla": 1 - s2_flops / (s2_flops + qla1),
            "saved_vs_hstu": 1 - s2_flops / hstu_flops,
        }  # fmt: skip
        print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- QLA vs SiLU step time


def _step(forward: Callable[[], torch.Tensor], leaves: tuple, grad: torch.Tensor) -> None:
    """One forward and backward of an attention call."""
    for t in leaves:
        t.grad = None
    forward().backward(grad)


def qla_vs_silu(args: argparse.Namespace) -> None:
    from flexgr.ops.kernel_options import kernel_options_set

    if args.autotune:
        return qla_sweep(args)
    # Tuning compiles ~13 tile and backward candidates for every new length, which made the
    # GPU sweep spend minutes compiling; the split backward is the usual pick there.
    with kernel_options_set(autotune=False, backward="split"):
        return qla_sweep(args)


def qla_sweep(args: argparse.Namespace) -> None:
    from flexgr.ops.attention import hstu_attention
    from flexgr.vista.qla import qla

    device = torch.device(args.device)
    H, d = args.heads, args.head_dim
    # The kernels run on CUDA only; there both are timed in the same process, eager as the baseline.
    impls = ["eager", "triton"] if device.type == "cuda" else ["eager"]
    for L in args.lengths:
        g = torch.Generator().manual_seed(L)
        q, k, v = (
            torch.randn(L, H, d, generator=g).mul_(0.5).to(device).requires_grad_()
            for _ in range(3)
        )
        offsets = torch.tensor([0, L], device=device)
        grad = torch.randn(L, H, d, device=device)
        qla_s: dict[str, float] = {}
        for impl in impls:
            forward_qla = functools.partial(qla, q, k, v, offsets, divisor=float(L), impl=impl)
            step = functools.partial(_step, forward_qla, (q, k, v), grad)
            qla_s[impl] = timed(step, device, args.reps)
        silu_s = None
        if L <= args.silu_max_len:
            forward_silu = functools.partial(
                hstu_attention, q, k, v, offsets, max_seq_len=L, alpha=1.0
            )
            silu = functools.partial(_step, forward_silu, (q, k, v), grad)
            silu_s = timed(silu, device, args.reps)
        fastest = min(qla_s.values())
        row = {
            "L": L, "heads": H, "head_dim": d, "device": args.device,
            "qla_ms": 1e3 * fastest, "silu_ms": None if silu_s is None else 1e3 * silu_s,
            "qla_us_per_token": 1e6 * fastest / L,
            **{f"qla_{impl}_ms": 1e3 * t for impl, t in qla_s.items()},
        }  # fmt: skip
        print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- ML-100K quality


QUALITY = {
    "vista": ("ml-100k-vista-ranking", []),
    "vista-qla": ("ml-100k-vista-ranking", ["model.summary_attention=qla"]),
    "vista-rec": ("ml-100k-vista-ranking", ["model.reconstruction_weight=0.1"]),
    "hstu": ("ml-100k-ranking", []),
}


def quality(args: argparse.Namespace) -> None:
    from rich.console import Console

    from flexgr.train.config import apply_overrides, load_preset
    from flexgr.train.loop import fit

    out = Path(args.out)
    for name in args.models:
        preset, extra = QUALITY[name]
        for seed in args.seeds:
            run_dir = out / f"ml-100k.{name}.s{seed}"
            summary = run_dir / "benchmark.json"
            if summary.is_file():
                print(summary.read_text().strip(), flush=True)
                continue
            overrides = [*extra, f"train.seed={seed}", f"train.device={args.device}"]
            if args.data_dir:
                overrides.append(f"data.data_dir={args.data_dir}")
            cfg = apply_overrides(load_preset(preset), overrides)
            start = time.perf_counter()
            result = fit(cfg, run_dir, console=Console(quiet=True), show_progress=False)
            line = {
                "model": name, "preset": preset, "seed": seed, "device": args.device,
                "epoch": result.epoch, "steps": result.steps, "stop": result.stop_reason,
                "wall_s": round(time.perf_counter() - start, 1),
                **{k: v for k, v in result.test.items()
                   if k.split(":")[0] in ("ne", "auc", "gauc", "mse")},
            }  # fmt: skip
            text = json.dumps(line)
            summary.write_text(text + "\n")
            print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s2 = sub.add_parser("stage2", help="stage-2 FLOPs and latency vs history length")
    s2.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    s2.add_argument("--d-model", type=int, default=16)
    s2.add_argument("--seeds", type=int, default=16, help="S, the summary rows")
    s2.add_argument("--candidates", type=int, default=8, help="M, candidates per request")
    s2.add_argument("--layers", type=int, default=1, help="stage-2 layers = HSTU layers")
    s2.add_argument("--summary-layers", type=int, default=1)
    s2.add_argument("--hstu-max-len", type=int, default=8192, help="time HSTU up to this L")
    s2.add_argument("--reps", type=int, default=20)
    q = sub.add_parser("qla", help="QLA vs SiLU attention step time vs L")
    q.add_argument("--lengths", type=int, nargs="+", default=[256, 512, *LENGTHS])
    q.add_argument("--heads", type=int, default=1)
    q.add_argument("--head-dim", type=int, default=16)
    q.add_argument("--silu-max-len", type=int, default=8192, help="time SiLU up to this L")
    q.add_argument("--reps", type=int, default=3)
    q.add_argument("--autotune", action="store_true", help="tune SiLU's tiles per length")
    qual = sub.add_parser("quality", help="ML-100K ranking, VISTA vs HSTU, several seeds")
    qual.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    qual.add_argument("--models", nargs="+", choices=list(QUALITY), default=["vista", "hstu"])
    qual.add_argument("--out", default="runs/vista-quality")
    qual.add_argument("--data-dir", default=None)
    for p in (s2, q, qual):
        p.add_argument("--device", default="cpu")
    args = parser.parse_args()
    {"stage2": stage2, "qla": qla_vs_silu, "quality": quality}[args.command](args)


if __name__ == "__main__":
    main()
