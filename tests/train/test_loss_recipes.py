"""train.negatives, train.logq_correction, train.label_smoothing: each loss against a direct,
loop-by-loop reading of its definition (fp64), and the defaults against the loss as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flexgr.train import loss as loss_module
from flexgr.train.loss import (
    LossRecipe,
    full_softmax_loss,
    in_batch_log_weights,
    in_batch_softmax_loss,
    sampled_softmax_loss,
    training_loss,
)

TAU = 0.5  # large enough that no exp() in the direct sums underflows


def case(
    num_items: int = 9, positions: int = 7, negatives: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user [T, D], targets [T] with repeats, uniform negatives [T, R] with a collision, table
    [I + 1, D]), all L2-normalised fp64; the padding row points at the users so that counting
    it would change every loss."""
    g = torch.Generator().manual_seed(seed)
    user = F.normalize(torch.randn(positions, 5, generator=g, dtype=torch.float64), dim=-1)
    table = F.normalize(torch.randn(num_items + 1, 5, generator=g, dtype=torch.float64), dim=-1)
    table[0] = F.normalize(user.sum(0), dim=-1)
    targets = torch.randint(1, num_items + 1, (positions,), generator=g)
    targets[1] = targets[0]  # a repeated target: two in-batch columns of one item
    negs = torch.randint(1, num_items + 1, (positions, negatives), generator=g)
    negs[2, 1] = targets[2]  # a collision, masked
    return user, targets, negs, table


def score(user: torch.Tensor, table: torch.Tensor, t: int, item: int) -> float:
    return float(user[t] @ table[item]) / TAU


def softmax_loss(pos: float, others: list[float], smoothing: float = 0.0) -> float:
    """-(1 - s) log p(pos) - s / K sum_k log p(k) over the K = 1 + len(others) candidates."""
    logits = [pos, *others]
    lse = math.log(sum(math.exp(v) for v in logits))
    nll = lse - pos
    mean_nll = sum(lse - v for v in logits) / len(logits)
    return (1 - smoothing) * nll + smoothing * mean_nll


def direct_uniform(user, targets, negs, table, smoothing=0.0) -> float:
    rows = []
    for t in range(len(targets)):
        y = int(targets[t])
        others = [score(user, table, t, int(n)) for n in negs[t] if int(n) != y]
        rows.append(softmax_loss(score(user, table, t, y), others, smoothing))
    return sum(rows) / len(rows)


def direct_full(user, targets, table, smoothing=0.0) -> float:
    num_items = table.shape[0] - 1
    rows = []
    for t in range(len(targets)):
        y = int(targets[t])
        others = [score(user, table, t, i) for i in range(1, num_items + 1) if i != y]
        rows.append(softmax_loss(score(user, table, t, y), others, smoothing))
    return sum(rows) / len(rows)


def direct_in_batch(user, targets, negs, table, logq: bool, smoothing=0.0) -> float:
    """Every position j's target is a column of position t, with logit s - log(I q) where q is
    its frequency among the T targets; columns of t's own positive are masked. Label smoothing
    counts an item's columns as one candidate (they share one logit)."""
    T, num_items = len(targets), table.shape[0] - 1
    counts = {int(y): int((targets == y).sum()) for y in targets}
    rows = []
    for t in range(T):
        y = int(targets[t])
        others = [score(user, table, t, int(n)) for n in negs[t] if int(n) != y]
        grouped: dict[int, float] = {}
        for j in range(T):
            item = int(targets[j])
            if item == y:
                continue
            logit = score(user, table, t, item)
            if logq:
                logit -= math.log(num_items * counts[item] / T)
            grouped[item] = grouped.get(item, 0.0) + math.exp(logit)
        others += [math.log(total) for total in grouped.values()]
        rows.append(softmax_loss(score(user, table, t, y), others, smoothing))
    return sum(rows) / T


def previous_sampled_softmax_loss(user_TD, targets_T, negatives_TR, item_table, temperature):
    """The loss as it was before train.negatives existed (flexgr 97820c6), dense branch."""
    pos_logit = (user_TD * item_table[targets_T]).sum(-1) / temperature
    neg_logit = torch.gather(user_TD @ item_table.T, 1, negatives_TR) / temperature
    neg_logit = neg_logit.masked_fill(negatives_TR == targets_T.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos_logit).mean()


# ---------------------------------------------------------------- defaults


def test_the_default_recipe_is_the_uniform_loss_itself() -> None:
    assert training_loss(LossRecipe()) is sampled_softmax_loss
    assert LossRecipe().sampled_negatives(512) == 512
    assert LossRecipe(negatives="full").sampled_negatives(512) == 0


