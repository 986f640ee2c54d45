"""``flexgr export`` and ``flexgr recommend``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from flexgr.cli.common import fail, print_json, stdout
from flexgr.cli.runs import WEIGHTS_HELP, Weights, load_recommender, open_run
from rich.table import Table


def export_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The run to export from.")],
    out: Annotated[
        Path, typer.Option("--out", help="Output path stem: writes OUT.safetensors and OUT.json.")
    ],
    weights: Annotated[Weights, typer.Option("--weights", help=WEIGHTS_HELP)] = Weights.model,
) -> None:
    """Write a run's model as OUT.safetensors + OUT.json (load with flexgr.load)."""
    from flexgr.data import DataError
    from flexgr.export import ExportError, export_model, read_model_json
    from flexgr.train.rundir import RunDirError

    try:
        run, cfg = open_run(run_dir)
        recommender = load_recommender(run, cfg, weights)
        stem = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
        weights_path, json_path = export_model(
            recommender.model,
            stem,
            item_ids=recommender.item_ids,
            metadata=recommender.metadata,
        )
        read_model_json(json_path)  # fail here, not at load time, if something went wrong
    except (RunDirError, DataError, ExportError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write {err.filename or out}: {err.strerror or err}; nothing was replaced")
    typer.echo(f"wrote {weights_path} and {json_path} ({weights.value} weights)")


def recommend_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The run whose model recommends.")],
    user: Annotated[str, typer.Option("--user", help="Raw user id, as in the dataset file.")],
    k: Annotated[int, typer.Option("--k", min=1, help="How many items.")] = 10,
    include_seen: Annotated[
        bool, typer.Option("--include-seen", help="Also recommend items the user already has.")
    ] = False,
    weights: Annotated[Weights, typer.Option("--weights", help=WEIGHTS_HELP)] = Weights.model,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list of raw item ids.")
    ] = False,
) -> None:
    """Top-k items for a user of the run's dataset.

    The model reads the user's whole history; items the user already interacted with are left
    out unless --include-seen.
    """
    from flexgr.data import DataError
    from flexgr.export import ExportError
    from flexgr.train.rundir import RunDirError
    from flexgr.train.setup import load_dataset

    try:
        run, cfg = open_run(run_dir)
        data = load_dataset(cfg)
        recommender = load_recommender(run, cfg, weights, data)
        if hasattr(recommender, "tasks"):
            fail(
                f"{run_dir} holds a ranking model ({cfg.model.arch}): it scores given candidates; "
                "use flexgr score --candidates ..."
            )
        events = data.events_of(data.user_index(user))
        history = [data.item_ids[i - 1] for i in data.items[events]]
        scored = recommender.recommend_scored(
            history,
            k,
            timestamps=data.timestamps[events].tolist(),
            exclude_history=not include_seen,
        )
    except (RunDirError, DataError, ExportError, KeyError, ValueError) as err:
        fail(str(err))
    seen = 0 if include_seen else len(set(history))
    if not scored:
        typer.echo(
            f"user {user} has interacted with all {recommender.num_items:,} items of the model; "
            "nothing is left to recommend (--include-seen lists them anyway)",
            err=True,
        )
    if as_json:
        print_json([item for item, _ in scored])
        return
    if not scored:
        return
    console = stdout()
    console.print(_header(user, len(scored), k, recommender.num_items, seen), highlight=False)
    console.print(_table(scored))


def _header(user: str, shown: int, k: int, num_items: int, seen: int) -> str:
    """What the list is: "user 42: top 10 of 1,682 items (40 already seen, left out)"; when
    fewer than k are left, it says so."""
    left_out = f" ({seen:,} already seen, left out)" if seen else ""
    header = f"user {user}: top {shown:,} of {num_items:,} items{left_out}"
    if shown < k:
        header += f"; asked for {k:,}, only {shown:,} are left"
    return header


def _table(scored: list[tuple[str, float]]) -> Table:
    table = Table()
    table.add_column("rank", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    for rank, (item, score) in enumerate(scored, start=1):
        table.add_row(str(rank), item, f"{score:.4f}")
    return table


def score_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The run whose model scores.")],
    user: Annotated[str, typer.Option("--user", help="Raw user id, as in the dataset file.")],
    candidates: Annotated[
        str, typer.Option("--candidates", help="Comma-separated raw item ids to score.")
    ],
    microbatch: Annotated[
        int, typer.Option("--microbatch", min=1, help="Candidates per M-FALCON pass.")
    ] = 1024,
    weights: Annotated[Weights, typer.Option("--weights", help=WEIGHTS_HELP)] = Weights.model,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON [[id, score], ...].")] = False,
) -> None:
    """Score candidates for a user of the run's dataset, after the user's whole history.

    HSTU models score with M-FALCON: every candidate is a target of the history (it sees the
    history and itself, never another candidate) and the history is encoded once
    (docs/m-falcon.md); other models score with the retrieval dot product.
    """
    from flexgr.data import DataError
    from flexgr.export import ExportError
    from flexgr.train.rundir import RunDirError
    from flexgr.train.setup import load_dataset

    names = [c.strip() for c in candidates.split(",") if c.strip()]
    if not names:
        fail("--candidates is empty: give comma-separated item ids")
    try:
        run, cfg = open_run(run_dir)
        data = load_dataset(cfg)
        recommender = load_recommender(run, cfg, weights, data)
        events = data.events_of(data.user_index(user))
        history = [data.item_ids[i - 1] for i in data.items[events]]
        if hasattr(recommender, "tasks"):  # a ranking model: per-task predictions
            _score_ranking(recommender, data, events, history, names, user, microbatch, as_json)
            return
        scored = recommender.score_candidates(
            history, names, timestamps=data.timestamps[events].tolist(), microbatch=microbatch
        )
    except (RunDirError, DataError, ExportError, KeyError, ValueError) as err:
        fail(str(err))
    if as_json:
        print_json([[item, score] for item, score in scored])
        return
    console = stdout()
    console.print(
        f"user {user}: {len(scored)} candidates, scored after {len(history)} events",
        highlight=False,
    )
    console.print(_table(scored))


def _score_ranking(ranker, data, events, history, names, user, microbatch, as_json) -> None:
    """A ranking model's per-task predictions after the user's most recent events (the model's
    max_seq_len of them, with their actions); raises what score_command turns into one line."""
    actions = {
        name: (data.ratings[events] if name == "rating" else data.actions[name][events]).tolist()
        for name in ranker.action_inputs
        if name == "rating" or name in data.actions
    }
    scored = ranker.score(
        history, names, actions=actions, timestamps=data.timestamps[events].tolist(),
        microbatch=microbatch, truncate=True,
    )
    if as_json:
        print_json([[item, predictions] for item, predictions in scored])
        return
    read = min(len(history), ranker.max_seq_len)
    console = stdout()
    console.print(
        f"user {user}: {len(scored)} candidates, scored after the last {read} of "
        f"{len(history)} events; probabilities for BCE tasks, values for MSE tasks",
        highlight=False,
    )
    table = Table()
    table.add_column("item")
    for task in ranker.tasks:
        table.add_column(task, justify="right")
    for item, predictions in scored:
        table.add_row(item, *(f"{predictions[t]:.4f}" for t in ranker.tasks))
    console.print(table)
