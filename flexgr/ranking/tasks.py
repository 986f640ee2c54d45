"""Ranking tasks: what each head output predicts, its label per event, and its loss.

A task is written as a short string in ``ranking.tasks`` (see :class:`RankingConfig`); the
exported model keeps the strings (its ``tasks`` field), so a loaded model knows which outputs
are probabilities (BCE) and which are values (MSE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flexgr.data import DataError, InteractionData

TaskKind = Literal["bce", "mse"]
RATING_CODES = 11  # rating action codes: 0 unknown, 1..10 half stars (0.5 .. 5.0)


@dataclass(frozen=True)
class Task:
    name: str  # as written in ranking.tasks; metric keys are PREFIX:name
    kind: TaskKind
    source: str  # "rating" or an action column
    rule: Literal["at_least", "at_most", "positive", "bit", "value"]
    threshold: float = 0.0
    bit: int = 0


def parse_task(text: str, like: float = 3.5, dislike: float = 2.0) -> Task:
    """The task a ``ranking.tasks`` entry names; ValueError for one that is not a task."""
    if text == "like":
        return Task(text, "bce", "rating", "at_least", like)
    if text == "dislike":
        return Task(text, "bce", "rating", "at_most", dislike)
    if text == "rating":
        return Task(text, "mse", "rating", "value")
    parts = text.split(":")
    if parts[0] == "action" and len(parts) == 2 and parts[1]:
        return Task(text, "bce", parts[1], "positive")
    if parts[0] == "action" and len(parts) == 3 and parts[1] and parts[2].isdigit():
        if int(parts[2]) > 61:
            raise ValueError(f"ranking.tasks {text!r}: bit {parts[2]} is above 61")
        return Task(text, "bce", parts[1], "bit", bit=int(parts[2]))
    if parts[0] == "value" and len(parts) == 2 and parts[1]:
        return Task(text, "mse", parts[1], "value")
    raise ValueError(
        f"ranking.tasks {text!r} is not a task (like, dislike, rating, action:NAME, "
        "action:NAME:BIT, value:NAME)"
    )


def parse_tasks(texts: list[str], like: float = 3.5, dislike: float = 2.0) -> list[Task]:
    return [parse_task(t, like, dislike) for t in texts]


def event_labels(tasks: list[Task], data: InteractionData) -> tuple[np.ndarray, np.ndarray]:
    """(labels float32 [E, K], known bool [E, K]): every event's label for every task. A rating
    task has no label where the rating is unknown (NaN); DataError for a missing column."""
    E = data.num_events
    labels = np.zeros((E, len(tasks)), dtype=np.float32)
    known = np.ones((E, len(tasks)), dtype=bool)
    for k, task in enumerate(tasks):
        if task.source == "rating":
            values = data.ratings.astype(np.float64)
            known[:, k] = ~np.isnan(values)
            values = np.nan_to_num(values)
        else:
            values = _column(data, task.source, f"task {task.name!r}").astype(np.float64)
        if task.rule == "at_least":
            labels[:, k] = values >= task.threshold
        elif task.rule == "at_most":
            labels[:, k] = values <= task.threshold
        elif task.rule == "positive":
            labels[:, k] = values > 0
        elif task.rule == "bit":
            column = _column(data, task.source, f"task {task.name!r}")
            labels[:, k] = (column >> task.bit) & 1
        else:
            labels[:, k] = values
    if "rating" in {t.source for t in tasks} and not known.any() and E:
        raise DataError(f"dataset {data.name!r} has no ratings; rating tasks need them")
    return labels, known


def action_codes(names: list[str], data: InteractionData) -> np.ndarray:
    """int64 [E, A]: each event's action inputs. ``rating`` becomes half-star steps 1..10 (0 for
    an unknown rating); action columns are used as they are."""
    E = data.num_events
    codes = np.zeros((E, len(names)), dtype=np.int64)
    for a, name in enumerate(names):
        codes[:, a] = (
            rating_codes(data.ratings)
            if name == "rating"
            else _column(data, name, "ranking.action_inputs")
        )
    return codes


def rating_codes(ratings: np.ndarray) -> np.ndarray:
    """Half-star steps: 0.5 -> 1, ..., 5.0 -> 10; unknown (NaN) -> 0; clipped to 0..10."""
    values = np.nan_to_num(np.asarray(ratings, dtype=np.float64), nan=0.0)
    return np.clip(np.rint(values * 2), 0, RATING_CODES - 1).astype(np.int64)


def action_vocab(names: list[str], codes: np.ndarray, encoding: str) -> list[int]:
    """Size of each action input's table: values 0..max (categorical), or the bit count."""
    sizes = []
    for a, name in enumerate(names):
        top = int(codes[:, a].max()) if len(codes) else 0
        if name == "rating":
            sizes.append(RATING_CODES)
        elif encoding == "bits":
            sizes.append(max(1, top.bit_length()))
        else:
            sizes.append(top + 1)
    return sizes


def _column(data: InteractionData, name: str, what: str) -> np.ndarray:
    if name not in data.actions:
        have = ", ".join(data.actions) or "none"
        raise DataError(
            f"{what}: dataset {data.name!r} has no action column {name!r} (has: {have}; "
            "prepare with --action-cols)"
        )
    return data.actions[name]


def task_losses(
    logits_CK: Tensor, labels_CK: Tensor, known_CK: Tensor, kinds: list[TaskKind]
) -> Tensor:
    """[K] summed loss per task over the impressions that have its label: BCE with logits, or
    squared error of the output taken as the value."""
    out = []
    for k, kind in enumerate(kinds):
        mask = known_CK[:, k].to(logits_CK.dtype)
        if kind == "bce":
            each = F.binary_cross_entropy_with_logits(
                logits_CK[:, k], labels_CK[:, k], reduction="none"
            )
        else:
            each = (logits_CK[:, k] - labels_CK[:, k]) ** 2
        out.append((each * mask).sum())
    return torch.stack(out) if out else logits_CK.new_zeros(0)


def predictions(logits_CK: Tensor, kinds: list[TaskKind]) -> Tensor:
    """Per-task predictions: probabilities (sigmoid) for BCE tasks, values for MSE tasks."""
    columns = [
        torch.sigmoid(logits_CK[:, k]) if kind == "bce" else logits_CK[:, k]
        for k, kind in enumerate(kinds)
    ]
    return torch.stack(columns, dim=1) if columns else logits_CK
