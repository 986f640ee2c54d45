"""``flexgr data``: prepare datasets and list the prepared ones."""

from __future__ import annotations

import json
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from flexgr.data import BUILTINS, GENERATORS, DataError, DatasetMeta, read_meta
from flexgr.data import prepare as prepare_dataset
from flexgr.data.prepare import data_home
from flexgr.data.readers import DuplicateEventsWarning

app = typer.Typer(
    help="Prepare interaction datasets (built-in MovieLens, synthetic, or your own files).",
    no_args_is_help=True,
    add_completion=False,
)


class Ties(str, Enum):
    hash = "hash"
    file = "file"


class Format(str, Enum):
    movielens_dat = "movielens-dat"
    movielens_csv = "movielens-csv"
    movielens_100k = "movielens-100k"
    amazon = "amazon"
    recbole = "recbole"
    csv = "csv"
    parquet = "parquet"


@app.command()
def prepare(
    dataset: Annotated[
        str | None,
        typer.Argument(
            help=f"Built-in dataset: {', '.join([*BUILTINS, *GENERATORS])}. Omit when using --path."
        ),
    ] = None,
    path: Annotated[
        Path | None, typer.Option("--path", help="Interaction file to prepare.")
    ] = None,
    fmt: Annotated[
        Format | None,
        typer.Option("--format", help="Format of --path (inferred from .dat/.inter/.parquet)."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Dataset name (default: the file's stem).")
    ] = None,
    user_col: Annotated[str | None, typer.Option(help="csv/parquet: user id column.")] = None,
    item_col: Annotated[str | None, typer.Option(help="csv/parquet: item id column.")] = None,
    time_col: Annotated[str | None, typer.Option(help="csv/parquet: timestamp column.")] = None,
    rating_col: Annotated[
        str | None, typer.Option(help="csv/parquet: rating column (optional).")
    ] = None,
    sep: Annotated[
        str | None, typer.Option(help="csv: field separator (default ','; '\\t' for a tab).")
    ] = None,
    action_cols: Annotated[
        str | None,
        typer.Option(help="csv/parquet: integer action columns, comma-separated (ranking)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Where datasets live (default $FLEXGR_HOME or ~/.cache/flexgr)."
        ),
    ] = None,
    item_file: Annotated[
        Path | None,
        typer.Option(
            "--item-file",
            help="--path only: every item of the catalogue (one id per line, or a Parquet "
            "column --item-col), so never-rated items can be ranked.",
        ),
    ] = None,
    ties: Annotated[
        Ties,
        typer.Option(
            "--ties",
            help="Order of a user's events with equal timestamps: hash (seeded, leak-free) or "
            "file (the file's row order, which can leak; see docs/evaluation.md).",
        ),
    ] = Ties.hash,
    tie_seed: Annotated[int, typer.Option("--tie-seed", help="Seed of the tie hash.")] = 0,
    users: Annotated[
        int | None, typer.Option(help="Synthetic: records (users), in stream order.")
    ] = None,
    items: Annotated[int | None, typer.Option(help="Synthetic: items in the catalogue.")] = None,
    categories: Annotated[int | None, typer.Option(help="Synthetic: item categories.")] = None,
    length: Annotated[
        int | None, typer.Option(help="Synthetic: events per user (sets min and max length).")
    ] = None,
    min_length: Annotated[
        int | None, typer.Option(help="Synthetic: shortest user history (log-uniform lengths).")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Synthetic: longest user history (log-uniform lengths).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Synthetic: generator seed.")] = None,
    dedup: Annotated[
        bool,
        typer.Option(
            "--dedup",
            help="--path only: drop repeated events (same user, item and timestamp), keeping "
            "the first row of each; without it they are kept and reported.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print meta.json to stdout.")] = False,
) -> None:
    """Prepare a built-in dataset or an interaction file under the data dir.

    Indexes users (0..U-1) and items (1..I), sorts each user's events by time (ties by a seeded
    hash), and writes events.parquet, users.parquet, items.parquet and meta.json. Up-to-date
    datasets are reused.
    """
    if (dataset is None) == (path is None):
        _fail("give either a built-in dataset name or --path FILE (not both)")
    if ties is Ties.file:
        typer.echo(
            "warning: --ties file keeps the file's row order for events with equal timestamps; "
            "where that order follows the items (as in MovieLens), it leaks into evaluation "
            "(docs/evaluation.md)",
            err=True,
        )
    colmap = {
        "user_col": user_col,
        "item_col": item_col,
        "time_col": time_col,
        "rating_col": rating_col,
        "sep": sep,
        "action_cols": action_cols,
    }
    if sep == "\\t":  # a shell passes the two characters; nobody means a backslash separator
        sep = "\t"
    synthetic = _synthetic_overrides(users, items, categories, length, min_length, max_length, seed)
    if synthetic and dataset not in GENERATORS:
        _fail(
            f"--users, --items, --categories, --length, --min-length, --max-length and --seed "
            f"apply to the synthetic datasets ({', '.join(GENERATORS)})"
        )
    if dedup and path is None:
        _fail("--dedup applies to --path FILE, not to built-in or synthetic datasets")
    try:
        # Duplicate events are reported as one warning line, not as a Python warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DuplicateEventsWarning)
            if dataset in GENERATORS:
                if (
                    fmt is not None
                    or item_file is not None
                    or any(v is not None for v in colmap.values())
                ):
                    _fail(
                        f"--format, --item-file and column options apply to --path, not {dataset}"
                    )
                directory = prepare_dataset(
                    dataset,
                    name=name,
                    data_dir=data_dir,
                    force=force,
                    ties=ties.value,
                    tie_seed=tie_seed,
                    synthetic=synthetic,
                )
            elif dataset is not None:
                if dataset not in BUILTINS:
                    _fail(
                        f"unknown built-in dataset {dataset!r} "
                        f"(built-ins: {', '.join([*BUILTINS, *GENERATORS])}); "
                        "for a file use --path FILE --format FORMAT"
                    )
                if (
                    fmt is not None
                    or item_file is not None
                    or any(v is not None for v in colmap.values())
                ):
                    _fail(
                        "--format, --item-file and column options apply to --path, not to built-in "
                        "datasets"
                    )
                directory = prepare_dataset(
                    dataset,
                    name=name,
                    data_dir=data_dir,
                    force=force,
                    ties=ties.value,
                    tie_seed=tie_seed,
                )
            else:
                directory = prepare_dataset(
                    str(path),
                    fmt=fmt.value if fmt else None,
                    name=name,
                    data_dir=data_dir,
                    force=force,
                    ties=ties.value,
                    tie_seed=tie_seed,
                    item_file=item_file,
                    user_col=user_col,
                    item_col=item_col,
                    time_col=time_col,
                    rating_col=rating_col,
                    sep=sep,
                    action_cols=action_cols,
                    dedup=dedup,
                )
        for warning in caught:
            if issubclass(warning.category, DuplicateEventsWarning):
                typer.echo(f"warning: {warning.message}", err=True)
            else:
                warnings.showwarning(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
        meta = read_meta(directory)
    except DataError as err:
        _fail(str(err))
    except FileNotFoundError as err:
        _fail(f"no such file: {err.filename}")
    except OSError as err:
        _fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
    if as_json:
        typer.echo(json.dumps({"path": str(directory), **meta.to_json()}, indent=2))
    else:
        Console().print(_summary_table([(directory, meta)], title="Prepared"))


@app.command("list")
def list_datasets(
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Where datasets live.")
    ] = None,
) -> None:
    """List the prepared datasets in the data dir."""
    home = data_home(data_dir)
    found: list[tuple[Path, DatasetMeta]] = []
    for directory in sorted(home.iterdir()) if home.is_dir() else []:
        if directory.is_dir() and not directory.name.startswith("."):
            try:
                found.append((directory, read_meta(directory)))
            except DataError:
                continue  # download caches and foreign folders live here too
    if not found:
        typer.echo(f"no prepared datasets in {home}")
        return
    Console().print(_summary_table(found, title=str(home)))


def _summary_table(rows: list[tuple[Path, DatasetMeta]], title: str) -> Table:
    table = Table(title=title)
    for column in ("dataset", "users", "items", "catalog", "events", "ties", "source", "path"):
        numeric = column in ("users", "items", "catalog", "events")
        table.add_column(column, justify="right" if numeric else "left")
    for directory, meta in rows:
        source = meta.source.location + (f" ({meta.source.kind})" if meta.source.builtin else "")
        table.add_row(
            meta.name,
            f"{meta.counts.users:,}",
            f"{meta.counts.items:,}",
            f"{meta.counts.catalog_items or meta.counts.items:,}",
            f"{meta.counts.events:,}",
            meta.ties if meta.ties == "file" else f"hash (seed {meta.tie_seed})",
            source,
            str(directory),
        )
    return table


def _synthetic_overrides(
    users: int | None,
    items: int | None,
    categories: int | None,
    length: int | None,
    min_length: int | None,
    max_length: int | None,
    seed: int | None,
) -> dict[str, object]:
    if length is not None and (min_length is not None or max_length is not None):
        _fail("give --length or --min-length/--max-length, not both")
    if length is not None:
        min_length = max_length = length
    given = {
        "users": users,
        "items": items,
        "categories": categories,
        "min_length": min_length,
        "max_length": max_length,
        "seed": seed,
    }
    return {key: value for key, value in given.items() if value is not None}


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)
