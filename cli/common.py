"""Helpers shared by the commands: one-line errors, and loading what a run directory holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit non-zero (no traceback)."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code=code)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    """K down the rows, HR and NDCG across; MRR and the user count below."""
    table = Table(title=title)
    for column in ("K", "HR@K", "NDCG@K"):
        table.add_column(column, justify="right")
    ks = sorted({int(name.split("@")[1]) for name in metrics if name.startswith("hr@")})
    for k in ks:
        table.add_row(str(k), f"{metrics[f'hr@{k}']:.4f}", f"{metrics[f'ndcg@{k}']:.4f}")
    if "mrr" in metrics:
        table.add_row("MRR", f"{metrics['mrr']:.4f}", "", end_section=True)
    if "users" in metrics:
        table.add_row("users", f"{int(metrics['users']):,}", "")
    return table


def require_run_dir(path: Path) -> Path:
    if not path.is_dir():
        fail(f"no run directory at {path}")
    return path


def stdout() -> Console:
    return Console()
