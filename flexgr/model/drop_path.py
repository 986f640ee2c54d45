"""Stochastic depth per sequence of a jagged batch (``model.drop_path``).

A layer's residual branch is kept or dropped for a whole sequence (one user) at a time: one
Bernoulli(1 - p) draw per sequence, expanded over its tokens through the batch's offsets, and
the kept branches scaled by 1 / (1 - p) so that the expected output is the undropped one. In
eval mode, or at p = 0, it is the identity and draws nothing (the torch RNG advances exactly as
without it, so a model at p = 0 trains bit for bit as before).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SequenceDropPath(nn.Module):
    """Holds p; :meth:`scale` makes the per-token factor a layer multiplies its branch by."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"model.drop_path must be in [0, 1), got {p}")
        self.p = p

    @property
    def active(self) -> bool:
        return self.training and self.p > 0.0

    def scale(self, offsets: Tensor | None, num_tokens: int) -> Tensor | None:
        """[T, 1] float32: 0 or 1 / (1 - p) per token, one draw per sequence of ``offsets``
        ([B + 1] token offsets of the T tokens); None where the branch is left as it is (eval,
        p = 0)."""
        if not self.active:
            return None
        if offsets is None:
            raise ValueError(
                "model.drop_path needs each sequence's token range (the batch offsets), which "
                "these inputs do not carry (context parallelism splits sequences over ranks)"
            )
        num_sequences = offsets.numel() - 1
        # The global torch generator of the offsets' device: seeded runs repeat, checkpoints
        # restore it.
        keep_B = torch.rand(num_sequences, device=offsets.device) >= self.p
        scale_B = keep_B.float() / (1.0 - self.p)
        lengths_B = offsets[1:] - offsets[:-1]
        # output_size: no host sync for the total on CUDA.
        scale_T = torch.repeat_interleave(scale_B, lengths_B, output_size=num_tokens)
        return scale_T.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"p={self.p}"
