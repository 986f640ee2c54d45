"""Settings of flexgr's Triton kernels: one typed object, set from the run config's [kernel].

These used to be environment variables read at every launch. Now a run sets them once
(``flexgr.train`` calls :func:`set_kernel_options` with ``cfg.kernel``), library users call
:func:`set_kernel_options` or use :func:`kernel_options_set` for a block, and the tuned-tile
cache key includes them (a tile tuned under one backward mode is not reused under another).
Environment variables are left for paths and launcher values only (docs/train.md#environment).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal


@dataclass
class KernelOptions:
    # Time 2-3 tile candidates per shape bucket on the first call and keep the fastest; off:
    # the first candidate (faster start, e.g. for tests and short runs).
    autotune: bool = True
    # Backward kernels: "auto" times split / fused / merged on the first call of a bucket and
    # keeps the fastest (docs/triton-kernel.md); the others pin one.
    backward: Literal["auto", "split", "fused", "merged"] = "auto"
    # Lane copies L of the bias-table gradients (a power of two, 1..64): one atomic instruction
    # never adds twice into one address. 16 measured 18x faster than 1 (BENCHMARKS.md).
    rab_lanes: int = 16
    # Launch order of tiles: heaviest first ("lpt") in the forward only (measured fastest), in
    # the backward too ("lpt_all"), or natural order everywhere ("natural"). For ablations.
    tile_order: Literal["lpt", "lpt_all", "natural"] = "lpt"
    # The approximate SiLU of the bf16/fp16 kernels (fp32 always runs exact). For ablations.
    fast_silu: bool = True
    # Context parallelism: MiB of gathered K/V one head pass may hold (docs/distributed.md);
    # 0 = one head per pass, a negative value = all heads in one pass (no head passes).
    cp_pass_mib: float = 64.0
    # On CUDA, how each batch's band mask tables (flexgr/masks/band.py) are built: "triton",
    # two launches of flexgr/ops/triton_hstu/prepare.py (with HSTU's per-token bias tables);
    # "compiled", one torch.compile graph with dynamic shapes; "eager", a few dozen launches.
    # "triton" runs "compiled" where the Triton kernels cannot (no triton). CPU: always eager.
    prepare: Literal["triton", "compiled", "eager"] = "triton"
    # M-FALCON's cached candidate step (flexgr/model/hstu/falcon.py) on the delta-query kernel
    # (flexgr/ops/triton_hstu/delta.py, one launch per layer) instead of batched matmuls. Off
    # until it is timed on a GPU; tested against the eager step in Triton's interpreter.
    delta_query: bool = False
    # The relative bias as tiles (flexgr/ops/triton_hstu/rab_tiles.py): per batch the slot
    # tables of the visited mask blocks, per layer their bias values filled by a Triton kernel
    # (rab_tile_kernels.py), read by the attention kernels with plain 2-D loads; the backward
    # adds dS per pair and a second kernel reduces it into the tables (no host sync per layer).
    # Costs memory per visited block pair (docs/triton-kernel.md, "Bias as tiles"). Off: the
    # inline path (two table reads and two table atomics per element).
    rab_tiles: bool = False
    # Threads that compile a tuning key's tile candidates at once before they are timed (the
    # first call of a new shape bucket or option set compiles every candidate: ~13 compiles
    # for a forward and an "auto" backward). 0 or 1: one after another. Off until measured on
    # a GPU (the speed-up depends on how much of Triton's compile releases the GIL).
    tuning_threads: int = 0

    def __post_init__(self) -> None:
        lanes = self.rab_lanes
        if not 1 <= lanes <= 64 or lanes & (lanes - 1):
            raise ValueError(f"kernel.rab_lanes must be a power of two in 1..64, got {lanes}")
        if self.backward not in ("auto", "split", "fused", "merged"):
            raise ValueError(
                f"kernel.backward must be auto, split, fused or merged, got {self.backward!r}"
            )
        if self.prepare not in ("triton", "compiled", "eager"):
            raise ValueError(
                f"kernel.prepare must be triton, compiled or eager, got {self.prepare!r}"
            )
        if self.tuning_threads < 0:
            raise ValueError(f"kernel.tuning_threads must be >= 0, got {self.tuning_threads}")
        if self.tile_order not in ("lpt", "lpt_all", "natural"):
            raise ValueError(
                f"kernel.tile_order must be lpt, lpt_all or natural, got {self.tile_order!r}"
            )

    def cache_key(self) -> str:
        """The settings that change which tile or backward mode tuning picks."""
        return (
            f"bwd={self.backward},lanes={self.rab_lanes},order={self.tile_order},"
            f"fast={self.fast_silu},tiles={self.rab_tiles}"
        )


_current = KernelOptions()


def kernel_options() -> KernelOptions:
    return _current


def set_kernel_options(options: KernelOptions) -> None:
    """Use ``options`` from now on (a checked copy: later changes to the object do not leak)."""
    global _current
    _current = dataclasses.replace(options)


@contextlib.contextmanager
def kernel_options_set(**changes: object) -> Iterator[KernelOptions]:
    """``with kernel_options_set(backward="split"): ...``: the current options with some
    fields changed, restored afterwards."""
    previous = _current
    set_kernel_options(dataclasses.replace(previous, **changes))  # type: ignore[arg-type]
    try:
        yield _current
    finally:
        set_kernel_options(previous)
