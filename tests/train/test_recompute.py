"""Recomputed layers: the same outputs and gradients, far fewer saved activations."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable

import pytest
import torch

import flexgr.train.recompute as recompute_module
from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, SASRec, SASRecConfig, encode
from flexgr.model.registry import spec_of
from flexgr.train import ConfigError, apply_overrides
from flexgr.train.config import Config, validate
from flexgr.train.recompute import apply_recompute
from tests.conftest import make_offsets
from tests.train.memory import Retained, count_retained, kernel_like


def run(model, batch, weights) -> tuple[Retained, torch.Tensor, dict[str, torch.Tensor]]:
    with count_retained(model) as retained:
        out = encode(model, batch)
    (out * weights).sum().backward()
    return retained, out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def total(retained: Retained) -> int:
    return sum(retained.layers.values()) + retained.other


def jagged_batch(lengths: list[int], seed: int = 0) -> JaggedBatch:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    ids = torch.randint(1, 51, (n,), generator=g)
    # Uneven gaps, so the time buckets of the relative bias differ between tokens.
    ts = torch.randint(1, 5000, (n,), generator=g).sort().values
    return JaggedBatch(ids, make_offsets(lengths), ts, ts[make_offsets(lengths)[1:] - 1] + 9)


def hstu(**overrides) -> HSTU:
    options = {"num_items": 50, "d_model": 24, "num_layers": 3, "num_heads": 2, "dqk": 8}
    options |= {"dv": 12, "max_seq_len": 60, "dropout": 0.3, "input_dropout": 0.1}
    return HSTU(HSTUConfig(**(options | {"backend": "reference"} | overrides)))


def test_recomputed_layers_match_and_save_less() -> None:
    batch = jagged_batch([40, 3, 57])
    weights = torch.randn(100, 32, generator=torch.Generator().manual_seed(1))
    for make in (
        lambda: hstu(d_model=32, num_heads=2, dqk=16, dv=16, dropout=0.2, input_dropout=0.2),
        lambda: SASRec(
            SASRecConfig(
                num_items=50, d_model=32, num_layers=3, num_heads=2, ffn_dim=64, max_seq_len=60
            )
        ),
    ):
        torch.manual_seed(0)
        plain = make()
        torch.manual_seed(0)
        recomputed = apply_recompute(make(), "layers")
        assert recomputed.state_dict().keys() == plain.state_dict().keys()
        torch.manual_seed(1)  # dropout is on: the recomputation must replay the same masks
        saved_a, out_a, grads_a = run(plain, batch, weights)
        torch.manual_seed(1)
        saved_b, out_b, grads_b = run(recomputed, batch, weights)
        torch.testing.assert_close(out_b, out_a)
        for name, grad in grads_a.items():
            torch.testing.assert_close(grads_b[name], grad, msg=name)
        assert total(saved_b) < total(saved_a) / 2, (saved_a, saved_b)


def check_selective_matches_none(lengths: list[int], **overrides) -> None:
    """recompute = "selective" against "none" in fp64: forward and every parameter gradient,
    dropout on (the gated norm's and the input's) and the same seed."""
    batch = jagged_batch(lengths, seed=len(lengths))
    n = sum(lengths)
    weights = torch.randn(n, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for mode in ("none", "selective"):
        torch.manual_seed(0)
        model = apply_recompute(hstu(**overrides).double(), mode)
        torch.manual_seed(3)
        results.append(run(model, batch, weights))
    (_, out_a, grads_a), (_, out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    ("lengths", "overrides"),
    [
        ([37, 5, 50], {"rel_bias": True}),
        ([23, 1, 41, 9], {"rel_bias": False}),
        ([30, 19], {"rel_bias": True, "concat_ua": True, "norm_affine": True}),
        # stochastic depth drawn once, outside the recomputed gate: the same kept sequences
        ([37, 5, 50, 8, 21], {"rel_bias": True, "drop_path": 0.5}),
    ],
)
def test_selective_matches_none_in_fp64(lengths: list[int], overrides: dict) -> None:
    check_selective_matches_none(lengths, **overrides)


def _no_rng_restore(fn: Callable, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(fn, *args, **(kwargs | {"preserve_rng_state": False}))


def _recompute_from_rolled_inputs(fn: Callable, *args, **kwargs):
    """Recompute from the inputs' rows rolled by one (a shift or scale would not do: LayerNorm
    ignores both, and the residual's backward ignores x)."""
    calls = {"n": 0}

    @functools.wraps(fn)
    def rolled(*inputs):
        calls["n"] += 1  # the second call is the backward's recomputation
        if calls["n"] > 1:
            inputs = tuple(t.roll(1, 0) for t in inputs)
        return fn(*inputs)

    return torch.utils.checkpoint.checkpoint(rolled, *args, **kwargs)


