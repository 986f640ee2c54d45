"""Load-balanced Stochastic Length: the per-rank rule, the targets, 2 gloo processes, training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flexgr.train import ConfigError, fit
from flexgr.train.load_balance import (
    BalancedLengthSampler,
    attention_load,
    balance_lengths,
    load_ratio,
)
from flexgr.train.rundir import RunDir
from tests.conftest import tiny_config
from tests.distributed.launch import run_world
from tests.long import lb_workers


def lengths(n: int, seed: int = 0) -> np.ndarray:
    """synthetic-long's shape: log-uniform 256..16384, cut to the 4096 window."""
    rng = np.random.default_rng(seed)
    return np.minimum(np.exp(rng.uniform(np.log(256), np.log(16384), n)).astype(np.int64), 4096)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_lengths_reach_the_target_from_below(seed) -> None:
    rng = np.random.default_rng(seed)
    full = rng.integers(1, 3000, size=int(rng.integers(1, 20)))
    sl = np.where(rng.random(full.size) < 0.5, np.minimum(full, 776), full)
    beta = float(rng.uniform(0, 3000))
    for target in (0.3, 1.0, 1.7):
        target *= attention_load(sl, beta)
        out = balance_lengths(sl, full, target, beta)
        assert np.all((1 <= out) & (out <= full))
        load = attention_load(out, beta)
        if attention_load(np.ones_like(full), beta) <= target:
            assert load <= target
        # a larger cap would overshoot: within one cap step of the target
        if load < target and not np.array_equal(out, full):
            cap = out.max() if attention_load(sl, beta) > target else None
            if cap is not None:
                assert attention_load(np.minimum(sl, cap + 1), beta) > target
        # cuts keep SL's shorter lengths short; restorations never shorten them
        if attention_load(sl, beta) <= target:
            assert np.all(out >= np.minimum(sl, full))
        else:
            assert np.all(out <= sl)


def test_warmup_is_plain_sl_and_the_target_is_re_estimated_every_block() -> None:
    full = lengths(400)
    s = BalancedLengthSampler(alpha=1.6, max_len=4096, selection="recent", seed=1,
                              full_lengths=full, batch_size=32, dp_size=4, warmup=3, every=5,
                              beta=100.0)
    for step in range(3):
        assert s.target_at(step) is None
        assert s.rank_loads(step) == s.plain_loads(step)
    assert s.target_at(3) == s.target_at(7) != s.target_at(8)
    expected = np.mean([x for step in range(5, 8) for x in s.plain_loads(step)])
    assert s.target_at(8) == pytest.approx(expected)
    # across an epoch boundary (13 batches per epoch)
    assert s.parts(13)[0] == 2 and s.target_at(14) is not None


def test_two_gloo_processes_balance_their_loads(tmp_path) -> None:
    full = lengths(600, seed=3)
    out = tmp_path / "loads.json"
    steps = 40
    run_world(lb_workers.rank_loads_body, 2, full, steps, out)
    ranks = json.loads(out.read_text())
    plain = [load_ratio([r["plain"][s] for r in ranks]) for s in range(5, steps)]
    balanced = [load_ratio([r["balanced"][s] for r in ranks]) for s in range(5, steps)]
    print(f"max/mean rank load: plain SL {np.mean(plain):.3f}, LBSL {np.mean(balanced):.3f}")
    assert np.mean(balanced) < 1.05 < np.mean(plain)
    # the total work stays near plain SL's (the targets are windowed means of its loads)
    total_plain = sum(sum(r["plain"][5:]) for r in ranks)
    total_balanced = sum(sum(r["balanced"][5:]) for r in ranks)
    assert 0.85 < total_balanced / total_plain < 1.15


def test_training_logs_the_rank_load_and_refuses_bad_settings(tiny_home, tmp_path) -> None:
    with pytest.raises(ConfigError, match="sl_balance needs"):
        tiny_config(tiny_home, "train.sl_balance=true")
    cfg = tiny_config(tiny_home, "train.sl_alpha=1.5", "train.sl_balance=true",
                      "train.sl_balance_warmup=2", "train.sl_balance_every=2",
                      "train.max_steps=4", "train.log_every=1")
    result = fit(cfg, tmp_path / "run", show_progress=False)
    assert result.steps == 4
    # one process: nothing to balance against, so no rank-load field (2-process runs log it)
    train = [r for r in RunDir(tmp_path / "run").read_metrics() if r["kind"] == "train"]
    assert train and all("rank_load_max_mean" not in r for r in train)


def test_two_process_training_logs_max_over_mean_rank_load(tiny_home, tmp_path) -> None:
    from flexgr.data import load_prepared, make_split
    from flexgr.model import HSTUConfig
    from flexgr.train.batches import TrainSequences
    from flexgr.train.load_balance import balanced_sampler
    from flexgr.train.setup import model_config
    from tests.distributed import train_workers

    cfg = tiny_config(tiny_home, "train.max_steps=4", "train.log_every=2", "train.sl_alpha=1.5",
                      "train.sl_balance=true", "train.sl_balance_warmup=1",
                      "train.sl_balance_every=1", "eval.ks=[10]", "eval.metric=hr@10")
    run_world(train_workers.fit_body, 2, cfg, tmp_path / "run")
    train = [r for r in RunDir(tmp_path / "run").read_metrics() if r["kind"] == "train"]
    logged = [r["rank_load_max_mean"] for r in train]
    # what plain SL would have given on the same batches, from the meter alone
    data = load_prepared("tiny", data_dir=tiny_home)
    sequences = TrainSequences(data, make_split(data, "loo-val"), 12)
    model_cfg = HSTUConfig(**model_config(cfg, data.num_items))  # beta from the model's FLOPs
    meter = balanced_sampler(cfg.train, 12, sequences.lengths, 2, model_cfg)
    plain = [load_ratio(meter.rank_loads(s, balanced=False)) for s in range(4)]
    balanced = [load_ratio(meter.rank_loads(s)) for s in range(4)]
    assert logged == pytest.approx([np.mean(balanced[:2]), np.mean(balanced[2:])])
    assert np.mean(balanced[1:]) < np.mean(plain[1:])
