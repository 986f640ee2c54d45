"""Random draws that do not depend on how a batch is split over ranks.

A DP x CP training step should draw what one process draws for the combined batch: then per-step
losses match a single-process run, and the random generators advance identically on every rank,
so the one RNG state a checkpoint holds resumes every rank. Two tools:

* :class:`ReplicatedDropout` replaces a model's ``nn.Dropout`` modules from outside. It draws the
  mask for the whole world batch, exactly the draw one process makes, and keeps this rank's rows.
  Price: every rank draws ``world_tokens x d`` per dropout instead of its own ``T_r x d`` (and
  holds that mask briefly), which grows with dp * cp.
* :func:`rank_local_rng` is for models whose dropout cannot be replicated that way (SASRec's
  attention dropout runs on a padded batch shaped by the local sequences): their forward draws
  from a generator seeded by (seed, step, rank), and the shared generator is restored afterwards.
  Masks then differ from one process (they match in distribution), the rest stays in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DropoutRows:
    """The rows of the world batch that this rank's tokens are, while a forward runs."""

    def __init__(self) -> None:
        self.index: Tensor | None = None  # [T_r] int64, row of each local token
        self.total = 0  # rows of the world batch

    @contextmanager
    def bound(self, index: Tensor, total: int) -> Iterator[None]:
        self.index, self.total = index, total
        try:
            yield
        finally:
            self.index, self.total = None, 0


class ReplicatedDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn for all ``rows.total`` rows and then indexed.

    ``F.dropout`` of a tensor of ones returns the scaled mask (0 or 1 / (1 - p)) that dropout of
    the whole batch would have applied, drawn with the same generator calls, so the local rows
    get the single-process values bit for bit (CPU; on CUDA the fused kernel's draw may depend on
    alignment, so only the lockstep is guaranteed there). Outside a bound forward it is plain
    dropout.
    """

    def __init__(self, p: float, rows: DropoutRows) -> None:
        super().__init__(p)
        self.rows = rows

    def forward(self, x: Tensor) -> Tensor:
        index = self.rows.index
        if index is None or not self.training or self.p == 0.0:
            return super().forward(x)
        if x.shape[0] != index.shape[0]:
            raise ValueError(f"dropout input has {x.shape[0]} rows, the binding {index.shape[0]}")
        scale = F.dropout(x.new_ones((self.rows.total, *x.shape[1:])), self.p, True, inplace=True)
        return x * scale[index]


def replicate_dropout(model: nn.Module) -> DropoutRows:
    """Swap every plain ``nn.Dropout`` in ``model`` for a :class:`ReplicatedDropout` sharing one
    binding, which the caller sets around each forward (``rows.bound(...)``)."""
    rows = DropoutRows()
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Dropout
    ]
    for parent, name, child in swaps:
        replaced = ReplicatedDropout(child.p, rows)
        replaced.train(child.training)
        setattr(parent, name, replaced)
    return rows


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A seed for one rank's private draws at one step (a resumed run recomputes it)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


@contextmanager
def rank_local_rng(seed: int, step: int, rank: int, device: torch.device) -> Iterator[None]:
    """Draws inside come from generators seeded by (seed, step, rank); the CPU generator and the
    device's are restored on exit, so draws outside stay the same on every rank."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        value = rank_seed(seed, step, rank)
        torch.default_generator.manual_seed(value)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(value)
        yield
