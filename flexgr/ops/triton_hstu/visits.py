"""The attention kernels' loop bounds in plain Python, from a BlockMask's tables alone.

Each program of ``forward.py`` / ``backward.py`` runs two loops: over the partial blocks of its
mask row (or column), element rule inline, then over the full ones, unmasked; a mask block is
walked as ``mask_block // tile`` sub-tiles. These functions give those trip counts per program
the way the kernels compute them, so tests can hold the kernels to them (counted in the
interpreter) and hold them to the blocks the mask needs, and benchmarks can show what a
program does: a kernel is never faster than its longest program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask


@dataclass(frozen=True)
class LoopTrips:
    """Iterations per program (one head; every head's programs run the same), [programs]."""

    partial: Tensor  # of the loop that evaluates the element rule
    full: Tensor  # of the loop that does not

    @property
    def total(self) -> Tensor:
        return self.partial + self.full


def _per_program(counts: Tensor, mask_block: int, tile: int, sub_tiles: int) -> Tensor:
    """Programs of ``tile`` rows read mask row ``start // mask_block`` (so ``mask_block //
    tile`` programs share one) and walk each listed block in ``sub_tiles`` sub-tiles."""
    return counts.long().cpu().repeat_interleave(mask_block // tile) * sub_tiles


def query_tile_trips(block_mask: BlockMask, block_m: int, block_n: int) -> LoopTrips:
    """Forward and dq programs: one per ``block_m`` query rows, walking ``kv_indices`` then
    ``full_kv_indices`` of their mask row in ``block_n``-key sub-tiles."""
    mbq, mbkv = (int(b) for b in block_mask.BLOCK_SIZE)
    _check(mbq, mbkv, block_m, block_n)
    sub = mbkv // block_n
    full = _full_or_zeros(block_mask.full_kv_num_blocks, block_mask.kv_num_blocks)
    return LoopTrips(
        _per_program(block_mask.kv_num_blocks[0, 0], mbq, block_m, sub),
        _per_program(full, mbq, block_m, sub),
    )


def key_tile_trips(block_mask: BlockMask, block_m: int, block_n: int) -> LoopTrips:
    """dk/dv programs: one per ``block_n`` keys, walking ``q_indices`` then ``full_q_indices``
    of their mask column in ``block_m``-query sub-tiles."""
    mbq, mbkv = (int(b) for b in block_mask.BLOCK_SIZE)
    _check(mbq, mbkv, block_m, block_n)
    if block_mask.q_num_blocks is None:
        raise ValueError("the BlockMask lacks its transposed q_* tables")
    sub = mbq // block_m
    full = _full_or_zeros(block_mask.full_q_num_blocks, block_mask.q_num_blocks)
    return LoopTrips(
        _per_program(block_mask.q_num_blocks[0, 0], mbkv, block_n, sub),
        _per_program(full, mbkv, block_n, sub),
    )


def _full_or_zeros(full: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like[0, 0]) if full is None else full[0, 0]


def _check(mbq: int, mbkv: int, block_m: int, block_n: int) -> None:
    if mbq % block_m or mbkv % block_n:
        raise ValueError(
            f"tiles ({block_m}, {block_n}) do not divide the mask blocks ({mbq}, {mbkv})"
        )