def test_defaults_give_the_previous_loss_and_gradients_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(7)
    table = F.normalize(torch.randn(41, 8, generator=g), dim=-1)  # fp32, as training runs it
    user = F.normalize(torch.randn(33, 8, generator=g), dim=-1)
    targets = torch.randint(1, 41, (33,), generator=g)
    negatives = torch.randint(1, 41, (33, 6), generator=g)
    results = []
    for fn in (training_loss(LossRecipe()), previous_sampled_softmax_loss):
        u, w = user.clone().requires_grad_(True), table.clone().requires_grad_(True)
        value = fn(u, targets, negatives, w, 0.05)
        value.backward()
        results.append((value, u.grad, w.grad))
    (a, ua, wa), (b, ub, wb) = results
    assert torch.equal(a, b) and torch.equal(ua, ub) and torch.equal(wa, wb)


# ---------------------------------------------------------------- definitions


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dense", [True, False])
def test_uniform_matches_its_definition(
    smoothing: float, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loss_module, "DENSE_ITEMS_PER_NEGATIVE", 1000 if dense else 0)
    user, targets, negs, table = case()
    got = sampled_softmax_loss(user, targets, negs, table, TAU, label_smoothing=smoothing)
    assert got.item() == pytest.approx(direct_uniform(user, targets, negs, table, smoothing), 1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_full_matches_its_definition(smoothing: float) -> None:
    user, targets, _, table = case()
    got = full_softmax_loss(user, targets, table, TAU, label_smoothing=smoothing)
    assert got.item() == pytest.approx(direct_full(user, targets, table, smoothing), rel=1e-12)
    # An independent reading: cross-entropy over items 1..I, smoothing included.
    logits = (user @ table[1:].T) / TAU
    reference = F.cross_entropy(logits, targets - 1, label_smoothing=smoothing)
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("logq", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_in_batch_matches_its_definition(logq: bool, smoothing: float) -> None:
    user, targets, negs, table = case()
    got = in_batch_softmax_loss(
        user, targets, negs, table, TAU, label_smoothing=smoothing, logq_correction=logq
    )
    expected = direct_in_batch(user, targets, negs, table, logq, smoothing)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_logq_with_batch_frequencies_weighs_every_batch_item_alike() -> None:
    targets = torch.tensor([3, 3, 3, 5, 1, 5])  # T = 6 over I = 5 items
    weights = in_batch_log_weights(targets, 5, logq_correction=True, dtype=torch.float64)
    present = torch.tensor([False, True, False, True, False, True])
    expected = torch.full((3,), math.log(6 / 5), dtype=torch.float64)  # log(T / I)
    torch.testing.assert_close(weights[present], expected)
    assert torch.isneginf(weights[~present]).all()
    plain = in_batch_log_weights(targets, 5, logq_correction=False, dtype=torch.float64)
    torch.testing.assert_close(plain[[1, 3, 5]], torch.tensor([1.0, 3.0, 2.0]).log().double())


def test_sum_reduction_and_recipe_dispatch() -> None:
    user, targets, negs, table = case()
    T = len(targets)
    for recipe, direct in (
        (LossRecipe(label_smoothing=0.1), direct_uniform(user, targets, negs, table, 0.1)),
        (LossRecipe(negatives="full"), direct_full(user, targets, table)),
        (
            LossRecipe(negatives="in_batch", logq_correction=False),
            direct_in_batch(user, targets, negs, table, logq=False),
        ),
    ):
        fn = training_loss(recipe)
        negatives = negs[:, : recipe.sampled_negatives(negs.shape[1])]
        got = fn(user, targets, negatives, table, TAU, reduction="sum")
        assert got.item() == pytest.approx(direct * T, rel=1e-12), recipe


def test_all_candidates_masked_leaves_a_finite_zero_loss() -> None:
    # One item in the batch and every negative colliding: the positive is the only candidate.
    user, _, _, table = case()
    targets = torch.full((7,), 4)
    negs = torch.full((7, 3), 4)
    table.requires_grad_(True)
    for smoothing in (0.0, 0.4):
        value = in_batch_softmax_loss(user, targets, negs, table, TAU, label_smoothing=smoothing)
        (grad,) = torch.autograd.grad(value, table)
        assert value.item() == pytest.approx(0.0, abs=1e-12)
        assert torch.isfinite(grad).all()


def test_gradients_are_finite_with_masked_entries() -> None:
    user, targets, negs, table = case()
    for recipe in (
        LossRecipe(label_smoothing=0.3),
        LossRecipe(negatives="full", label_smoothing=0.3),
        LossRecipe(negatives="in_batch", label_smoothing=0.3),
    ):
        u, w = user.clone().requires_grad_(True), table.clone().requires_grad_(True)
        training_loss(recipe)(u, targets, negs, w, TAU).backward()
        assert torch.isfinite(u.grad).all() and torch.isfinite(w.grad).all(), recipe
        assert w.grad[0].abs().max() == 0.0  # the padding row is never a candidate


def test_bad_smoothing_is_refused_by_the_function() -> None:
    user, targets, negs, table = case()
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        sampled_softmax_loss(user, targets, negs, table, TAU, label_smoothing=1.0)
