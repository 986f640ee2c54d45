"""The retrieval training loss: a softmax of the positive against negatives.

``train.negatives`` picks the negatives (docs/train.md, [train]): "uniform" (the reference HSTU's
sampled softmax, :func:`sampled_softmax_loss`), "full" (every item, :func:`full_softmax_loss`)
or "in_batch" (the batch's other targets plus the uniform ones, :func:`in_batch_softmax_loss`);
``train.label_smoothing`` spreads part of the target over the candidates. :func:`training_loss`
turns the settings into the function the loop calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flexgr.train.config import TrainConfig

Negatives = Literal["uniform", "full", "in_batch"]
# (user_TD, targets_T, negatives_TR, item_table, temperature, reduction=) -> loss
LossFn = Callable[..., Tensor]

# Up to this many items per sampled negative, scoring every item with one matmul and picking
# the negatives' logits out is cheaper than gathering a [T, R, D] block of embeddings (measured
# on CPU: 2.5x faster at 1.7k items, 1.5x at 3.7k items, R = 128; the gather's backward is a
# scatter-add over T * R rows). Larger catalogues gather, so memory stays O(T * R).
DENSE_ITEMS_PER_NEGATIVE = 32


def sample_negatives(
    num_positions: int, num_negatives: int, num_items: int, device: torch.device
) -> Tensor:
    """[num_positions, num_negatives] item indices drawn uniformly from 1..num_items (0 is padding).

    Every position gets its own negatives. Draws use the global torch RNG of ``device``, which
    checkpoints save and restore.
    """
    return torch.randint(1, num_items + 1, (num_positions, num_negatives), device=device)


def sampled_softmax_loss(
    user_TD: Tensor,
    targets_T: Tensor,
    negatives_TR: Tensor,
    item_table: Tensor,
    temperature: float,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean over positions of -log softmax(positive) among {positive, negatives}.

    ``user_TD`` and ``item_table`` ([num_items + 1, D]) are expected L2-normalised, so logits are
    cosines / temperature. A negative that happens to be the position's positive item is masked
    out rather than counted as a wrong answer. ``reduction="sum"`` sums over positions instead
    (a rank's share of a loss whose count of positions is global), ``"none"`` returns the [T]
    per-position losses (for a weighted mean: flexgr.train.graphs). ``label_smoothing`` > 0:
    see :func:`smoothed_cross_entropy`.
    """
    _check(reduction, label_smoothing)
    pos_logit = (user_TD * item_table[targets_T]).sum(-1) / temperature  # [T]
    if item_table.shape[0] <= DENSE_ITEMS_PER_NEGATIVE * negatives_TR.shape[1]:
        neg_logit = torch.gather(user_TD @ item_table.T, 1, negatives_TR)
    else:
        neg_logit = torch.einsum("td,trd->tr", user_TD, item_table[negatives_TR])
    neg_logit = neg_logit / temperature
    neg_logit = neg_logit.masked_fill(negatives_TR == targets_T.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], dim=1)
    return _softmax_loss(logits, pos_logit, reduction, label_smoothing)


def full_softmax_loss(
    user_TD: Tensor,
    targets_T: Tensor,
    item_table: Tensor,
    temperature: float,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """-log softmax(positive) over every item 1..I (padding row 0 left out, the positive once).

    Memory: the [T, I + 1] logits (what the uniform loss's dense path computes already for
    catalogues up to ``DENSE_ITEMS_PER_NEGATIVE`` items per negative).
    """
    _check(reduction, label_smoothing)
    scores_TI = user_TD @ item_table.T / temperature
    pos_logit = scores_TI.gather(1, targets_T.unsqueeze(1)).squeeze(1)
    logits = scores_TI[:, 1:]
    return _softmax_loss(logits, pos_logit, reduction, label_smoothing)


def in_batch_log_weights(
    targets_T: Tensor, num_items: int, logq_correction: bool, dtype: torch.dtype = torch.float32
) -> Tensor:
    """[I + 1] what each item's in-batch columns add to its logit, grouped: log of (its count
    c_i among the T targets) minus, under the logQ correction, log(q_i / (1 / I)), with q_i =
    c_i / T its in-batch sampling probability; -inf for items no position targets.

    Every one of the T targets is a column; an item's c_i columns share one logit, so they
    enter once as logit + log c_i (exact, and [T, I + 1] instead of [T, T]). The correction is
    taken relative to the uniform negatives' 1 / I: an in-batch column then weighs what one
    uniform negative weighs in expectation, as the uniform ones and the positive stay
    uncorrected (subtracting log q_i alone would weigh each column as I uniform negatives).
    With q_i = c_i / T the multiplicity cancels: every item in the batch gets log(T / I).
    """
    counts_I = torch.zeros(num_items + 1, dtype=torch.float64, device=targets_T.device)
    counts_I.index_add_(0, targets_T, torch.ones_like(targets_T, dtype=torch.float64))
    log_weight_I = counts_I.log()
    if logq_correction:
        q_I = counts_I / targets_T.numel()
        log_weight_I = log_weight_I - (q_I * num_items).log()
    present_I = counts_I > 0  # log(0) - log(0) is NaN: absent items are no candidates
    return torch.where(present_I, log_weight_I, float("-inf")).to(dtype)


def in_batch_softmax_loss(
    user_TD: Tensor,
    targets_T: Tensor,
    negatives_TR: Tensor,
    item_table: Tensor,
    temperature: float,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logq_correction: bool = True,
) -> Tensor:
    """-log softmax(positive) among {positive, the uniform negatives, the batch's targets}.

    The in-batch candidates of position t are the targets of every position of the call (this
    process's batch), weighted by :func:`in_batch_log_weights`; those equal to t's own positive
    are masked, as colliding uniform negatives are. Logits come from one [T, I + 1] matmul.
    """
    _check(reduction, label_smoothing)
    scores_TI = user_TD @ item_table.T / temperature
    own_T1 = targets_T.unsqueeze(1)
    pos_logit = scores_TI.gather(1, own_T1).squeeze(1)
    neg_logit = torch.gather(scores_TI, 1, negatives_TR)
    neg_logit = neg_logit.masked_fill(negatives_TR == own_T1, float("-inf"))
    log_weight_I = in_batch_log_weights(
        targets_T, item_table.shape[0] - 1, logq_correction, scores_TI.dtype
    )
    in_batch = (scores_TI + log_weight_I).scatter(1, own_T1, float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit, in_batch], dim=1)
    return _softmax_loss(logits, pos_logit, reduction, label_smoothing)


