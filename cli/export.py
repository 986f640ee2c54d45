"""``flexgr export`` and ``flexgr recommend``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from flexgr.cli.common import fail, print_json, stdout
from flexgr.cli.runs import Weights, load_weights, open_run
from rich.table import Table


def export_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The run to export from.")],
    out: Annotated[
        Path, typer.Option("--out", help="Output path stem: writes OUT.safetensors and OUT.json.")
    ],
    weights: Annotated[
        Weights,
        typer.Option(
            "--weights", help="model: the run's selected model; best / last: a checkpoint."
        ),
    ] = Weights.model,
) -> None:
    """Write a run's model as OUT.safetensors + OUT.json (load with flexgr.load)."""
    from flexgr.data import DataError
    from flexgr.export import ExportError, export_model, read_model_json
    from flexgr.train.rundir import RunDirError
    from flexgr.train.setup import load_dataset

    try:
        run, cfg = open_run(run_dir)
        if weights is Weights.model:
            # The exported files already hold the id map: no dataset needed.
            from flexgr.export import load_model

            model, description = load_model(run.model)
            item_ids, metadata = description["item_ids"], description.get("metadata", {})
        else:
            data = load_dataset(cfg)
            model = load_weights(run, cfg, data, weights)
            item_ids = data.item_ids
            metadata = {
                "dataset": data.name,
                "protocol": cfg.data.protocol,
                "weights": weights.value,
            }
        stem = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
        weights_path, json_path = export_model(model, stem, item_ids=item_ids, metadata=metadata)
        read_model_json(json_path)  # fail here, not at load time, if something went wrong
    except (RunDirError, DataError, ExportError, OSError) as err:
        fail(str(err))
    typer.echo(f"wrote {weights_path} and {json_path}")


def recommend_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The run whose model recommends.")],
    user: Annotated[str, typer.Option("--user", help="Raw user id, as in the dataset file.")],
    k: Annotated[int, typer.Option("--k", min=1, help="How many items.")] = 10,
    include_seen: Annotated[
        bool, typer.Option("--include-seen", help="Also recommend items the user already has.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list of raw item ids.")
    ] = False,
) -> None:
    """Top-k items for a user of the run's dataset.

    The model reads the user's whole history; items the user already interacted with are left
    out unless --include-seen.
    """
    from flexgr.data import DataError
    from flexgr.export import ExportError, load
    from flexgr.train.rundir import RunDirError
    from flexgr.train.setup import load_dataset

    try:
        run, cfg = open_run(run_dir)
        recommender = load(run.model)
        data = load_dataset(cfg)
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
    if as_json:
        print_json([item for item, _ in scored])
        return
    table = Table(title=f"user {user}: top {k} of {recommender.num_items:,} items")
    table.add_column("rank", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    for rank, (item, score) in enumerate(scored, start=1):
        table.add_row(str(rank), item, f"{score:.4f}")
    stdout().print(table)
