"""``flexgr`` command line entry point."""

from __future__ import annotations

import typer
from flexgr.cli.data import app as data_app
from flexgr.cli.eval import eval_command
from flexgr.cli.export import export_command, recommend_command, score_command
from flexgr.cli.flops import flops_command
from flexgr.cli.plot import plot_command
from flexgr.cli.serve import serve_command
from flexgr.cli.train import presets, train
from flexgr.cli.vista import app as vista_app
from flexgr.cli.vlm import app as vlm_app

import flexgr

app = typer.Typer(
    name="flexgr",
    help="HSTU generative recommenders: prepare data, train, evaluate, export, recommend, serve.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(vlm_app, name="vlm")
app.add_typer(vista_app, name="vista")
app.command("train")(train)
app.command("eval")(eval_command)
app.command("export")(export_command)
app.command("recommend")(recommend_command)
app.command("score")(score_command)
app.command("serve")(serve_command)
app.command("plot")(plot_command)
app.command("presets")(presets)
app.command("flops")(flops_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flexgr {flexgr.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """flexgr command line."""


@app.command()
def env() -> None:
    """Print torch, device and the attention backend flexgr would pick."""
    import torch

    from flexgr.ops import default_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    typer.echo(f"flexgr {flexgr.__version__}, torch {torch.__version__}, device {device}")
    typer.echo(f"attention backend (auto): {default_backend(device)}")
