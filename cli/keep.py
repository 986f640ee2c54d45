"""What a failed or interrupted ``flexgr train`` leaves behind, said in one clause."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from flexgr.train.loop import Callback, TrainState
from flexgr.train.rundir import RunDir


def checkpoint_state(path: Path) -> dict[str, Any] | None:
    """The ``state`` of a checkpoint (memory-mapped, so cheap for any size), None if unreadable."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = saved["state"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError):
        return None
    return state if isinstance(state, dict) else None


def where(state: dict[str, Any]) -> str:
    """``after epoch 3, step 144`` or ``epoch 4, step 150``."""
    step = state.get("step", "?")
    if state.get("batch_in_epoch", 0) == 0:
        return f"after epoch {int(state.get('epoch', 1)) - 1}, step {step}"
    return f"epoch {state.get('epoch', '?')}, step {step}"


def kept(run_dir: Path) -> str:
    """``kept: the last good checkpoint ... ; continue with: ...`` (or that nothing is lost)."""
    run = RunDir(run_dir)
    path = run.last_checkpoint
    if not path.is_file():
        return "no checkpoint was written yet, so no training is lost"
    state = checkpoint_state(path)
    at = f" ({where(state)})" if state is not None else ""
    return (
        f"kept: the last good checkpoint {path}{at} and metrics.jsonl up to it; once fixed, "
        f"continue with: flexgr train --run-dir {run_dir} --resume"
    )


class StepTracker(Callback):
    """Knows the run's current step (the trainer's live state, passed to the hooks)."""

    def __init__(self) -> None:
        self.state: TrainState | None = None
        self.logged_step = 0

    def on_log(self, record: dict[str, Any]) -> None:
        self.logged_step = max(self.logged_step, int(record.get("step") or 0))

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.state = state

    def on_checkpoint(self, state: TrainState) -> None:
        self.state = state

    @property
    def step(self) -> int:
        return self.state.step if self.state is not None else self.logged_step


def interrupted(run_dir: Path, tracker: StepTracker) -> str:
    """How much an interrupt loses: the steps since the last checkpoint."""
    resume = f"continue with: flexgr train --run-dir {run_dir} --resume"
    path = RunDir(run_dir).last_checkpoint
    state = checkpoint_state(path) if path.is_file() else None
    if state is None:
        return f"interrupted before the first checkpoint; nothing to resume, start again ({path})"
    lost = max(0, tracker.step - int(state.get("step", 0)))
    since = f"{lost:,} step{'s' if lost != 1 else ''} since are lost" if lost else "nothing is lost"
    return (
        f"interrupted at step {tracker.step:,}; the last checkpoint ({where(state)}) is kept and "
        f"{since}; {resume}"
    )
