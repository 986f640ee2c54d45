"""M-FALCON: scoring many candidates over one history, with and without the history cache.

    python benchmarks/falcon.py                       # GPU if there is one, else CPU
    python benchmarks/falcon.py --history 4096 --candidates 1024 --microbatch 256

Three ways to get every candidate's target-aware state, all equal (tests/model/test_falcon.py):
``uncached``: each microbatch of candidates appended as targets to the history and the whole
model run on it (the history is recomputed per microbatch); ``cached``: the history once
(keys and values per layer), then only the candidates' tokens; and, for small runs, ``alone``:
one model call per candidate. Prints candidates per second and the ratio to ``uncached``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from profiling import synchronise  # benchmarks/profiling.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flexgr.batch import JaggedBatch  # noqa: E402
from flexgr.model import HSTU, HSTUConfig, encode  # noqa: E402
from flexgr.model.hstu.falcon import candidate_states, encode_history  # noqa: E402


def timed(fn, device: torch.device, reps: int = 3) -> float:
    fn()
    synchronise(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronise(device)
    return (time.perf_counter() - start) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--history", type=int, default=1024)
    p.add_argument("--candidates", type=int, default=256)
    p.add_argument("--microbatch", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    L, M, bm = args.history, args.candidates, args.microbatch
    cfg = HSTUConfig(num_items=100_000, d_model=args.d_model, num_layers=args.layers,
                     num_heads=2, dqk=args.d_model // 2, dv=args.d_model // 2,
                     max_seq_len=L + bm)
    torch.manual_seed(0)
    model = HSTU(cfg).to(device).eval()
    ids = torch.randint(1, 100_001, (L,), device=device)
    ts = torch.cumsum(torch.randint(0, 1000, (L,), device=device), 0)
    qt = int(ts[-1]) + 10
    cands = torch.randint(1, 100_001, (M,), device=device)

    @torch.no_grad()
    def uncached() -> None:
        for s in range(0, M, bm):
            c = cands[s : s + bm]
            seq = torch.cat([ids, c])
            stamps = torch.cat([ts, torch.full_like(c, qt)])
            batch = JaggedBatch(seq, torch.tensor([0, len(seq)], device=device), stamps,
                                torch.tensor([qt], device=device),
                                torch.tensor([len(c)], device=device))
            encode(model, batch)

    def cached() -> None:
        candidate_states(model, encode_history(model, ids, ts, qt), cands, microbatch=bm)

    rows = [("uncached (history per microbatch)", timed(uncached, device)),
            ("cached (history once)", timed(cached, device))]
    base = rows[0][1]
    print(f"# {device}, history {L}, {M} candidates, microbatch {bm}, d={args.d_model}, "
          f"{args.layers} layers, backend {cfg.backend}")
    print("| path | s per request | candidates / s | vs uncached |\n| --- | --- | --- | --- |")
    for name, sec in rows:
        print(f"| {name} | {sec:.4f} | {M / sec:,.0f} | {base / sec:.2f}x |")


if __name__ == "__main__":
    main()
