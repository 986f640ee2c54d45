"""``flexgr train`` and ``flexgr presets``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from flexgr.cli.common import fail, metrics_table, print_json, stdout
from rich.console import Console

from flexgr.data import DataError
from flexgr.train.config import (
    Config,
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    load_preset,
    preset_names,
    preset_text,
)
from flexgr.train.rundir import RunDir, RunDirError

DEFAULT_PRESET = "ml-1m-hstu"


def train(
    config_file: Annotated[
        Path | None,
        typer.Argument(help="A TOML config file (see configs/ for examples). Omit for a preset."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset", "-p", help=f"A preset name (`flexgr presets`); default {DEFAULT_PRESET}."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override a setting: section.key=value (repeatable), e.g. train.lr=3e-4.",
        ),
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir", help="Run directory (default runs/<preset or file>-<YYYYmmdd-HHMMSS>)."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in --run-dir from its last checkpoint."),
    ] = False,
    deterministic: Annotated[
        bool,
        typer.Option(
            "--deterministic",
            help="Deterministic kernels (train.deterministic=true): reproducible, slower on GPU.",
        ),
    ] = False,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved config and exit.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar; epoch summaries only.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="At the end, print the test metrics as JSON.")
    ] = False,
) -> None:
    """Train a model; with no arguments, the ml-1m-hstu preset.

    Prepares the data if needed, trains with validation and early stopping, evaluates test at
    the selected epoch and exports the model into the run directory.
    """
    all_overrides = list(overrides or [])
    if deterministic:
        all_overrides.append("train.deterministic=true")
    try:
        cfg, name = _resolve_config(config_file, preset, all_overrides, run_dir, resume)
    except (ConfigError, RunDirError) as err:
        _fail_once(err)
    if print_config:
        typer.echo(dump_config(cfg), nl=False)
        return
    if run_dir is None:
        run_dir = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"

    from flexgr.export import ExportError
    from flexgr.train.loop import TrainError, fit
    from flexgr.train.parallel import FailedOnMain

    # With --json, stdout carries the JSON alone; progress and summaries go to stderr.
    console = Console(stderr=True) if as_json else stdout()
    try:
        result = fit(
            cfg, run_dir, resume=resume, console=console, show_progress=False if quiet else None
        )
    except (ConfigError, RunDirError, DataError, ExportError, TrainError, FailedOnMain) as err:
        _fail_once(err)
    except KeyboardInterrupt:
        if launch_rank() != 0:
            raise typer.Exit(130) from None
        fail(f"interrupted; continue with: flexgr train --run-dir {run_dir} --resume", code=130)
    if launch_rank() != 0:
        return  # rank 0 reports the run
    if as_json:
        print_json({"run_dir": str(result.run_dir), "epoch": result.epoch, "test": result.test})
    else:
        console.print(
            metrics_table(result.test, f"test, epoch {result.epoch} ({result.stop_reason})")
        )


def launch_rank() -> int:
    """This process's rank under torchrun; 0 for a plain run."""
    return int(os.environ.get("RANK", "0"))


def _fail_once(err: Exception) -> NoReturn:
    """Under torchrun a bad config or launch fails the same way on every rank (and a failure of
    rank 0's own work reaches the others as FailedOnMain): rank 0 alone says so. Other errors
    may be one rank's own, so every rank reports them, naming itself."""
    from flexgr.train.loop import TrainError
    from flexgr.train.parallel import FailedOnMain

    rank = launch_rank()
    if rank == 0:
        fail(str(err))
    if isinstance(err, (ConfigError, RunDirError, TrainError, FailedOnMain)):
        raise typer.Exit(code=1)
    fail(f"rank {rank}: {err}")


def _resolve_config(
    config_file: Path | None,
    preset: str | None,
    overrides: list[str],
    run_dir: Path | None,
    resume: bool,
) -> tuple[Config, str]:
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs --run-dir DIR")
        if config_file is not None or preset is not None:
            raise ConfigError(
                "--resume takes the config from the run directory; drop CONFIG/--preset"
            )
        cfg = RunDir(run_dir).read_config()
        return apply_overrides(cfg, overrides), run_dir.name
    if config_file is not None and preset is not None:
        raise ConfigError("give a config file or --preset, not both")
    if config_file is not None:
        return apply_overrides(load_config(config_file), overrides), config_file.stem
    name = preset or DEFAULT_PRESET
    return apply_overrides(load_preset(name), overrides), name


def presets(
    name: Annotated[str | None, typer.Argument(help="Print this preset's TOML.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the names as a JSON list.")
    ] = False,
) -> None:
    """List the built-in presets, or print one."""
    if name is not None:
        try:
            typer.echo(preset_text(name), nl=False)
        except ConfigError as err:
            fail(str(err))
        return
    names = preset_names()
    if as_json:
        print_json(names)
        return
    for preset_name in names:
        first = preset_text(preset_name).splitlines()[0].lstrip("# ").strip()
        typer.echo(f"{preset_name:<20} {first}")
