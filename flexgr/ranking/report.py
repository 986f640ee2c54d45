"""Ranking metrics as a table for the command line: one row per task."""

from __future__ import annotations

import math

from rich.table import Table


def ranking_table(metrics: dict[str, float], title: str) -> Table:
    """Task down the rows; NE, AUC, GAUC, log loss and the positive rate (BCE tasks) or MSE."""
    table = Table(title=title)
    for column in ("task", "NE", "AUC", "GAUC", "log loss", "positives", "MSE"):
        table.add_column(column, justify="left" if column == "task" else "right")
    tasks = list(dict.fromkeys(k.split(":", 1)[1] for k in metrics if ":" in k))

    def cell(key: str) -> str:
        value = metrics.get(key)
        return "" if value is None or math.isnan(value) else f"{value:.4f}"

    for task in tasks:
        table.add_row(
            task,
            cell(f"ne:{task}"),
            cell(f"auc:{task}"),
            cell(f"gauc:{task}"),
            cell(f"logloss:{task}"),
            cell(f"rate:{task}"),
            cell(f"mse:{task}"),
        )
    if "impressions" in metrics:
        table.add_row("impressions", f"{int(metrics['impressions']):,}", "", "", "", "", "")
    return table
