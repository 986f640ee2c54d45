"""What a forward leaves alive for its backward, per layer: the saved-activation counter of the
recompute tests and of ``tests/train/measure_recompute.py``.

Counted: every tensor autograd saves (a ``saved_tensors_hooks`` pack hook) and every tensor a
checkpoint holds as its input (``torch.utils.checkpoint`` keeps those in its recompute closure,
where no pack hook sees them), once per storage and at the storage's full size (a view keeps
all of its storage alive), parameters left out. A storage is charged to the layer whose
forward first saved it, and, within the layer, to its attention call when that call saved it
first. The recorded tensors are held until the count is done, so no storage is freed and its
address reused by another while counting.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import flexgr.train.recompute as recompute_module


@dataclass
class Retained:
    """Bytes kept for the backward: per layer (layer index -> bytes), of which the attention
    call saved ``attention[i]``, and ``other`` (embedding, output norm, ...)."""

    layers: dict[int, int] = field(default_factory=dict)
    attention: dict[int, int] = field(default_factory=dict)
    other: int = 0

    def per_layer(self) -> float:
        """The median over layers: layer 0 also holds the batch's shared tables (positions,
        masks) that every later layer finds already counted."""
        values = sorted(self.layers.values())
        return float(values[len(values) // 2]) if values else 0.0

    def attention_per_layer(self) -> float:
        values = sorted(self.attention.values())
        return float(values[len(values) // 2]) if values else 0.0


@contextlib.contextmanager
def count_retained(model: nn.Module) -> Iterator[Retained]:
    """Count what the forwards run inside this block keep for their backward."""
    result = Retained()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    held: list[Tensor] = []
    where: dict[str, Any] = {"layer": None, "attention": False}

    def record(t: Tensor) -> None:
        if not isinstance(t, Tensor) or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in params or ptr in seen:
            return
        seen.add(ptr)
        held.append(t)
        nbytes = storage.nbytes()
        layer = where["layer"]
        if layer is None:
            result.other += nbytes
            return
        result.layers[layer] = result.layers.get(layer, 0) + nbytes
        if where["attention"]:
            result.attention[layer] = result.attention.get(layer, 0) + nbytes

    def pack(t: Tensor) -> Tensor:
        record(t)
        return t

    plain_checkpoint = recompute_module.checkpoint

    def counting_checkpoint(fn: Callable, *args: Any, **kwargs: Any) -> Any:
        # Only the forward's call: the backward's recomputation runs fn directly.
        for arg in args:
            record(arg)
        return plain_checkpoint(fn, *args, **kwargs)

    handles = []
    patched: list[nn.Module] = []
    for index, layer in enumerate(getattr(model, "layers", [])):
        handles.append(layer.register_forward_pre_hook(_setter(where, "layer", index)))
        handles.append(layer.register_forward_hook(_setter(where, "layer", None, post=True)))
        if hasattr(layer, "attend"):
            layer.attend = _flagged(layer.attend, where)
            patched.append(layer)
    recompute_module.checkpoint = counting_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        recompute_module.checkpoint = plain_checkpoint
        for handle in handles:
            handle.remove()
        for layer in patched:
            del layer.attend  # back to the class's method
        held.clear()


def _setter(where: dict[str, Any], key: str, value: Any, post: bool = False) -> Callable:
    if post:
        return lambda module, args, output: where.__setitem__(key, value)
    return lambda module, args: where.__setitem__(key, value)


def _flagged(attend: Callable, where: dict[str, Any]) -> Callable:
    @functools.wraps(attend)
    def flagged(*args: Any, **kwargs: Any) -> Tensor:
        where["attention"] = True
        try:
            return attend(*args, **kwargs)
        finally:
            where["attention"] = False

    return flagged


class SavesInputs(torch.autograd.Function):
    """An attention that saves q, k, v only and recomputes itself in backward: what the Triton
    kernel's autograd keeps (flexgr/ops/triton_ops.py ``_setup``: q, k, v, the bias weights
    and the batch's tables), so the CPU counter can show a kernel-backed layer's memory."""

    @staticmethod
    def forward(ctx: Any, attention: Callable, kwargs: dict, q: Tensor, k: Tensor, v: Tensor):
        ctx.attention, ctx.kwargs = attention, kwargs
        ctx.save_for_backward(q, k, v)
        return attention(q, k, v, **kwargs)

    @staticmethod
    def backward(ctx: Any, dout: Tensor):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = ctx.attention(q, k, v, **ctx.kwargs)
        return (None, None, *torch.autograd.grad(out, (q, k, v), dout))


def kernel_like(attention: Callable) -> Callable:
    """``attention`` (no relative bias) wrapped in :class:`SavesInputs`."""

    def call(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        if kwargs.get("bias") is not None:
            raise ValueError("kernel_like stands in for the kernel without a relative bias")
        return SavesInputs.apply(attention, kwargs, q, k, v)

    return call
