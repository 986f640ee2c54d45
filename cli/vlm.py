"""``flexgr vlm``: build, inspect and verify versioned-example datasets (late materialization)."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from flexgr.cli.common import fail, print_json

from flexgr.data import DataError

app = typer.Typer(
    help="Versioned-example datasets: histories stored once, examples as versioned pointers "
    "(docs/late-materialization.md). Train from one with data.source=versioned.",
    no_args_is_help=True,
    add_completion=False,
)


class Protocol(str, Enum):
    loo_val = "loo-val"
    gr_compatible = "gr-compatible"


SYNTHETIC_HELP = "synthetic-multitenant only: "


@app.command()
def prepare(
    source: Annotated[
        str,
        typer.Argument(
            help="synthetic-multitenant (the seeded multi-tenant log), or a prepared or "
            "built-in flexgr dataset (name or directory, e.g. ml-100k)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory to write (default <data dir>/versioned/SOURCE-PROTOCOL, where "
            "data.dataset=SOURCE finds it).",
        ),
    ] = None,
    protocol: Annotated[
        Protocol, typer.Option("--protocol", help="The split whose training events it holds.")
    ] = Protocol.loo_val,
    compactions: Annotated[
        int,
        typer.Option(help="Dataset source: compactions at quantiles of the event times."),
    ] = 3,
    log_max_len: Annotated[
        int | None,
        typer.Option(
            help="Longest history an example records (default: the whole history for a "
            "dataset, 4096 for the synthetic log)."
        ),
    ] = None,
    buckets: Annotated[int, typer.Option(help="Tier partitions (hash of the user).")] = 16,
    users: Annotated[int | None, typer.Option(help=SYNTHETIC_HELP + "users.")] = None,
    days: Annotated[int | None, typer.Option(help=SYNTHETIC_HELP + "days of requests.")] = None,
    requests_per_day: Annotated[
        int | None, typer.Option(help=SYNTHETIC_HELP + "requests per user and day (K).")
    ] = None,
    items: Annotated[int | None, typer.Option(help=SYNTHETIC_HELP + "item count.")] = None,
    seed: Annotated[int | None, typer.Option(help=SYNTHETIC_HELP + "seed.")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Where datasets live (default $FLEXGR_HOME or ~/.cache)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild an existing directory.")] = False,
) -> None:
    """Write a versioned-example dataset: the history tier, one versioned example per request,
    built from the training events of the split only (evaluation reads the table)."""
    from flexgr.data import BUILTINS, load_prepared, make_split
    from flexgr.data import prepare as prepare_table
    from flexgr.train.versioned_source import SYNTHETIC, default_store, prepared_dir
    from flexgr.vlm.dataset import prepare_from_table, prepare_synthetic

    home = str(data_dir) if data_dir is not None else None
    target = out or default_store(source, protocol.value, home)
    given = {"users": users, "days": days, "requests_per_day": requests_per_day}
    given.update(items=items, seed=seed)
    overrides = {key: value for key, value in given.items() if value is not None}
    if log_max_len is not None and log_max_len < 1:
        fail(f"--log-max-len must be >= 1, got {log_max_len}")
    if buckets < 1:
        fail(f"--buckets must be >= 1, got {buckets}")
    try:
        if source in SYNTHETIC:
            base, default_len = SYNTHETIC[source]
            spec = dataclasses.replace(base, **overrides)
            path = prepare_synthetic(
                target, spec, protocol=protocol.value, log_max_len=log_max_len or default_len,
                num_buckets=buckets, force=force,
            )  # fmt: skip
        else:
            if overrides:
                fail(f"--{next(iter(overrides)).replace('_', '-')} applies to the synthetic log")
            table = prepare_table(source, data_dir=home) if source in BUILTINS else None
            table = table or prepared_dir(source, home)
            data = load_prepared(table)
            path = prepare_from_table(
                target, data, make_split(data, protocol.value), table=str(table.resolve()),
                compactions=compactions, log_max_len=log_max_len or 0, num_buckets=buckets,
                force=force,
            )  # fmt: skip
    except (DataError, OSError) as err:
        fail(str(err))
    typer.echo(f"wrote {path}")
    _summary(path)


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="A versioned-example dataset directory.")],
) -> None:
    """Print what a versioned-example dataset holds (vlm.json and its sizes) as JSON."""
    from flexgr.vlm.dataset import read_meta

    try:
        meta = read_meta(store)
    except DataError as err:
        fail(str(err))
    record = dataclasses.asdict(meta)
    record["bytes"] = {part: _size(store / part) for part in ("tier", "examples", "table")}
    print_json(record)


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="A versioned-example dataset directory.")],
) -> None:
    """Rebuild every example's whole history and check it (length, bounds, checksum, no
    event at or after request_ts), and that the table still has the same training events."""
    from flexgr.data import load_prepared, make_split
    from flexgr.vlm import Loader, LoaderConfig, Reconstructor, Tenant, Tier, read_chunks
    from flexgr.vlm.dataset import EXAMPLES, TIER, read_meta, train_digest
    from flexgr.vlm.examples import example_files

    try:
        meta = read_meta(store)
        data = load_prepared(meta.table_path(store))
        if train_digest(data, make_split(data, meta.protocol))[1] != meta.train_digest:
            fail(f"{store}: its table has changed since it was built (prepare it again)")
        tier = Tier.open(store / TIER, cache_stripes=64)
        rebuild = Reconstructor(tier, Tenant("verify", meta.log_max_len, ("actions", "side")))
        files = example_files(store / EXAMPLES)
        loader = Loader(
            lambda: read_chunks(files, rebuild.example_columns(), tier.stats),
            rebuild,
            LoaderConfig(batch_size=256, shuffle_window=4096, affinity=True),
        )
        examples = events = 0
        for batch in loader:
            examples, events = examples + len(batch), events + batch.num_tokens
    except (DataError, OSError) as err:
        fail(str(err))
    if examples != meta.examples:
        fail(f"{store}: {examples} examples read, vlm.json says {meta.examples}")
    typer.echo(
        f"ok: {examples:,} examples, {events:,} history events rebuilt and verified "
        f"(lengths, bounds, checksums, no event at or after request_ts)"
    )


def _summary(path: Path) -> None:
    from flexgr.vlm.dataset import read_meta

    meta = read_meta(path)
    typer.echo(
        f"{meta.examples:,} examples over {meta.events:,} training events of {meta.users:,} "
        f"users ({meta.protocol}); tier {_size(path / 'tier'):,} bytes, examples "
        f"{_size(path / 'examples'):,} bytes; train with data.source=versioned "
        f"data.dataset={json.dumps(str(path))}"
    )


def _size(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
