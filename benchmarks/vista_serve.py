"""Per-request latency of ``/score`` on a VISTA run: from a stored summary (``flexgr serve
--summaries``, stage 2 only) against the full model on the history sent in the request.

Builds a synthetic dataset of a few users with long histories, trains a ``vista-ranking`` run on
it for one step (latency does not depend on the weights), exports the test split's summaries,
then serves the run in-process on a free localhost port and sends requests one at a time
(httpx, keep-alive): ``user`` requests read the user's summary, ``history`` requests send L
events and run stage 1 and stage 2. Also times the model alone
(``RankingService.run_batch`` on one job, no HTTP). docs/vista.md#serving-from-the-summary-cache.

    OMP_NUM_THREADS=1 python benchmarks/vista_serve.py --lengths 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(call: Callable[[], object], requests: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p90_ms": round(percentile(times, 0.9), 2),
        "requests": requests,
    }


def write_dataset(home: Path, users: int, length: int, items: int, seed: int) -> None:
    from flexgr.data import prepare

    rng = random.Random(seed)
    lines = ["user,item,ts,rating"]
    for user in range(users):
        ts = 1_000_000
        for _ in range(length):
            ts += rng.choice([60, 600, 4000])
            lines.append(f"u{user},i{rng.randrange(items)},{ts},{rng.randint(1, 5)}")
    csv = home / "longrank.csv"
    csv.write_text("\n".join(lines) + "\n")
    columns = {"user_col": "user", "item_col": "item", "time_col": "ts", "rating_col": "rating"}
    prepare(str(csv), fmt="csv", name="longrank", data_dir=home, progress=False, **columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--preset", default="ml-100k-vista-ranking")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--out", type=Path, help="append the JSON lines here too")
    args = parser.parse_args()

    from flexgr.cli.runs import Weights, load_recommender, open_run
    from flexgr.ranking.setup import ranking_data
    from flexgr.serve import RankingOptions, RankingService, RankingUsers
    from flexgr.serve.app import create_app
    from flexgr.serve.schemas import RankScoreRequest
    from flexgr.serve.server import BackgroundServer
    from flexgr.serve.summaries import SummaryServing
    from flexgr.train import apply_overrides, fit
    from flexgr.train.config import load_preset
    from flexgr.train.setup import load_dataset
    from flexgr.vista.cache import DirectorySummaryStore, export_summaries

    longest = max(args.lengths)
    work = Path(tempfile.mkdtemp(prefix="vista-serve-"))
    # Enough events that the test request's history holds `longest` of them.
    write_dataset(work, args.users, longest + 40, args.items, seed=0)
    overrides = [
        "data.dataset=longrank", f"data.data_dir={work}", f"data.max_seq_len={longest}",
        "train.max_steps=1", "train.batch_size=2", "eval.batch_size=4", *args.set,
    ]  # fmt: skip
    cfg = apply_overrides(load_preset(args.preset), overrides)
    run_dir = work / "run"
    fit(cfg, run_dir, show_progress=False)
    run, cfg = open_run(run_dir)
    data = load_dataset(cfg)
    ranker = load_recommender(run, cfg, Weights.model, data)
    store = DirectorySummaryStore(work / "summaries")
    export_summaries(ranker.model, ranking_data(cfg, data), store, which="test")  # type: ignore[arg-type]
    service = RankingService(
        ranker,  # type: ignore[arg-type]
        users=RankingUsers(data, ranker),  # type: ignore[arg-type]
        options=RankingOptions(max_candidates=args.candidates, microbatch=1024),
        summaries=SummaryServing(ranker, store),  # type: ignore[arg-type]
    )
    rng = random.Random(1)
    candidates = [
        ranker.item_ids[rng.randrange(len(ranker.item_ids))] for _ in range(args.candidates)
    ]
    rows = []
    with (
        BackgroundServer(create_app(service, max_batch=1)) as server,
        httpx.Client(base_url=server.url, timeout=120) as client,
    ):

        def measure(path: str, length: int | None, body: dict) -> dict:
            job = service.score_job(RankScoreRequest(**body))
            http = timed(lambda: client.post("/score", json=body).raise_for_status(),
                         args.requests, args.warmup)  # fmt: skip
            alone = timed(lambda: service.run_batch([job]), args.requests, args.warmup)
            return {"path": path, "history": length, "http": http, "model": alone}

        rows.append(measure("summary", None, {"user": "u0", "candidates": candidates}))
        for length in args.lengths:
            history = [ranker.item_ids[rng.randrange(len(ranker.item_ids))] for _ in range(length)]
            body = {"history": history, "actions": [float(rng.randint(1, 5)) for _ in history],
                    "timestamps": list(range(0, 60 * length, 60)), "candidates": candidates}  # fmt: skip
            rows.append(measure("full", length, body))
    shutil.rmtree(work, ignore_errors=True)
    model_cfg = ranker.model.cfg
    for row in rows:
        row.update(candidates=args.candidates, d_model=model_cfg.d_model,
                   num_seeds=model_cfg.num_seeds, summary_layers=model_cfg.summary_layers,
                   target_layers=model_cfg.target_layers,
                   summary_attention=model_cfg.summary_attention)  # fmt: skip
        line = json.dumps(row)
        print(line)
        if args.out is not None:
            with args.out.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
