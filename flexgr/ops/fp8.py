"""FP8 (e4m3) linear layers with row-wise scales, for HSTU's UVQK and output projections.

ULTRA-HSTU runs the pre-attention (UVQK) and post-attention (output) GEMMs in FP8 and keeps
attention in BF16. Here, for ``y = x @ w (+ bias)`` with x [M, K] and w [K, N]:

- every row of x gets its own scale ``s_x[m] = amax(|x[m, :]|) / 448`` and every output column
  of w its own ``s_w[n] = amax(|w[:, n]|) / 448`` (448 is e4m3's largest finite value);
- ``xq = e4m3(x / s_x)``, ``wq = e4m3(w / s_w)`` (round to nearest, saturating at 448);
- ``y = (xq @ wq) * s_x s_w^T (+ bias)``, accumulated in fp32, returned in the compute dtype
  (bf16 under autocast).

On a GPU that has row-wise scaled FP8 GEMMs (compute capability 9.0+: H100, H200) and shapes
whose K and N are multiples of 16, the product is ``torch._scaled_mm``. Everywhere else
(CPU, older GPUs, odd shapes) the same quantisation is emulated: dequantised e4m3 values
multiplied in fp32, which is what the tests check the math with.

Backward: straight-through. The quantisation is treated as the identity, and the gradients
``dx = dy @ w^T`` and ``dw = x^T @ dy`` are computed from the unquantised x and w in the
compute dtype (bf16 under autocast). The paper quantises the forward GEMMs only; an FP8
backward (e5m2 gradients) would save more time but adds gradient error this module does not
take on. The cost: x is saved in the compute dtype, as a bf16 linear would save it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_TINY = 1e-12  # an all-zero row gets this amax, so its scale is finite and its values 0


def rowwise_scale(x: Tensor) -> Tensor:
    """fp32 [M, 1]: ``amax(|x[m, :]|) / 448`` of each row of a 2-D tensor."""
    return x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / E4M3_MAX


def quantize_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """(e4m3 [M, K], fp32 scales [M, 1]) with ``x ~ dequantize(*quantize_rowwise(x))``."""
    scale = rowwise_scale(x)
    q = (x.detach().float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale


@functools.cache
def _scaled_mm_on(device_index: int) -> bool:
    major, _ = torch.cuda.get_device_capability(device_index)
    return major >= 9 and hasattr(torch, "_scaled_mm")


def uses_scaled_mm(x: Tensor, w: Tensor) -> bool:
    """True where :func:`fp8_linear` runs ``torch._scaled_mm`` (else the emulation)."""
    if x.device.type != "cuda":
        return False
    K, N = w.shape
    return K % 16 == 0 and N % 16 == 0 and _scaled_mm_on(x.device.index or 0)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fp8_matmul(x_MK: Tensor, w_KN: Tensor, out_dtype: torch.dtype) -> Tensor:
    """The forward product of :func:`fp8_linear` (no autograd; autocast off inside, so the
    emulation multiplies in fp32 whatever the caller's autocast)."""
    with torch.autocast(x_MK.device.type, enabled=False):
        return _fp8_matmul(x_MK, w_KN, out_dtype)


def _fp8_matmul(x_MK: Tensor, w_KN: Tensor, out_dtype: torch.dtype) -> Tensor:
    xq, sx = quantize_rowwise(x_MK)
    wq_NK, sw = quantize_rowwise(w_KN.t())
    if uses_scaled_mm(x_MK, w_KN) and out_dtype in (torch.bfloat16, torch.float32):
        # b must be column-major: the transpose of a contiguous [N, K].
        return torch._scaled_mm(
            xq, wq_NK.contiguous().t(), scale_a=sx, scale_b=sw.t().contiguous(),
            out_dtype=torch.bfloat16,
        ).to(out_dtype)
    return (dequantize(xq, sx) @ dequantize(wq_NK, sw).t()).to(out_dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x_MK: Tensor,
        w_KN: Tensor,
        bias: Tensor | None,
        dtype: torch.dtype,
    ):
        ctx.save_for_backward(x_MK.to(dtype), w_KN)
        ctx.x_dtype = x_MK.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.dtype = dtype
        y = fp8_matmul(x_MK, w_KN, dtype)
        return y + bias.to(dtype) if bias is not None else y

    @staticmethod
    def backward(ctx, grad_MN: Tensor):
        x_MK, w_KN = ctx.saved_tensors
        g = grad_MN.to(ctx.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (g @ w_KN.to(ctx.dtype).t()).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = (x_MK.t() @ g).to(w_KN.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            acc = torch.promote_types(grad_MN.dtype, torch.float32)
            db = grad_MN.sum(0, dtype=acc).to(ctx.bias_dtype)
        return dx, dw, db, None


def fp8_linear(x: Tensor, w_KN: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ w_KN + bias`` with FP8 row-wise quantised operands (see the module docstring).
    ``x`` is [..., K]; the result is [..., N] in the compute dtype."""
    lead = x.shape[:-1]
    dtype = _compute_dtype(x)
    y = _FP8Linear.apply(x.reshape(-1, x.shape[-1]), w_KN, bias, dtype)
    return y.reshape(*lead, w_KN.shape[1])
