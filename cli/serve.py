"""``flexgr serve``: a run's model over HTTP (docs/serving.md)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, cast

import typer
from flexgr.cli.common import fail
from flexgr.cli.runs import WEIGHTS_HELP, Weights, load_recommender, open_run


def serve_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The run whose model serves.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port (0: any free port).")
    ] = 8000,
    weights: Annotated[Weights, typer.Option("--weights", help=WEIGHTS_HELP)] = Weights.model,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto.")] = "cpu",
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Most requests run as one batch.")
    ] = 32,
    max_wait_ms: Annotated[
        float,
        typer.Option("--max-wait-ms", min=0, help="Longest wait for a batch to fill (ms)."),
    ] = 2.0,
    max_k: Annotated[
        int, typer.Option("--max-k", min=1, help="Largest k a request may ask.")
    ] = 1000,
    max_candidates: Annotated[
        int, typer.Option("--max-candidates", min=1, help="Most candidates one /score may send.")
    ] = 10_000,
    microbatch: Annotated[
        int,
        typer.Option("--microbatch", min=1, help="Ranking: candidates per M-FALCON pass."),
    ] = 1024,
    history_cache: Annotated[
        int,
        typer.Option(
            "--history-cache",
            min=0,
            help="Ranking: users' encoded histories kept across requests (0: none).",
        ),
    ] = 64,
    summaries: Annotated[
        Path | None,
        typer.Option(
            "--summaries",
            help="vista-ranking runs: a summary store (flexgr vista export-summaries --out); "
            "/score for a user then reads the user's newest summary at or before query_time "
            "and runs stage 2 only.",
        ),
    ] = None,
    max_body_kb: Annotated[
        int, typer.Option("--max-body-kb", min=1, help="Largest request body (KiB).")
    ] = 1024,
    users: Annotated[
        bool,
        typer.Option(
            "--users/--no-users",
            help="Load the run's dataset so requests can name a user id (--no-users: "
            "histories only, no dataset needed).",
        ),
    ] = True,
    ann: Annotated[
        bool,
        typer.Option("--ann", help="Approximate top-k with FAISS (pip install 'flexgr[ann]')."),
    ] = False,
    ann_probe: Annotated[
        int, typer.Option("--ann-probe", min=1, help="FAISS cells scanned per query.")
    ] = 32,
    ann_lists: Annotated[
        int, typer.Option("--ann-lists", min=0, help="FAISS cells (0: about 4 sqrt(items)).")
    ] = 0,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn's log level: warning, info, debug.")
    ] = "warning",
    warm_up: Annotated[
        bool,
        typer.Option(
            "--warm-up/--no-warm-up",
            help="Run each batch size once before listening, so first requests do not compile "
            "kernels (on CUDA; CPU skips it unless asked).",
        ),
    ] = True,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=0,
            help="CPU threads per model call (torch.set_num_threads; 0: torch's default). On a "
            "busy machine 1 avoids threads waiting on each other.",
        ),
    ] = 0,
    kernel_autotune: Annotated[
        bool,
        typer.Option(
            "--kernel-autotune",
            help="Time Triton tile candidates per new shape (off: the first candidate; timing "
            "on the request path stalls requests for seconds).",
        ),
    ] = False,
) -> None:
    """Serve /recommend, /score, /health and /metadata for a run's model.

    Requests from concurrent callers are batched (--max-batch, --max-wait-ms). A ranking model
    answers /score with per-task predictions (M-FALCON, the history cached per user) and refuses
    /recommend; a vista-ranking run with --summaries answers a user's /score from the user's
    stored summary (stage 2 only). Errors are JSON with a 4xx status for bad input; see
    docs/serving.md.
    """
    try:
        from flexgr.serve.app import create_app
        from flexgr.serve.server import bind, serve, url_of
    except ImportError:
        fail("flexgr serve needs FastAPI and uvicorn: pip install 'flexgr[serve]'")
    from flexgr.data import DataError
    from flexgr.export import ExportError
    from flexgr.ranking.scorer import Ranker
    from flexgr.serve import (
        DatasetUsers,
        Limits,
        RankingOptions,
        RankingService,
        RankingUsers,
        Service,
    )
    from flexgr.serve.ann import AnnUnavailable, ApproximateIndex
    from flexgr.serve.summaries import SummaryServing
    from flexgr.train.rundir import RunDirError
    from flexgr.train.runtime import resolve_device
    from flexgr.train.setup import load_dataset
    from flexgr.vista.cache import DirectorySummaryStore

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        target = resolve_device(device)
    except (ValueError, RuntimeError) as err:  # torch.device("x") raises RuntimeError
        fail(f"--device {device}: {str(err).splitlines()[0]}")
    try:
        run, cfg = open_run(run_dir)
        if summaries is not None and cfg.model.arch != "vista-ranking":
            fail(
                f"--summaries: {run_dir} is a {cfg.model.arch} run; stored summaries are served "
                "for vista-ranking runs only"
            )
        if cfg.is_ranking and ann:
            fail("--ann ranks a retrieval model's item table; a ranking model scores candidates")
        data = load_dataset(cfg) if users or weights is not Weights.model else None
        loaded = load_recommender(run, cfg, weights, data)
        loaded.model.to(target)
        service: Service | RankingService
        if cfg.is_ranking:
            ranker = cast(Ranker, loaded)
            served = None
            if summaries is not None:
                try:
                    served = SummaryServing(ranker, DirectorySummaryStore(summaries))
                except (ValueError, OSError) as err:
                    fail(f"--summaries {summaries}: {err}")
            service = RankingService(
                ranker,
                users=RankingUsers(data, ranker) if users and data is not None else None,
                options=RankingOptions(
                    max_candidates=max_candidates,
                    microbatch=microbatch,
                    cache_entries=history_cache,
                ),
                weights=weights.value,
                summaries=served,
            )
        else:
            service = Service(
                loaded,
                users=DatasetUsers.of(data, loaded) if users and data is not None else None,
                limits=Limits(max_k=max_k, max_candidates=max_candidates),
                weights=weights.value,
            )
            if ann:
                service.ann = ApproximateIndex(service.table, lists=ann_lists, probe=ann_probe)
    except AnnUnavailable as err:
        fail(str(err))
    except (RunDirError, DataError, ExportError) as err:
        fail(str(err))
    from flexgr.ops.kernel_options import kernel_options, set_kernel_options

    set_kernel_options(dataclasses.replace(kernel_options(), autotune=kernel_autotune))
    if warm_up and target.type == "cuda":
        typer.echo(f"warming up: batches of 1 to {max_batch} (first calls compile kernels)")
        start = time.perf_counter()
        runs = service.warm_up(max_batch)
        typer.echo(f"warmed up: {runs} batches in {time.perf_counter() - start:.1f} s")
    app = create_app(
        service, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_kb * 1024
    )
    try:
        sock = bind(host, port)
    except OSError as err:
        fail(f"cannot listen on {host}:{port}: {err.strerror or err}")
    who = f", {service.users.count:,} users of {service.users.name}" if service.users else ""
    if isinstance(service, RankingService):  # say what /score answers
        who += f"; ranking: {', '.join(service.ranker.tasks)}"
        if service.summaries is not None:
            meta = service.summaries.metadata()
            bits = "/".join(f"int{b}" for b in meta["bits"])
            who += f"; summaries of {meta['users']:,} users ({bits}) from {meta['store']}"
    typer.echo(
        f"serving {run_dir} ({weights.value} weights, {service.num_items:,} items{who}) on "
        f"{url_of(sock)} (Ctrl-C stops)",
    )
    try:
        serve(app, sock, log_level=log_level)
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the SIGINT
        typer.echo("stopped", err=True)
