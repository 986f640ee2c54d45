"""The native Triton backend of ``hstu_attention``.

Kernels live in ``flexgr.ops.triton_hstu`` (imported lazily, so flexgr works without triton).
Masks built by ``build_hstu_mask`` and ``build_semi_local_mask`` carry a ``MaskSpec`` that the
kernels evaluate inline; a custom mask_mod (``spec is None``) falls back to the flex backend (the
dense oracle on CPU) with a one-time warning, so a call never returns a wrong result.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor

from flexgr.masks.block import HSTUMask, MaskSpec
from flexgr.ops.rab import RelativeBias

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | None = None) -> bool:
    """True when triton imports and the kernels can run on ``device`` (CUDA, or any device under
    ``TRITON_INTERPRET=1``); without a device, whether CUDA is there at all."""
    if not _triton_imports():
        return False
    if _interpreting():
        return True
    if device is not None:
        return torch.device(device).type == "cuda"
    return torch.cuda.is_available()


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"flexgr: backend='triton' falls back to flex: {reason}", stacklevel=4)


def _fallback(
    q: Tensor, k: Tensor, v: Tensor, mask: HSTUMask, *, max_seq_len: int, alpha: float,
    rab: RelativeBias | None, reason: str,
) -> Tensor:
    _warn_fallback(reason)
    if q.device.type == "cuda":
        from flexgr.ops.flex import hstu_attention_flex

        return hstu_attention_flex(q, k, v, mask, max_seq_len=max_seq_len, alpha=alpha, rab=rab)
    from flexgr.ops.reference import hstu_attention_custom_mask

    return hstu_attention_custom_mask(q, k, v, mask, max_seq_len=max_seq_len, alpha=alpha, rab=rab)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec | None) -> str | None:
    """Why the kernels cannot take these tensors and mask rule (None: they can)."""
    if spec is None:
        return "custom mask_mod (no MaskSpec to evaluate inline)"
    if not available(q.device):
        return f"triton cannot run on {q.device} (set TRITON_INTERPRET=1 for CPU)"
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype}"
    if max(q.shape[2], v.shape[2]) > MAX_HEAD_DIM:
        return f"head dim above {MAX_HEAD_DIM}"
    return None


def hstu_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, mask: HSTUMask, *, max_seq_len: int, alpha: float,
    rab: RelativeBias | None = None,
) -> Tensor:
    """out_i = sum_j silu(alpha q_i.k_j + rab_ij) mask_ij v_j / max_seq_len, q, k: [T, H, Dqk],
    v: [T, H, Dv] packed; returns [T, H, Dv] in v's dtype."""
    reason = unsupported_reason(q, k, v, mask.spec)
    if reason is not None:
        return _fallback(q, k, v, mask, max_seq_len=max_seq_len, alpha=alpha, rab=rab, reason=reason)
    if q.shape[0] != mask.total_len:
        raise ValueError(f"q has {q.shape[0]} tokens but the mask was built for {mask.total_len}")
    if q.shape[0] == 0:
        return v.new_zeros(v.shape)
    from flexgr.ops.triton_hstu import launch

    from flexgr.ops import triton_ops

    pos_w = rab.pos_w if rab is not None else None
    ts_w = rab.ts_w if rab is not None else None
    # Under torch.compile one opaque custom op per layer (flexgr/ops/triton_ops.py).
    return triton_ops.attention(
        q, k, v, pos_w, ts_w, launch.mask_tables(mask, rab), float(alpha), int(max_seq_len)
    )
