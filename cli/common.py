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


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, or one it was raised from or while handling (torch's
    checkpoint writer turns a full disk into ``RuntimeError: ... unexpected pos``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def os_error_text(err: OSError, fallback_path: Path | str) -> str:
    """``PATH: No space left on device`` (the path the error names, else ``fallback_path``)."""
    import errno as errno_codes

    reason = err.strerror or str(err) or type(err).__name__
    if err.errno is not None and err.errno in errno_codes.errorcode:
        reason += f" ({errno_codes.errorcode[err.errno]})"
    if err.filename is None:
        return f"{reason} while writing into {fallback_path}"
    return f"{_target_of(Path(err.filename))}: {reason}"


def _target_of(path: Path) -> Path:
    """The file a temp file of flexgr.atomic stands for (``.last.pt.tmp-123`` -> ``last.pt``)."""
    import re

    match = re.fullmatch(r"\.(.+)\.tmp-\d+", path.name)
    return path.with_name(match.group(1)) if match else path
