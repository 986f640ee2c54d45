"""VISTA stage 2: target attention over ``[summaries; candidates]``.

Each sequence is its user's S summary tokens followed by its M_b candidates, through HSTU layers
under HSTU's built-in rule with ``contextual_len = S`` and ``num_targets = M_b``:

- a summary row sees every summary row (the contextual prefix sees every non-target column),
  never a candidate;
- a candidate sees every summary row and itself, never another candidate, so a candidate's
  score does not depend on which others are scored with it.

The cost is ``O(S (S + M))`` per sequence whatever the history's length: stage 2 reads only the
summaries. The divisor N is ``S + 1``, the most keys a row reads (a candidate's S summaries and
itself), a constant as HSTU's N is. Being the built-in rule, the mask runs on every backend
(the Triton kernel included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexgr.masks.block import HSTUMask, build_hstu_mask
from flexgr.model.hstu.inputs import BiasWeights, HSTUInputs
from flexgr.model.hstu.model import HSTUConfig
from flexgr.ops.attention import default_backend, hstu_attention
from flexgr.ranking.tokens import segments


def target_layer_config(
    d_model: int, num_heads: int, num_layers: int, num_seeds: int, dropout: float
) -> HSTUConfig:
    """The stage-2 HSTU layers: no relative bias (summaries have no position or time)."""
    return HSTUConfig(
        num_items=1, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
        dqk=d_model // num_heads, dv=d_model // num_heads, max_seq_len=num_seeds + 1,
        len_margin=0, dropout=dropout, input_dropout=dropout, rel_bias=False,
    )  # fmt: skip


@dataclass(frozen=True)
class TargetAttention:
    """HSTU attention over the packed ``[summaries; candidates]`` batch, the rule bound."""

    offsets: Tensor  # [B + 1] of the packed sequences
    num_targets: Tensor  # [B] candidates per sequence
    num_seeds: int  # the contextual prefix
    backend: str
    mask: HSTUMask | None  # built once per batch for the block-sparse backends

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, max_seq_len: int, alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor:  # fmt: skip
        return hstu_attention(
            q, k, v, self.offsets, max_seq_len=max_seq_len, alpha=alpha,
            num_targets=self.num_targets, contextual_len=self.num_seeds, backend=self.backend,
            mask=self.mask, validate=False,
        )  # fmt: skip


@dataclass(frozen=True)
class TargetInputs:
    """One batch's stage-2 packing: ``summary_rows`` [B S] (user-major) and ``candidate_rows``
    [C] are the rows of the summary and candidate tokens in the packed sequence."""

    summary_rows: Tensor
    candidate_rows: Tensor
    offsets: Tensor  # [B + 1]
    num_tokens: int
    layers: HSTUInputs


def prepare_targets(
    num_seeds: int, candidate_offsets: Tensor, num_candidates: int, backend: str = "auto"
) -> TargetInputs:
    """The stage-2 inputs of a batch whose sequence b has the candidates
    ``[candidate_offsets[b], candidate_offsets[b + 1])`` (``num_candidates`` in all); no host
    sync on the reference path."""
    S, device, C = num_seeds, candidate_offsets.device, num_candidates
    cand = candidate_offsets.to(torch.int64)
    B = cand.numel() - 1
    counts = cand[1:] - cand[:-1]
    offsets = torch.zeros_like(cand)
    offsets[1:] = torch.cumsum(counts + S, 0)
    summary_rows = (offsets[:-1].view(-1, 1) + torch.arange(S, device=device)).reshape(-1)
    c_seq, c_local = segments(cand, C)
    candidate_rows = offsets[c_seq] + S + c_local
    T = C + B * S
    if backend == "auto":
        backend = default_backend(device)
    mask = None
    if backend != "reference":
        mask = build_hstu_mask(offsets, num_targets=counts, contextual_len=S, total_len=T)
    attention = TargetAttention(offsets, counts, S, backend, mask)
    positions = torch.zeros(T, dtype=torch.int64, device=device)  # no position table
    return TargetInputs(summary_rows, candidate_rows, offsets, T, HSTUInputs(positions, attention))
