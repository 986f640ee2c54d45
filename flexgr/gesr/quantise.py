"""FP8 weight-only post-training quantisation of a model's large linears.

:func:`quantise_linears` replaces every ``nn.Linear`` whose in and out features are both at
least ``min_features`` with an :class:`FP8Linear`: the weight stored as ``torch.float8_e4m3fn``
with one fp32 scale per output channel (the row's largest magnitude mapped to e4m3's largest
finite value, 448), the bias kept as it was. The matmul dequantises the weight to the input's
dtype and runs as before, so activations are untouched (weight-only). This is the portable
path; on CPU it saves weight memory (1 byte per weight instead of 4) and costs a dequantisation
per call. A GPU path through scaled FP8 matmuls is not written (docs/gesr.md).

Error: e4m3 keeps 3 mantissa bits, so a weight in the normal range is off by at most 1/16 of
its magnitude; a weight below the normal range of its row (under ``2**-6 * scale``) by at most
half a subnormal step, ``2**-10 * scale``. ``tests/gesr/test_quantise.py`` checks each output
against that bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


class FP8Linear(nn.Module):
    """A linear layer with an e4m3 weight and a per-output-channel scale."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        peak = weight.abs().amax(dim=1, keepdim=True)
        # An all-zero row keeps scale 1: its codes are 0 and dequantise to 0 either way.
        scale = torch.where(peak > 0, peak / FP8_MAX, torch.ones_like(peak))
        self.register_buffer("weight_fp8", (weight / scale).to(FP8))
        self.register_buffer("scale", scale.squeeze(1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def dequantised_weight(self, dtype: torch.dtype) -> Tensor:
        """[out, in]: the weight as the matmul sees it."""
        return self.weight_fp8.to(dtype) * self.scale.to(dtype).unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantised_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3fn"


def quantise_linears(model: nn.Module, *, min_features: int = 256) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` with in and out features both
    ``>= min_features`` by an :class:`FP8Linear`; the names of the replaced modules, in
    ``named_modules`` order. Meant for an eval-mode model being served: the fp8 weights have
    no gradient. Weights that are not ``nn.Linear`` modules (embedding tables, MLPG's
    batched branch weights, HSTU's fused U/V/Q/K projection) stay as they are."""
    if min_features < 1:
        raise ValueError(f"min_features must be >= 1, got {min_features}")
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and min(module.in_features, module.out_features) >= min_features
    ]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = parent.get_submodule(child)
        assert isinstance(linear, nn.Linear)
        replacement = FP8Linear(linear).to(linear.weight.device)
        setattr(parent, child, replacement)
    return chosen
