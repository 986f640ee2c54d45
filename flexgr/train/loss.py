"""Sampled softmax over uniformly drawn negatives, the training loss of the reference HSTU."""

from __future__ import annotations

import torch
from torch import Tensor

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
) -> Tensor:
    """Mean over positions of -log softmax(positive) among {positive, negatives}.

    ``user_TD`` and ``item_table`` ([num_items + 1, D]) are expected L2-normalised, so logits are
    cosines / temperature. A negative that happens to be the position's positive item is masked
    out rather than counted as a wrong answer. ``reduction="sum"`` sums over positions instead
    (a rank's share of a loss whose count of positions is global).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    pos_logit = (user_TD * item_table[targets_T]).sum(-1) / temperature  # [T]
    if item_table.shape[0] <= DENSE_ITEMS_PER_NEGATIVE * negatives_TR.shape[1]:
        neg_logit = torch.gather(user_TD @ item_table.T, 1, negatives_TR)
    else:
        neg_logit = torch.einsum("td,trd->tr", user_TD, item_table[negatives_TR])
    neg_logit = neg_logit / temperature
    neg_logit = neg_logit.masked_fill(negatives_TR == targets_T.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], dim=1)
    per_position = torch.logsumexp(logits, dim=1) - pos_logit
    return per_position.mean() if reduction == "mean" else per_position.sum()
