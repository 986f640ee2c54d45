"""Activation recomputation, applied to a model from outside (its state dict is unchanged).

``train.recompute = "layers"`` runs every transformer layer of the model under
``torch.utils.checkpoint`` (non-reentrant): the forward keeps only each layer's input, and the
backward runs the layer again to rebuild the rest. Activation memory per layer drops from
everything the layer saves (projections, norms, attention inputs and outputs) to one [T, d]
tensor, for about one more forward of each layer per step; dropout masks are replayed exactly
(checkpoint restores the RNG state). Under context parallelism the recomputed forward
all-gathers keys and values again.
"""

from __future__ import annotations

import functools
from typing import Literal

from torch import nn
from torch.utils.checkpoint import checkpoint

Recompute = Literal["none", "layers"]


def apply_recompute(model: nn.Module, mode: Recompute) -> nn.Module:
    """Wrap the forward of each module in ``model.layers`` (HSTU's and SASRec's stacks)."""
    if mode == "none":
        return model
    if mode != "layers":
        raise ValueError(f"recompute must be 'none' or 'layers', got {mode!r}")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no layer stack to recompute")
    for layer in layers:
        if getattr(layer, "_flexgr_recompute", False):
            continue
        plain = layer.forward

        @functools.wraps(plain)
        def recomputed(*args, _plain=plain, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        layer.forward = recomputed
        layer._flexgr_recompute = True
    return model
