"""Coarser Triton tiles for interpreter tests whose subject is not the tiling."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flexgr.ops.triton_hstu import tuning
from flexgr.ops.triton_hstu.tuning import TileConfig


@contextmanager
def coarse_tiles(size: int = 64) -> Iterator[None]:
    """Every kernel (forward, dq, dk/dv, and so fused and merged) on ``size`` x ``size`` tiles.

    Triton's interpreter spends its time per tile visit, not per element: 64-row tiles (two
    sub-tiles per 128-token mask block instead of the interpreter default's four) run a quarter
    of the visits. The default tiles keep their own tests (tests/ops/test_triton.py)."""
    tile = TileConfig(size, size, 4, 1)
    for kind in ("fwd", "dq", "dkdv"):
        tuning.force(kind, tile)
    try:
        yield
    finally:
        for kind in ("fwd", "dq", "dkdv"):
            tuning.force(kind, None)
