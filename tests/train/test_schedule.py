from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from flexgr.train import fit
from flexgr.train.config import ConfigError, TrainConfig, validate
from flexgr.train.schedule import lr_at
from tests.conftest import tiny_config


def test_warmup_is_linear_then_constant() -> None:
    t = TrainConfig(lr=1e-3, warmup_steps=4)
    assert [lr_at(t, s, 100) for s in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    )
    assert lr_at(t, 10_000, 100) == 1e-3


def test_cosine_runs_from_lr_to_the_floor_after_the_warmup() -> None:
    t = TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    total = 110
    assert lr_at(t, 9, total) == pytest.approx(1e-3)  # the warm-up's last step
    assert lr_at(t, 10, total) == pytest.approx(1e-3)  # the cosine's first
    assert lr_at(t, 60, total) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way
    assert lr_at(t, total, total) == pytest.approx(1e-4)
    assert lr_at(t, total + 50, total) == pytest.approx(1e-4)  # held after the end
    rates = [lr_at(t, s, total) for s in range(10, total + 1)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    # the definition itself, at an arbitrary step
    s = 37
    expected = 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
    assert lr_at(t, s, total) == pytest.approx(expected)


def test_min_lr_ratio_out_of_range_names_the_key() -> None:
    cfg = tiny_config(Path("."), "train.lr_schedule=cosine")
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, min_lr_ratio=1.5))
    with pytest.raises(ConfigError, match="train.min_lr_ratio"):
        validate(bad)


def test_a_cosine_run_logs_the_scheduled_rate_at_every_record(
    tiny_home: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        tiny_home, "train.max_epochs=2", "train.lr_schedule=cosine", "train.warmup_steps=2"
    )
    fit(cfg, tmp_path / "run", console=Console(quiet=True))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    total = 12  # 6 steps per epoch (test_fit), 2 epochs
    assert len(train) == 6
    for r in train:  # each record's lr is that of its interval's last step
        assert r["lr"] == pytest.approx(lr_at(cfg.train, r["step"] - 1, total))
    assert train[0]["lr"] == pytest.approx(cfg.train.lr)
    assert train[-1]["lr"] < 0.05 * cfg.train.lr  # the last step is near the floor (0)
