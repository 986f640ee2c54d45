"""Masks from the config: the built-in rule's options and named rules reach the attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.masks import and_masks, causal, local_window, register_mask, semi_local
from flexgr.model import HSTU, HSTUConfig, encode
from flexgr.train import ConfigError, apply_overrides, fit
from tests.conftest import make_offsets, tiny_config

OPTIONS = [
    {},
    {"max_attn_len": 3},
    {"max_attn_len": 3, "full_attn_tail": 2},
    {"contextual_len": 2},
    {"mask": "semi_local", "sla_local": 2, "sla_global": 3},
    {"mask": "semi_local", "sla_local": 2, "sla_global": 3, "sla_mode": "tail_rows"},
]


def model_with(backend: str, **options) -> HSTU:
    torch.manual_seed(0)
    cfg = HSTUConfig(
        num_items=40,
        d_model=16,
        num_layers=2,
        num_heads=2,
        dqk=8,
        dv=8,
        max_seq_len=30,
        dropout=0.0,
        input_dropout=0.0,
        backend=backend,
        **options,
    )
    return HSTU(cfg).double().eval()


def packed_batch() -> JaggedBatch:
    g = torch.Generator().manual_seed(1)
    offsets = make_offsets([9, 1, 14, 6])
    ids = torch.randint(1, 41, (30,), generator=g)
    ts = torch.cumsum(torch.randint(0, 5000, (30,), generator=g), 0)
    return JaggedBatch(ids, offsets, ts, ts[offsets[1:] - 1] + 3)


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(map(str, o.values())) or "causal"
)
def test_each_option_set_changes_the_output_and_flex_agrees(options: dict) -> None:
    batch = packed_batch()
    with torch.no_grad():
        causal = encode(model_with("reference"), batch)
        ref = encode(model_with("reference", **options), batch)
        flex = encode(model_with("flex", **options), batch)  # eager flex forward on CPU
    torch.testing.assert_close(flex, ref, rtol=1e-7, atol=1e-7)
    if options:
        assert not torch.allclose(ref, causal), "the option did not reach the attention"


def test_the_semi_local_rule_is_the_mask_mod_of_flexgr_masks() -> None:
    """The configured SLA equals the reference attention under semi_local's dense mask."""
    torch.manual_seed(0)
    offsets = make_offsets([12, 5])
    q, k, v = (torch.randn(17, 1, 4, dtype=torch.float64) for _ in range(3))
    from flexgr.masks import build_custom_mask
    from flexgr.ops import hstu_attention

    mod = semi_local(offsets, 2, 3)
    mask = build_custom_mask(mod, offsets)
    got = hstu_attention(
        q, k, v, offsets, max_seq_len=20, alpha=1.0, backend="reference", mask=mask
    )
    dense = torch.tensor(
        [[bool(mod(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(17)] for i in range(17)]
    )
    weights = torch.nn.functional.silu(torch.einsum("ihd,jhd->hij", q, k)) * dense / 20
    want = torch.einsum("hij,jhd->ihd", weights, v)
    torch.testing.assert_close(got, want)


def test_a_registered_rule_is_selectable_and_unknown_names_are_refused() -> None:
    @register_mask("test_window2")
    def window2(layout, cfg):
        return and_masks(causal(), local_window(layout, 2))

    batch = packed_batch()
    with torch.no_grad():
        named = encode(model_with("reference", mask="test_window2"), batch)
        builtin = encode(model_with("reference", max_attn_len=2), batch)
    # local_window(2) and the built-in window of 2 are one rule: the same output.
    torch.testing.assert_close(named, builtin)
    with pytest.raises(ConfigError, match="unknown mask 'nope'.*semi_local"):
        apply_overrides(tiny_config(Path("/")), ["model.mask=nope"])
    with pytest.raises(ConfigError, match="full_attn_tail needs a local window"):
        apply_overrides(tiny_config(Path("/")), ["model.full_attn_tail=2"])


def test_max_attn_len_from_the_command_line_changes_training(
    tiny_home: Path, tmp_path: Path
) -> None:
    def losses(*overrides: str) -> list[float]:
        cfg = tiny_config(tiny_home, "train.max_steps=3", "train.log_every=1", *overrides)
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        fit(cfg, run, show_progress=False)
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in records if r["kind"] == "train"]

    causal = losses()
    assert losses() == causal  # the same run twice: identical
    assert losses("model.max_attn_len=2") != causal
    assert losses("model.mask=semi_local", "model.sla_local=1", "model.sla_global=1") != causal
