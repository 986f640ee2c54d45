"""eval.precision: evaluation under the training autocast or in fp32."""

from __future__ import annotations

import pytest
import torch

from flexgr.train.config import Config, ConfigError, apply_overrides
from flexgr.train.epochs import EpochTrainer


def trainer_with(precision: str, amp_dtype: torch.dtype | None) -> EpochTrainer:
    trainer = EpochTrainer()
    trainer.cfg = apply_overrides(Config(), [f"eval.precision={precision}"])
    trainer.amp_dtype = amp_dtype
    return trainer


def test_train_precision_evaluates_under_the_training_autocast() -> None:
    assert trainer_with("train", torch.bfloat16).eval_amp_dtype is torch.bfloat16
    assert trainer_with("train", None).eval_amp_dtype is None


def test_fp32_evaluates_without_autocast() -> None:
    assert trainer_with("fp32", torch.bfloat16).eval_amp_dtype is None


def test_an_unknown_precision_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="eval.precision"):
        apply_overrides(Config(), ["eval.precision=fp16"])
