"""Entry point of the native Triton backend (the kernel itself lands with its own issue)."""

from __future__ import annotations

from torch import Tensor

from flexgr.masks.block import HSTUMask
from flexgr.ops.rab import RelativeBias


def available() -> bool:
    return False


def hstu_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, mask: HSTUMask, *, max_seq_len: int, alpha: float,
    rab: RelativeBias | None = None,
) -> Tensor:
    raise NotImplementedError("backend='triton' is not available yet; use backend='flex'")
