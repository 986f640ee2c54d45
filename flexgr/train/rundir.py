"""The run directory: a stable layout that tools and people can read (see docs/run-dir.md)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexgr.atomic import atomic_write_text
from flexgr.train.config import Config, ConfigError, dump_config, load_config


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists already, has no checkpoint, ...)."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def model(self) -> Path:
        """Path stem of the exported model: model.safetensors + model.json."""
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    def create(self, cfg: Config) -> None:
        """Start a new run here; refuse a directory that already holds one. A directory with only
        a config.toml (a run that failed before training started) is reused."""
        if self.last_checkpoint.exists() or self.metrics.exists():
            raise RunDirError(
                f"{self.root} already holds a run; continue it with --resume or pick another --run-dir"
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.write_config(cfg)

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.config, dump_config(cfg))

    def read_config(self) -> Config:
        if not self.config.is_file():
            raise RunDirError(f"{self.root} is not a run directory (no config.toml)")
        try:
            return load_config(self.config)
        except ConfigError as err:
            raise RunDirError(str(err)) from None

    def require_checkpoint(self) -> Path:
        if not self.last_checkpoint.is_file():
            raise RunDirError(
                f"{self.root} has no checkpoint to resume from ({self.last_checkpoint})"
            )
        return self.last_checkpoint

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        with open(self.metrics, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a crash loses at most a partial line.

    ``size`` is recorded in checkpoints; a resumed run truncates the file back to it, dropping the
    records that the checkpoint's state does not include (they are written again).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Open for the whole run (closed in close()): a with-block per record would reopen it.
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115

    @property
    def size(self) -> int:
        self._handle.flush()
        return self._handle.tell()

    def truncate(self, size: int) -> None:
        self._handle.flush()
        self._handle.truncate(size)
        self._handle.seek(size)

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(_finite(record)) + "\n")
        self._handle.flush()

    def sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf; a diverged loss is written as null rather than invalid JSON.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
