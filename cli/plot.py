"""``flexgr plot``: PNG training and evaluation curves from a run's metrics.jsonl."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any

import typer
from flexgr.cli.common import fail

INSTALL_HINT = "pip install 'flexgr[plot]'"


def plot_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The run to plot.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Where the PNGs go (default RUN_DIR/plots).")
    ] = None,
) -> None:
    """Write PNG curves of a run: training loss, validation and test metrics.

    loss.png has the training loss by step; val.png and test.png have HR@K, NDCG@K and MRR by
    epoch. Works while the run is still training.
    """
    from flexgr.train.rundir import RunDir, RunDirError

    try:
        import matplotlib
    except ImportError:
        fail(f"flexgr plot needs matplotlib: {INSTALL_HINT}")
    matplotlib.use("Agg")  # files only, never a window
    run = RunDir(run_dir)
    if not run_dir.is_dir():
        fail(f"no run directory at {run_dir}")
    try:
        records = run.read_metrics()
    except RunDirError as err:
        fail(str(err))
    if not records:
        fail(f"{run.metrics} has no records yet; nothing to plot")
    target = out if out is not None else run_dir / "plots"
    try:
        written = write_plots(records, target)
    except OSError as err:
        fail(f"cannot write {err.filename or target}: {err.strerror or err}")
    if not written:
        fail(f"{run.metrics} has no training or evaluation records yet; nothing to plot")
    typer.echo("wrote " + ", ".join(str(p) for p in written))


def write_plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """The PNGs for ``records`` (metrics.jsonl rows), each written atomically; their paths."""
    written = []
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    if train:
        written.append(_save(_loss_figure(train), out / "loss.png"))
    for split in ("val", "test"):
        evals = [
            r
            for r in records
            if r.get("kind") == "eval" and r.get("split") == split and not r.get("final")
        ]
        # The final record is test at the selected epoch; mark that epoch on every split.
        final = next((r for r in records if r.get("final")), None)
        if evals:
            written.append(_save(_metric_figure(split, evals, final), out / f"{split}.png"))
    return written


def _loss_figure(train: list[dict[str, Any]]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    marker = "." if len(train) < 40 else None
    axes.plot([r["step"] for r in train], [r["loss"] for r in train], marker=marker)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss (sampled softmax)")
    axes.set_title("training loss")
    axes.grid(alpha=0.3)
    return figure


def _metric_figure(split: str, evals: list[dict[str, Any]], final: dict[str, Any] | None):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = [n for n in evals[0] if n.startswith(("hr@", "ndcg@")) or n == "mrr"]
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    epochs = [r["epoch"] for r in evals]
    for name in names:
        axes.plot(epochs, [r.get(name) for r in evals], marker=".", label=name)
    if final is not None:
        label = f"selected epoch {final['epoch']}"
        axes.axvline(final["epoch"], color="grey", linestyle=":", label=label)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("metric")
    axes.set_title(f"{split} metrics (full ranking)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    return figure


def _save(figure: Any, path: Path) -> Path:
    from flexgr.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getvalue()))
    return path
