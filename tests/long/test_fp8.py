"""flexgr.ops.fp8 against its definition: row-wise e4m3 quantisation, the linear, gradients."""

from __future__ import annotations

import pytest
import torch

from flexgr.batch import JaggedBatch
from flexgr.model import HSTU, HSTUConfig, encode
from flexgr.ops.fp8 import (
    E4M3_MAX,
    dequantize,
    fp8_linear,
    fp8_matmul,
    quantize_rowwise,
    uses_scaled_mm,
)
from tests.conftest import make_offsets


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3fn value, from its bit patterns (sign, 4 exponent bits, 3 mantissa)."""
    values = []
    for exp in range(16):
        for man in range(8):
            if exp == 15 and man == 7:
                continue  # NaN
            v = (man / 8) * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
            values += [v, -v]
    return torch.tensor(sorted(set(values)), dtype=torch.float64)


def test_quantisation_is_round_to_nearest_e4m3_of_the_row_scaled_values() -> None:
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-3, 3, 37, dtype=torch.float64).view(-1, 1)
    x = torch.randn(37, 19, generator=g, dtype=torch.float64) * magnitudes
    x[5] = 0.0  # an all-zero row stays zero
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (37, 1)
    amax = x.abs().amax(dim=1, keepdim=True)
    rows = torch.arange(37) != 5
    torch.testing.assert_close(scale[rows], (amax / E4M3_MAX).float()[rows])
    grid = e4m3_grid()
    scaled = x / scale.double()
    nearest = grid[(scaled.unsqueeze(-1) - grid).abs().argmin(-1)]
    # ties may go either way in the argmin; e4m3 rounds ties to even: compare distances
    got = q.double()
    assert torch.all((got - scaled).abs() <= (nearest - scaled).abs() + 1e-12)
    assert got.abs().max() <= E4M3_MAX and torch.all(got[5] == 0)
    # each row's largest magnitude maps to 448 exactly
    assert torch.all(got.abs().amax(dim=1)[rows] == E4M3_MAX)
    # relative error of dequantised values: within half an e4m3 ulp (2^-4) of normal values
    deq = dequantize(q, scale).double()
    normal = scaled.abs() >= 2.0**-6
    assert torch.all(((deq - x).abs() / x.abs())[normal] <= 2.0**-4 + 1e-9)


def test_the_linear_equals_its_definition_and_fp32_within_e4m3_tolerance() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 48, generator=g)
    w = torch.randn(48, 80, generator=g) * 0.1
    b = torch.randn(80, generator=g)
    y = fp8_linear(x, w, b)
    xq, sx = quantize_rowwise(x)
    wq, sw = quantize_rowwise(w.t())
    definition = (xq.double() * sx.double()) @ (wq.double() * sw.double()).t() + b.double()
    torch.testing.assert_close(y.double(), definition, atol=1e-5, rtol=1e-5)
    # against fp32: each operand carries at most 2^-4 relative error, random signs average out
    exact = x @ w + b
    err = (y - exact).norm() / (exact - b).norm()
    assert 0 < err < 0.05
    assert not uses_scaled_mm(x, w)  # CPU: the emulation


def test_gradients_are_straight_through() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(33, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(33, 24, generator=g, dtype=torch.float64)
    (fp8_linear(x, w, b) * dy).sum().backward()
    torch.testing.assert_close(x.grad, dy @ w.detach().t())
    torch.testing.assert_close(w.grad, x.detach().t() @ dy)
    torch.testing.assert_close(b.grad, dy.sum(0))


def test_under_autocast_the_result_and_gradients_are_bf16_compute() -> None:
    x = torch.randn(20, 32, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    # the emulated product is fp32 inside, whatever the autocast
    torch.testing.assert_close(y, fp8_matmul(x, w, torch.float32).bfloat16())
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_an_fp8_model_trains_and_stays_close_to_bf16() -> None:
    torch.manual_seed(0)
    kw = {"num_items": 50, "d_model": 32, "num_layers": 2, "num_heads": 2, "dqk": 16, "dv": 16,
              "max_seq_len": 40, "backend": "reference", "dropout": 0.0, "input_dropout": 0.0}
    plain = HSTU(HSTUConfig(**kw))
    fp8 = HSTU(HSTUConfig(**kw, fp8=True))
    fp8.load_state_dict(plain.state_dict())  # the same parameters and state dict
    offsets = make_offsets([17, 5, 30])
    batch = JaggedBatch(torch.randint(1, 51, (52,)), offsets, torch.arange(52) * 60, None)
    a, b = encode(plain, batch), encode(fp8, batch)
    assert 0 < (a - b).norm() / a.norm() < 0.05
    b.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in fp8.parameters() if p.requires_grad and p is not fp8.item_emb.weight)


@pytest.mark.gpu
def test_scaled_mm_equals_the_emulation_on_the_gpu() -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("row-wise scaled FP8 GEMMs need compute capability 9.0+")
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16) * 0.05
    assert uses_scaled_mm(x, w)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = fp8_linear(x, w).float()
    xq, sx = quantize_rowwise(x)
    wq, sw = quantize_rowwise(w.t())
    emulated = (dequantize(xq, sx) @ dequantize(wq, sw).t())
    torch.testing.assert_close(fast, emulated, atol=2e-2, rtol=1e-2)  # bf16 output rounding