def smoothed_cross_entropy(logits_TK: Tensor, pos_logit_T: Tensor, smoothing: float) -> Tensor:
    """[T] cross-entropy against (1 - s) on the positive + s spread evenly over the K_t
    candidates of row t: its finite logits (the positive among them; -inf entries, masked
    collisions or absent items, are no candidates). Equal to (1 - s) (lse - pos) +
    s (lse - mean of the finite logits)."""
    lse_T = torch.logsumexp(logits_TK, dim=1)
    finite_TK = torch.isfinite(logits_TK)
    mean_T = logits_TK.masked_fill(~finite_TK, 0.0).sum(1) / finite_TK.sum(1)
    return (1.0 - smoothing) * (lse_T - pos_logit_T) + smoothing * (lse_T - mean_T)


@dataclass(frozen=True)
class LossRecipe:
    """The loss settings of [train] (see :class:`flexgr.train.config.TrainConfig`)."""

    negatives: Negatives = "uniform"
    logq_correction: bool = True  # in_batch only
    label_smoothing: float = 0.0

    def sampled_negatives(self, num_negatives: int) -> int:
        """Uniform negatives to draw per position: none for the full softmax."""
        return 0 if self.negatives == "full" else num_negatives


def loss_recipe(train: TrainConfig) -> LossRecipe:
    """The loss settings of a [train] section."""
    return LossRecipe(train.negatives, train.logq_correction, train.label_smoothing)


def training_loss(recipe: LossRecipe) -> LossFn:
    """The loss of ``recipe`` with the uniform loss's signature; at the defaults it is
    :func:`sampled_softmax_loss` itself."""
    if recipe == LossRecipe():
        return sampled_softmax_loss
    smoothing = recipe.label_smoothing
    if recipe.negatives == "uniform":
        return functools.partial(sampled_softmax_loss, label_smoothing=smoothing)
    if recipe.negatives == "full":
        return functools.partial(_full_ignoring_negatives, label_smoothing=smoothing)
    if recipe.negatives == "in_batch":
        return functools.partial(
            in_batch_softmax_loss,
            label_smoothing=smoothing,
            logq_correction=recipe.logq_correction,
        )
    raise ValueError(f"train.negatives must be uniform, full or in_batch, got {recipe.negatives!r}")


def _full_ignoring_negatives(
    user_TD: Tensor,
    targets_T: Tensor,
    negatives_TR: Tensor,
    item_table: Tensor,
    temperature: float,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    # The loop draws sampled_negatives(...) = 0 per position here: nothing to ignore but [T, 0].
    return full_softmax_loss(
        user_TD, targets_T, item_table, temperature, reduction, label_smoothing
    )


def _check(reduction: str, label_smoothing: float) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _softmax_loss(
    logits_TK: Tensor, pos_logit_T: Tensor, reduction: str, label_smoothing: float
) -> Tensor:
    """-log softmax(positive) per row, smoothed or not, reduced: the tail of every loss here.
    Unsmoothed it is the reference's loss, op for op (the default stays bit-identical)."""
    if label_smoothing:
        per_position = smoothed_cross_entropy(logits_TK, pos_logit_T, label_smoothing)
    else:
        per_position = torch.logsumexp(logits_TK, dim=1) - pos_logit_T
    if reduction == "none":
        return per_position
    return per_position.mean() if reduction == "mean" else per_position.sum()
