"""Every long-sequence preset trains end to end on a tiny synthetic-long, CPU, a few steps."""

from __future__ import annotations

import math

import pytest

from flexgr.train import apply_overrides, fit, load_preset, preset_names

LONG = sorted(n for n in preset_names() if n.startswith("synthetic-long-"))
STREAMING = ["synthetic-streaming-hstu", "synthetic-streaming-hstu-softmax",
             "synthetic-streaming-sasrec"]
TINY = ["data.max_seq_len=48", "model.d_model=16", "model.num_layers=2", "model.num_heads=2",
        "train.batch_size=8", "train.max_steps=2", "train.num_negatives=8", "train.log_every=1",
        "eval.batch_size=32", "eval.ks=[10]"]


@pytest.fixture(scope="module")
def long_home(tmp_path_factory):
    from flexgr.data import prepare

    home = tmp_path_factory.mktemp("long-home")
    small = {"users": 16, "min_length": 30, "max_length": 120, "items": 300, "categories": 10}
    prepare("synthetic-long", synthetic=small, data_dir=home, progress=False)
    prepare("synthetic-streaming", synthetic={"users": 16, "items": 300, "categories": 10},
            data_dir=home, progress=False)
    return home


def test_the_presets_exist() -> None:
    assert LONG == [f"synthetic-long-{n}" for n in
                    ("causal", "fp8", "recompute", "sl16", "sl18", "sla", "truncate")]
    assert set(STREAMING) <= set(preset_names())


@pytest.mark.parametrize("name", LONG + STREAMING)
def test_each_preset_trains_a_few_steps(name, long_home, tmp_path) -> None:
    cfg = load_preset(name)
    over = [f"data.data_dir={long_home}", *TINY]
    if cfg.model.arch == "hstu":
        over += ["model.dqk=8", "model.dv=8"]
        options = cfg.model_options()
        if options["mask"] == "semi_local":
            over += ["model.sla_local=8", "model.sla_global=4"]
        if options["truncate_after"]:
            over += ["model.truncate_after=1", "model.truncate_len=12"]
    else:
        over += ["model.ffn_dim=16"]
    result = fit(apply_overrides(cfg, over), tmp_path / "run", show_progress=False)
    assert result.steps == 2 and math.isfinite(result.test["hr@10"])
