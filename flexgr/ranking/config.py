"""The ``[ranking]`` section: what a ranking run predicts, and how events become examples.

The model's architecture stays in ``[model]`` (``arch = "hstu-ranking"`` and its settings);
this section holds the task side, shared by every ranking model so that they are compared on the
same examples and labels (docs/ranking.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RequestRule = Literal["fixed", "timestamp", "session"]
ExampleLayout = Literal["request", "impression"]

# Metric name prefixes, and whether a lower value is better.
LOWER_IS_BETTER = {"ne": True, "logloss": True, "auc": False, "gauc": False, "mse": True}
BCE_METRICS = ("ne", "logloss", "auc", "gauc")
MSE_METRICS = ("mse",)


@dataclass
class RankingConfig:
    # Tasks, one head output each (flexgr.ranking.tasks): "like" (BCE, rating >=
    # like_threshold), "dislike" (BCE, rating <= dislike_threshold), "rating" (MSE on the
    # rating), "action:NAME" (BCE, action column NAME > 0), "action:NAME:BIT" (BCE, that bit of
    # NAME), "value:NAME" (MSE on NAME).
    tasks: list[str] = field(default_factory=lambda: ["like", "dislike", "rating"])
    task_weights: list[float] = field(default_factory=list)  # [] = 1.0 for every task
    like_threshold: float = 3.5  # the reference's ML-1M label: rating >= 3.5
    dislike_threshold: float = 2.0
    # What a history event's action token encodes: "rating" (MovieLens' action, in half-star
    # steps) and/or action columns of the dataset by name.
    action_inputs: list[str] = field(default_factory=lambda: ["rating"])
    # How a user's events group into requests: "fixed" (runs of request_size events, counted back
    # from the last event), "timestamp" (events sharing a timestamp), "session" (a new request
    # after a gap above session_gap seconds). The last two also cut a run at request_size.
    requests: RequestRule = "fixed"
    request_size: int = 8
    session_gap: int = 1800
    min_history: int = 1  # requests with fewer earlier events are not examples
    # "request" (ROO): one sequence per request, its impressions the targets of one pass;
    # "impression": one sequence per impression, the history repeated (the baseline layout).
    examples: ExampleLayout = "request"
    # Requests trained per user and epoch: 0 = all of them; n > 0 = n drawn at random each
    # epoch (seeded by train.seed and the epoch), the HSTU paper's per-user sampling that keeps
    # an epoch's cost proportional to the users instead of their events.
    sample_per_user: int = 0
    # Validation metric that selects the epoch: PREFIX:TASK with PREFIX ne, logloss, auc or gauc
    # for BCE tasks and mse for MSE tasks (lower is better for ne, logloss and mse).
    metric: str = "ne:like"


def validate_ranking(cfg: RankingConfig) -> None:
    """Value checks of the section; ValueError naming the key."""
    from flexgr.ranking.tasks import parse_task

    if not cfg.tasks:
        raise ValueError("ranking.tasks must name at least one task")
    kinds = {}
    for text in cfg.tasks:
        task = parse_task(text)
        kinds[task.name] = task.kind
    if len(kinds) != len(cfg.tasks):
        raise ValueError("ranking.tasks names a task twice")
    if cfg.task_weights and len(cfg.task_weights) != len(cfg.tasks):
        raise ValueError(
            f"ranking.task_weights has {len(cfg.task_weights)} weights for "
            f"{len(cfg.tasks)} tasks (or leave it empty)"
        )
    if any(w < 0 for w in cfg.task_weights):
        raise ValueError("ranking.task_weights must be >= 0")
    if not cfg.action_inputs:
        raise ValueError("ranking.action_inputs must name at least one input (e.g. rating)")
    if len(set(cfg.action_inputs)) != len(cfg.action_inputs):
        raise ValueError("ranking.action_inputs names an input twice")
    if cfg.request_size < 1:
        raise ValueError("ranking.request_size must be >= 1")
    if cfg.session_gap < 0:
        raise ValueError("ranking.session_gap must be >= 0")
    if cfg.sample_per_user < 0:
        raise ValueError("ranking.sample_per_user must be >= 0 (0: every request)")
    if cfg.min_history < 1:
        raise ValueError("ranking.min_history must be >= 1 (a model needs a history)")
    prefix, _, task = cfg.metric.partition(":")
    if prefix not in LOWER_IS_BETTER or task not in kinds:
        raise ValueError(
            f"ranking.metric {cfg.metric!r} must be PREFIX:TASK with TASK one of "
            f"{', '.join(kinds)} and PREFIX one of {', '.join(LOWER_IS_BETTER)}"
        )
    allowed = BCE_METRICS if kinds[task] == "bce" else MSE_METRICS
    if prefix not in allowed:
        raise ValueError(
            f"ranking.metric {cfg.metric!r}: task {task!r} is {kinds[task].upper()}, "
            f"use {' or '.join(allowed)}"
        )
