"""Training: configs, jagged batches, the sampled-softmax loss, the loop, checkpoints.

from flexgr.train import fit, load_preset
cfg = load_preset("ml-100k-hstu")
result = fit(cfg, "runs/ml100k")
print(result.test["ndcg@10"])
"""

from flexgr.train.batches import EpochBatches, TrainBatch, TrainSequences, train_loader
from flexgr.train.config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    load_preset,
    preset_names,
    preset_text,
)
from flexgr.train.loop import Callback, NonFiniteLoss, RunResult, TrainError, TrainState, fit
from flexgr.train.loss import sample_negatives, sampled_softmax_loss
from flexgr.train.rundir import RunDir, RunDirError

__all__ = [
    "Callback",
    "Config",
    "ConfigError",
    "DataConfig",
    "EpochBatches",
    "EvalConfig",
    "ModelConfig",
    "NonFiniteLoss",
    "ParallelConfig",
    "RunDir",
    "RunDirError",
    "RunResult",
    "TrainBatch",
    "TrainConfig",
    "TrainError",
    "TrainSequences",
    "TrainState",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "fit",
    "load_config",
    "load_preset",
    "preset_names",
    "preset_text",
    "sample_negatives",
    "sampled_softmax_loss",
    "train_loader",
]
