"""``flexgr train`` and ``flexgr presets``."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from flexgr.cli.common import fail, metrics_table, os_error_in, os_error_text, print_json, stdout
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

if TYPE_CHECKING:
    from flexgr.cli.tensorboard import TensorBoardLogger

DEFAULT_PRESET = "ml-1m-hstu"
# How long a rank other than 0 waits before exiting on an error every rank shares (_fail_once).
SILENT_RANK_GRACE_S = 10.0


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
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard",
            help="Also write the metrics as TensorBoard scalars to RUN_DIR/tensorboard "
            "(needs pip install 'flexgr[tensorboard]').",
        ),
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

    from flexgr.cli.keep import StepTracker, interrupted, kept

    from flexgr.export import ExportError
    from flexgr.train.loop import Callback, TrainError, fit
    from flexgr.train.parallel import FailedOnMain

    # With --json, stdout carries the JSON alone; progress and summaries go to stderr.
    console = Console(stderr=True) if as_json else stdout()
    tracker = StepTracker()
    callbacks: list[Callback] = [tracker]
    main = launch_rank() == 0
    board = None
    try:
        # Rank 0 holds the run directory's lock (the other ranks share rank 0's directory).
        lock = RunDir(run_dir).lock() if main else contextlib.nullcontext()
        with lock:
            board = _tensorboard(run_dir, resume) if tensorboard and main else None
            if board is not None:
                callbacks.append(board)
            result = fit(
                cfg,
                run_dir,
                resume=resume,
                console=console,
                show_progress=False if quiet else None,
                callbacks=callbacks,
            )
    except (ConfigError, RunDirError, DataError, ExportError, TrainError, FailedOnMain) as err:
        _fail_once(err)
    except KeyboardInterrupt:
        if not main:
            raise typer.Exit(130) from None
        fail(interrupted(run_dir, tracker), code=130)
    except (OSError, RuntimeError) as err:
        cause = os_error_in(err)
        if cause is None:
            raise
        _fail_once(RunDirError(f"{os_error_text(cause, run_dir)}; {kept(run_dir)}"))
    finally:
        if board is not None:
            board.close()
    if not main:
        return  # rank 0 reports the run
    if as_json:
        print_json({"run_dir": str(result.run_dir), "epoch": result.epoch, "test": result.test})
    elif cfg.is_ranking:
        from flexgr.ranking.report import ranking_table

        title = f"test, epoch {result.epoch} ({result.stop_reason})"
        console.print(ranking_table(result.test, title))
    else:
        console.print(
            metrics_table(result.test, f"test, epoch {result.epoch} ({result.stop_reason})")
        )


def _tensorboard(run_dir: Path, resume: bool) -> TensorBoardLogger | None:
    """The TensorBoard callback, or a warning and None when tensorboard is not installed."""
    from flexgr.cli.keep import checkpoint_state
    from flexgr.cli.tensorboard import INSTALL_HINT, TensorBoardLogger, tensorboard_available

    if not tensorboard_available():
        typer.echo(
            f"warning: --tensorboard needs the tensorboard package ({INSTALL_HINT}); "
            "training without it (metrics.jsonl has every record)",
            err=True,
        )
        return None
    run = RunDir(run_dir)
    purge = None
    if resume and run.last_checkpoint.is_file():
        state = checkpoint_state(run.last_checkpoint)
        purge = int(state["step"]) + 1 if state is not None else None
    return TensorBoardLogger(run.root / "tensorboard", purge_step=purge)


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
        # torchrun stops every rank as soon as one exits, so a rank that left first could
        # silence rank 0's report: the silent ranks wait for rank 0 to say it and exit.
        time.sleep(SILENT_RANK_GRACE_S)
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
        return apply_overrides(_read_config_file(config_file), overrides), config_file.stem
    name = preset or DEFAULT_PRESET
    return apply_overrides(load_preset(name), overrides), name


def _read_config_file(path: Path) -> Config:
    """load_config, with a file that is not UTF-8 or cannot be read as a one-line ConfigError."""
    try:
        return load_config(path)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save the config as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None


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
