"""FP8 weight-only quantisation: each output within e4m3's rounding bound of the fp32 linear,
the modules chosen by size, and a quantised GESR model served by the cached path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

if not hasattr(torch, "float8_e4m3fn"):  # pragma: no cover - older torch builds
    pytest.skip("this torch has no float8_e4m3fn", allow_module_level=True)

from flexgr.gesr.falcon import candidate_logits, encode_ranking_history
from flexgr.gesr.quantise import FP8Linear, quantise_linears
from tests.gesr.test_falcon import _candidates, _history, _model, _whole


def _linear(d_in: int, d_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out)
    with torch.no_grad():  # rows 10**7 apart, beyond e4m3's range: each needs its own scale
        linear.weight.mul_(torch.logspace(-6, 1, d_out).unsqueeze(1))
        linear.weight[0] = 0.0  # an all-zero row
    return linear


@pytest.mark.parametrize("shape", [(64, 48), (7, 130)])
def test_each_output_is_within_the_e4m3_rounding_bound(shape: tuple[int, int]) -> None:
    linear = _linear(*shape, seed=shape[0])
    x = torch.randn(32, shape[0], generator=torch.Generator().manual_seed(1)) * 3
    want = linear(x)
    quantised = FP8Linear(linear)
    assert quantised.weight_fp8.dtype == torch.float8_e4m3fn
    assert quantised.scale.shape == (shape[1],)
    got = quantised(x)
    # Per weight: 1/16 of its magnitude (3 mantissa bits), or half a subnormal step of its own
    # row's scale (the row's largest magnitude / 448), which a per-tensor scale would exceed.
    w = linear.weight.detach()
    step = w.abs().amax(1, keepdim=True) / 448 * 2.0**-10
    per_weight = torch.maximum(w.abs() / 16, step)
    bound = x.abs() @ per_weight.T
    # plus fp32 rounding of the two matmuls
    slack = 1e-5 * (x.abs() @ w.abs().T) + 1e-6
    assert ((got - want).abs() <= bound + slack).all()
    assert (got - want).abs().max() > 0  # the weights were rounded
    assert torch.equal(got[:, 0], want[:, 0])  # the zero row: its bias exactly


def test_quantise_linears_replaces_the_large_ones_and_names_them() -> None:
    model = nn.Sequential(
        nn.Linear(300, 400), nn.SiLU(), nn.Sequential(nn.Linear(400, 100), nn.Linear(100, 256))
    )
    x = torch.randn(5, 300)
    want = model(x)
    assert quantise_linears(model, min_features=256) == ["0"]
    assert isinstance(model[0], FP8Linear) and isinstance(model[2][0], nn.Linear)
    assert quantise_linears(model, min_features=100) == ["2.0", "2.1"]
    assert all(isinstance(m, FP8Linear) for m in (model[0], model[2][0], model[2][1]))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    got = model(x)
    assert (got - want).abs().max() <= 0.1 * want.abs().max()
    with pytest.raises(ValueError, match="min_features"):
        quantise_linears(model, min_features=0)


def test_a_quantised_gesr_model_scores_through_the_cached_path() -> None:
    model = _model(experts=["match", "cross", "self"])
    history = _history(7, 3)
    candidates = _candidates(history[0], 4)
    cache = encode_ranking_history(model, *history)
    before = candidate_logits(model, cache, candidates)  # builds the fp32 item side
    names = quantise_linears(model, min_features=8)
    assert "towers.item_tower.0" in names and "towers.user_tower.0" in names
    assert "cross.q" in names and "encoder.layers.0.out" not in names  # 4 inputs: too small
    want = _whole(model, *history, candidates)
    cache = encode_ranking_history(model, *history)
    # the item side is rebuilt from the fp8 weights: equal to the quantised whole model
    got = candidate_logits(model, cache, candidates)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < (got - before).abs().max() < 0.1
