"""Attention truncation: later layers on the contextual prefix, recent tail and targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, encode, get_spec
from flexgr.train import ConfigError, fit
from tests.conftest import make_offsets, tiny_config


def model(**over) -> HSTU:
    torch.manual_seed(0)
    cfg = HSTUConfig(
        num_items=60,
        d_model=16,
        num_layers=3,
        num_heads=2,
        dqk=8,
        dv=8,
        max_seq_len=30,
        backend="reference",
        dropout=0.0,
        input_dropout=0.0,
        **over,
    )
    return HSTU(cfg).double().eval()


def batch(lengths, num_targets=None) -> JaggedBatch:
    g = torch.Generator().manual_seed(3)
    offsets = make_offsets(lengths)
    T = sum(lengths)
    ts = torch.cumsum(torch.randint(0, 900, (T,), generator=g), 0)
    nt = torch.tensor(num_targets) if num_targets is not None else None
    return JaggedBatch(
        torch.randint(1, 61, (T,), generator=g), offsets, ts, ts[offsets[1:] - 1] + 5, nt
    )


def test_kept_rows_are_prefix_tail_and_targets() -> None:
    m = model(truncate_after=1, truncate_len=4, contextual_len=2)
    b = batch([12, 3, 9], num_targets=[2, 0, 1])
    inputs = get_spec("hstu").prepare(m, b)
    keep = inputs.output_rows.tolist()
    # seq 0 (rows 0-11): prefix 0, 1; 4 history before its 2 targets: 6-9; targets 10, 11
    # seq 1 (12-14): all three; seq 2 (15-23): prefix 15, 16; tail 19-22; target 23
    assert keep == [0, 1, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19, 20, 21, 22, 23]
    assert inputs.output_offsets.tolist() == [0, 8, 11, 18]
    out = encode(m, b)
    assert out.shape == (18, 16)


def test_a_tail_longer_than_every_sequence_changes_nothing() -> None:
    b = batch([12, 3, 9])
    plain = encode(model(), b)
    # keep everything; the truncated layers' N is capped at the full one
    long_tail = encode(model(truncate_after=1, truncate_len=100), b)
    torch.testing.assert_close(long_tail, plain, rtol=1e-12, atol=1e-12)


def test_packed_equals_each_sequence_alone_and_dropped_rows_act_only_early() -> None:
    m = model(truncate_after=2, truncate_len=3)
    b = batch([10, 7, 12])
    packed = encode(m, b)
    ends = get_spec("hstu").prepare(m, b).output_offsets.tolist()
    for s, (lo, hi) in enumerate(zip(b.offsets[:-1].tolist(), b.offsets[1:].tolist())):
        alone = JaggedBatch(
            b.item_ids[lo:hi],
            torch.tensor([0, hi - lo]),
            b.timestamps[lo:hi],
            b.query_time[s : s + 1],
        )
        torch.testing.assert_close(packed[ends[s] : ends[s + 1]], encode(m, alone))
    # The first (dropped) item of sequence 0 still reaches the outputs through layers 0-1.
    changed = JaggedBatch(b.item_ids.clone(), b.offsets, b.timestamps, b.query_time)
    changed.item_ids[0] = (b.item_ids[0] % 60) + 1
    assert not torch.allclose(encode(m, changed)[:3], packed[:3])


def test_truncation_trains_from_the_config_and_bad_settings_are_named(
    tiny_home: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(
        tiny_home,
        "model.num_layers=2",
        "model.truncate_after=1",
        "model.truncate_len=4",
        "train.max_steps=3",
        "train.log_every=1",
    )
    fit(cfg, run, show_progress=False)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("final")][0]
    assert 0 <= final["hr@10"] <= 1 and final["users"] > 0
    assert all(r["loss"] == r["loss"] for r in records if r["kind"] == "train")  # no NaN
    with pytest.raises(ConfigError, match="needs both"):
        tiny_config(tiny_home, "model.truncate_after=1")
    with pytest.raises(ConfigError, match="below model.num_layers"):
        tiny_config(tiny_home, "model.truncate_after=1", "model.truncate_len=3")
