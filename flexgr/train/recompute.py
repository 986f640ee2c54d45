"""Activation recomputation, applied to a model from outside (its state dict is unchanged).

``train.recompute = "layers"`` runs every transformer layer of the model under
``torch.utils.checkpoint`` (non-reentrant): the forward keeps only each layer's input, and the
backward runs the layer again to rebuild the rest. Activation memory per layer drops from
everything the layer saves (projections, norms, attention inputs and outputs) to one [T, d]
tensor, for about one more forward of each layer per step; dropout masks are replayed exactly
(checkpoint restores the RNG state). Under context parallelism the recomputed forward
all-gathers keys and values again.

``train.recompute = "selective"`` (ULTRA-HSTU's selective recomputation, HSTU layers only)
keeps the attention and recomputes the cheap parts around it. Each
:class:`~flexgr.model.hstu.HSTULayer` runs as three pieces:

1. ``pre`` under checkpoint: LayerNorm, the UVQK matmul and SiLU (``HSTULayer.project``),
   returned as two fresh tensors, ``u`` and one ``[v, q, k]`` block;
2. the attention call (``HSTULayer.attend``) as usual: it saves what its backend saves and is
   not recomputed (no second all-gather under context parallelism either);
3. ``post`` under checkpoint: the gated norm ``u * LN(attn)``, dropout and the output
   projection (``HSTULayer.gate``), dropout's mask replayed by checkpoint's RNG restore;
   ``model.drop_path``'s [T, 1] factor is drawn once before it and passed in.

What stays for the backward, per layer: the layer input x [T, d] (held by both checkpoints,
one tensor), u [T, H dv] and attn [T, H dv] (post's inputs), and what the attention saves
(the Triton kernel: its q, k, v inputs, which are views of the [v, q, k] block; the dense
reference: its own padded copies, and then the block itself is freed). Why the copies in
``pre``: ``torch.split`` gives views of the one [T, 2 H dv + 2 H dqk] projection, and any
view kept alive keeps all of it. Were u a view, post's input would pin the whole projection
even where the attention saved copies of q, k, v (so q, k, v would be stored twice); were
q, k, v views, an attention that saves its inputs would pin u's columns next to post's u.
Two fresh tensors cost one copy of the projection per forward and make every backend keep
exactly what it needs. Not saved: both LayerNorms' inputs and statistics, the pre-SiLU
projection, LN(attn), the gated values, the dropout mask and the dropped values
(all recomputed: one more LN + UVQK matmul + SiLU and one more gated norm per layer in the
backward, no attention). The wrapping calls only the layer's own methods, so it is the same
on every attention backend.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flexgr.model.hstu.inputs import HSTUInputs
from flexgr.model.hstu.model import HSTULayer

Recompute = Literal["none", "layers", "selective"]
MODES: tuple[str, ...] = ("none", "layers", "selective")


def apply_recompute(model: nn.Module, mode: Recompute) -> nn.Module:
    """Wrap the forward of each module in ``model.layers`` (HSTU's and SASRec's stacks)."""
    if mode == "none":
        return model
    if mode not in MODES:
        raise ValueError(f"train.recompute must be one of {', '.join(MODES)}, got {mode!r}")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        # ValueError like the mode errors here: a config value this model cannot take.
        raise ValueError(f"{type(model).__name__} has no layer stack to recompute")  # noqa: TRY004
    if mode == "selective" and not all(isinstance(layer, HSTULayer) for layer in layers):
        # Refused rather than silently run as "layers": the two differ in step time and
        # memory, and a run's config should say which one it measured.
        raise ValueError(
            f"train.recompute = 'selective' recomputes the projections around HSTU's attention; "
            f"{type(model).__name__} has no HSTU layers (use train.recompute = 'layers')"
        )
    for layer in layers:
        if getattr(layer, "_flexgr_recompute", False):
            continue
        if mode == "selective":
            layer.forward = functools.partial(_selective_forward, layer)
        else:
            plain = layer.forward

            @functools.wraps(plain)
            def recomputed(*args, _plain=plain, **kwargs):
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

            layer.forward = recomputed
        layer._flexgr_recompute = True
    return model


def _selective_forward(layer: HSTULayer, x_TD: Tensor, inputs: HSTUInputs) -> Tensor:
    """``HSTULayer.forward`` with its pre- and post-attention parts recomputed in backward."""
    hv = layer.splits[0]

    def pre(x: Tensor) -> tuple[Tensor, Tensor]:
        uvqk = layer.project(x)
        # Copies, not views: see the module docstring (what is saved).
        return uvqk[:, :hv].contiguous(), uvqk[:, hv:].contiguous()

    u, vqk = checkpoint(pre, x_TD, use_reentrant=False)
    v, q, k = torch.split(vqk, layer.splits[1:], dim=-1)
    attn = layer.attend(q, k, v, inputs)
    # model.drop_path's [T, 1] factor is drawn here, once, and handed to the recomputed part.
    branch_scale = layer.branch_scale(x_TD, inputs)
    gate_inputs = (x_TD, u, attn) if branch_scale is None else (x_TD, u, attn, branch_scale)
    return checkpoint(layer.gate, *gate_inputs, use_reentrant=False)