@pytest.mark.parametrize("planted", [_no_rng_restore, _recompute_from_rolled_inputs])
def test_a_planted_recomputation_bug_fails_the_comparison(monkeypatch, planted) -> None:
    monkeypatch.setattr(recompute_module, "checkpoint", planted)
    with pytest.raises(AssertionError):
        check_selective_matches_none([37, 5, 50], rel_bias=True)


def layer_bytes(mode: str, *, kernel: bool) -> Retained:
    """What each layer keeps at a small shape; ``kernel``: the attention saves q, k, v only,
    as the Triton kernel does (tests/train/memory.py ``kernel_like``)."""
    batch = jagged_batch([37, 5, 50])
    torch.manual_seed(0)
    model = apply_recompute(hstu(rel_bias=not kernel), mode)
    inputs = spec_of(model).prepare(model, batch)
    if kernel:
        inputs = dataclasses.replace(inputs, attention=kernel_like(inputs.attention))
    with count_retained(model) as retained:
        out = model(batch.item_ids, inputs)
    out.sum().backward()  # the counted graph runs (a count of a graph that cannot would lie)
    return retained


@pytest.mark.parametrize("kernel", [False, True])
def test_selective_saves_less_than_none_and_more_than_layers(kernel: bool) -> None:
    none, selective, layers = (layer_bytes(m, kernel=kernel) for m in MODES_ORDER)
    assert none.per_layer() > selective.per_layer() > layers.per_layer() > 0
    # Both recompute modes keep the attention's own saved tensors or none of them.
    assert selective.attention_per_layer() <= none.attention_per_layer()
    assert layers.attention_per_layer() == 0


MODES_ORDER = ("none", "selective", "layers")


@pytest.mark.parametrize("kernel", [False, True])
def test_selective_keeps_the_input_u_attn_and_what_the_attention_saves(kernel: bool) -> None:
    """No view pins the whole U, V, Q, K projection: outside its attention a layer keeps x
    [T, d], u and attn [T, H dv]; a q, k, v-saving attention adds one [T, H (dv + 2 dqk)]."""
    cfg = hstu().cfg
    T, d, H = 92, cfg.d_model, cfg.num_heads
    retained = layer_bytes("selective", kernel=kernel)
    outside = 4 * T * (d + 2 * H * cfg.dv)
    for layer, nbytes in retained.layers.items():
        attention = retained.attention.get(layer, 0)
        assert nbytes - attention == outside, (layer, nbytes, attention)
        if kernel:
            assert attention == 4 * T * H * (cfg.dv + 2 * cfg.dqk)


def test_selective_refuses_a_model_without_hstu_layers() -> None:
    model = SASRec(SASRecConfig(num_items=50, d_model=16, num_layers=1, num_heads=1, ffn_dim=8))
    with pytest.raises(ValueError, match="train.recompute = 'selective'"):
        apply_recompute(model, "selective")
    with pytest.raises(ValueError, match="train.recompute must be one of"):
        apply_recompute(model, "everything")  # type: ignore[arg-type]


def test_recompute_config_values() -> None:
    assert apply_overrides(Config(), ["train.recompute=selective"]).train.recompute == "selective"
    with pytest.raises(ConfigError, match="train.recompute"):
        apply_overrides(Config(), ["train.recompute=some"])
    with pytest.raises(ConfigError, match="train.recompute = 'selective' needs HSTU layers"):
        apply_overrides(Config(), ["model.arch=sasrec", "train.recompute=selective"])
    validate(apply_overrides(Config(), ["model.arch=sasrec", "train.recompute=layers"]))


def test_train_recompute_from_the_config(tiny_home, tmp_path) -> None:
    from flexgr.train import fit
    from tests.conftest import tiny_config

    def losses(*overrides: str) -> list[float]:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cfg = tiny_config(tiny_home, "train.max_steps=3", "train.log_every=1", *overrides)
        fit(cfg, run, show_progress=False)
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in records if r["kind"] == "train"]

    # The same seed and dropout draws: recomputation changes memory, not the numbers.
    plain = losses()
    assert len(plain) == 3
    assert losses("train.recompute=layers") == plain
    assert losses("train.recompute=selective") == plain
