"""Packed <-> padded conversions (differentiable), for the dense reference and baselines."""

from __future__ import annotations

from torch import Tensor

from flexgr.masks.layout import seq_ids_and_local


def lengths_of(offsets: Tensor) -> Tensor:
    return offsets[1:] - offsets[:-1]


def to_padded(x_T: Tensor, offsets: Tensor, max_len: int) -> Tensor:
    """[T, ...] -> [B, max_len, ...], zeros after each sequence's end."""
    seq, local = seq_ids_and_local(offsets, x_T.shape[0])
    B = offsets.numel() - 1
    out = x_T.new_zeros((B, max_len, *x_T.shape[1:]))
    return out.index_put((seq.long(), local.long()), x_T)


def to_jagged(x_BN: Tensor, offsets: Tensor, total_len: int) -> Tensor:
    """[B, N, ...] -> [T, ...], dropping the padding."""
    seq, local = seq_ids_and_local(offsets, total_len)
    return x_BN[seq.long(), local.long()]
