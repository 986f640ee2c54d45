"""The learning-rate schedule: a pure function of the optimizer step, so a resumed run sets the
same rate at every step as an uninterrupted one."""

from __future__ import annotations

import math

from flexgr.train.config import TrainConfig


def lr_at(t: TrainConfig, step: int, total_steps: int) -> float:
    """The rate of optimizer step ``step`` (0-based) of a run of ``total_steps`` steps.

    A linear warm-up over ``warmup_steps``, then ``constant``, or ``cosine``: a half cosine from
    ``lr`` down to ``lr * min_lr_ratio`` at ``total_steps`` (and held there after, for the steps
    of a cut-short last epoch or a longer resumed run)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max(total_steps - t.warmup_steps, 1)
    progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
