from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flexgr.train import loss as loss_module
from flexgr.train.loss import sample_negatives, sampled_softmax_loss


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_matches_a_hand_computed_softmax() -> None:
    table = unit([1, 0], [1, 0], [0, 1], [-1, 0])  # item 0 is padding
    user = unit([1, 0])
    targets = torch.tensor([1])
    negatives = torch.tensor([[2, 3]])
    tau = 0.5
    # cosines: positive 1, negatives 0 and -1
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0) + math.exp(-1 / tau)))
    got = sampled_softmax_loss(user, targets, negatives, table, tau)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_a_negative_equal_to_the_positive_is_masked_out() -> None:
    table = unit([1, 0], [1, 0], [0, 1], [-1, 0])
    user = unit([1, 0], [0, 1])
    targets = torch.tensor([1, 2])
    with_collision = sampled_softmax_loss(user, targets, torch.tensor([[1, 3], [2, 3]]), table, 0.5)
    per_row = [
        -math.log(math.exp(2) / (math.exp(2) + math.exp(-2))),  # row 0 keeps negative 3 only
        -math.log(math.exp(2) / (math.exp(2) + math.exp(0))),  # row 1 keeps negative 3 only
    ]
    assert with_collision.item() == pytest.approx(sum(per_row) / 2, rel=1e-12)


def test_dense_and_gathered_logits_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    table = F.normalize(torch.randn(41, 6, generator=g, dtype=torch.float64), dim=-1)
    user = F.normalize(torch.randn(17, 6, generator=g, dtype=torch.float64), dim=-1)
    targets = torch.randint(1, 41, (17,), generator=g)
    negatives = torch.randint(1, 41, (17, 5), generator=g)
    table.requires_grad_(True)
    monkeypatch.setattr(loss_module, "DENSE_ITEMS_PER_NEGATIVE", 1000)
    dense = sampled_softmax_loss(user, targets, negatives, table, 0.05)
    (dense_grad,) = torch.autograd.grad(dense, table)
    monkeypatch.setattr(loss_module, "DENSE_ITEMS_PER_NEGATIVE", 0)
    gathered = sampled_softmax_loss(user, targets, negatives, table, 0.05)
    (gathered_grad,) = torch.autograd.grad(gathered, table)
    torch.testing.assert_close(dense, gathered, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense_grad, gathered_grad, rtol=1e-10, atol=1e-12)


def test_negatives_are_uniform_over_real_items() -> None:
    torch.manual_seed(0)
    draws = sample_negatives(2000, 16, 7, torch.device("cpu"))
    assert draws.shape == (2000, 16)
    assert draws.min() == 1 and draws.max() == 7  # never the padding item 0
    counts = torch.bincount(draws.flatten(), minlength=8)[1:].double()
    assert (counts / counts.mean() - 1).abs().max() < 0.05
