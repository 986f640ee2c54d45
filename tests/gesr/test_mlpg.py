"""MLPG against its formula written out branch by branch and candidate by candidate."""

from __future__ import annotations

import pytest
import torch

from flexgr.gesr.mlpg import MLPG, MLPGConfig


def formula(m: MLPG, z, primary):
    """final_t = primary_t + sum_k lambda_k w_{k,t} . (sigmoid(W_g^k z) * silu(W_h^k z))."""
    C, T = primary.shape
    out = primary.clone()
    for c in range(C):
        for k in range(m.cfg.num_logits):
            g = 1 / (1 + torch.exp(-(z[c] @ m.gate_weight[k] + m.gate_bias[k])))
            pre = z[c] @ m.value_weight[k] + m.value_bias[k]
            h = pre / (1 + torch.exp(-pre))
            for t in range(T):
                out[c, t] = out[c, t] + m.lam[k] * torch.dot(m.logit_weight[k, :, t], g * h)
    return out


@pytest.mark.parametrize("learn_lambda", [True, False])
def test_matches_the_formula_forward_and_backward(learn_lambda):
    torch.manual_seed(0)
    cfg = MLPGConfig(
        d_in=5, num_logits=3, hidden=4, num_tasks=2, lambda_init=0.7, learn_lambda=learn_lambda
    )
    m = MLPG(cfg).double()
    with torch.no_grad():  # non-trivial biases and lambdas so every term is exercised
        for p in (m.gate_bias, m.value_bias, m.lam):
            p.copy_(torch.randn_like(p))
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    primary = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    got, want = m(z, primary), formula(m, z, primary)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = [p for p in m.parameters()]
    g_got = torch.autograd.grad(got.sum(), [z, primary, *params])
    g_want = torch.autograd.grad(want.sum(), [z, primary, *params])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (m.lam.requires_grad) == learn_lambda


def test_zero_lambda_returns_the_primary_logit():
    m = MLPG(MLPGConfig(d_in=3, num_logits=2, hidden=4, lambda_init=0.0, learn_lambda=False))
    z, primary = torch.randn(4, 3), torch.randn(4, 1)
    torch.testing.assert_close(m(z, primary), primary)
    assert m.secondary(z).shape == (4, 2, 1)


def test_bad_shapes_and_config():
    m = MLPG(MLPGConfig(d_in=3))
    with pytest.raises(ValueError, match="mlpg: z must be"):
        m(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="num_logits"):
        MLPGConfig(d_in=3, num_logits=0)
