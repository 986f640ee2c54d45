"""Tile configurations: a few candidates per kernel, timed on the first call of a shape bucket.

The key buckets the padded length by octave, so a training run tunes a handful of times (each a
few compiles and ~20 ms of timing per candidate), and the choice is cached for the process.
Candidates the device cannot run (shared memory, registers) are skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Hashable

import triton


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


# Forward and dq walk key tiles for a fixed query tile; dk/dv walks query tiles for a key tile.
# Candidates: configurations without register spills at D=128 on sm_90 (ptxas report), pruned
# after the second H100 benchmark run to the winners and near-winners of its timings; the first
# is the default when tuning is off. See docs/triton-kernel.md.
FWD_CANDIDATES = (
    TileConfig(64, 64, 4, 3),
    TileConfig(128, 128, 8, 2),
    TileConfig(128, 128, 8, 3),
)
DQ_CANDIDATES = (
    TileConfig(64, 64, 4, 3),
    TileConfig(128, 64, 8, 2),
)
DKDV_CANDIDATES = (
    TileConfig(64, 64, 4, 3),
    TileConfig(32, 64, 4, 3),
    TileConfig(64, 128, 8, 3),
)
FUSED_CANDIDATES = (
    TileConfig(64, 128, 8, 3),
    TileConfig(32, 64, 4, 3),
)
# (dk/dv tile, dq tile) of the merged backward launch; warps and stages come from the first.
MERGED_CANDIDATES = (
    (TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 3)),
    (TileConfig(32, 64, 4, 3), TileConfig(64, 64, 4, 3)),
    (TileConfig(64, 128, 8, 3), TileConfig(128, 64, 8, 3)),
)
# Head dims above 128 need smaller tiles to fit shared memory; the smallest always fits.
SMALL = TileConfig(64, 32, 4, 2)
INTERPRET = TileConfig(32, 32, 4, 1)

_chosen: dict[Hashable, object] = {}
_timings: dict[Hashable, dict[object, float]] = {}
_forced: dict[str, TileConfig] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("FLEXGR_TRITON_AUTOTUNE", "1") != "0"


def force(kind: str, config: TileConfig | None) -> None:
    """Pin one kernel's tile (tests use it to cover sub-tiling); None unpins."""
    if config is None:
        _forced.pop(kind, None)
    else:
        _forced[kind] = config
    _chosen.clear()


def fits(cfg: TileConfig, mask_block_q: int, mask_block_kv: int) -> bool:
    return mask_block_q % cfg.block_m == 0 and mask_block_kv % cfg.block_n == 0


_POOLS = {"fwd": FWD_CANDIDATES, "dq": DQ_CANDIDATES, "dkdv": DKDV_CANDIDATES,
          "fused": FUSED_CANDIDATES}


def default(kind: str, head_dim: int, mask_block_q: int, mask_block_kv: int) -> TileConfig:
    if kind == "fused" and "dkdv" in _forced:
        return _forced["dkdv"]
    if kind in _forced:
        return _forced[kind]
    if interpreting():
        cfg = INTERPRET
    elif head_dim > 128:
        cfg = SMALL
    else:
        cfg = _POOLS[kind][0]
    return TileConfig(
        min(cfg.block_m, mask_block_q), min(cfg.block_n, mask_block_kv), cfg.num_warps, cfg.num_stages
    )


def candidates(kind: str, head_dim: int, mask_block_q: int, mask_block_kv: int) -> list[TileConfig]:
    if kind in _forced or (kind == "fused" and "dkdv" in _forced) or not autotune_enabled():
        return [default(kind, head_dim, mask_block_q, mask_block_kv)]
    pool = _POOLS[kind]
    if head_dim > 128:
        pool = pool + (SMALL,)
    found = [c for c in pool if fits(c, mask_block_q, mask_block_kv)]
    return found or [default(kind, head_dim, mask_block_q, mask_block_kv)]


def merged_candidates(
    head_dim: int, mask_block_q: int, mask_block_kv: int
) -> list[tuple[TileConfig, TileConfig]]:
    if "dkdv" in _forced or "dq" in _forced or not autotune_enabled() or head_dim > 128:
        return [(default("dkdv", head_dim, mask_block_q, mask_block_kv),
                 default("dq", head_dim, mask_block_q, mask_block_kv))]
    found = [(a, b) for a, b in MERGED_CANDIDATES
             if fits(a, mask_block_q, mask_block_kv) and fits(b, mask_block_q, mask_block_kv)]
    return found or [(default("dkdv", head_dim, mask_block_q, mask_block_kv),
                      default("dq", head_dim, mask_block_q, mask_block_kv))]


def time_ms(launch: Callable[[], None]) -> float:
    return float(triton.testing.do_bench(launch, warmup=5, rep=20, return_mode="median"))


def pick(key: Hashable, options: list, launch: Callable[[object], None]):  # noqa: ANN201
    """Fastest of ``options`` for ``key``; ``launch(cfg)`` runs the kernel once."""
    if key in _chosen:
        return _chosen[key]  # type: ignore[return-value]
    if len(options) == 1:
        _chosen[key] = options[0]
        return options[0]
    best, best_ms, errors = None, float("inf"), []
    for cfg in options:
        try:
            ms = time_ms(lambda: launch(cfg))
        except Exception as exc:  # out of shared memory / registers on this device
            errors.append(f"{cfg}: {type(exc).__name__}: {exc}"[:300])
            continue
        _timings.setdefault(key, {})[cfg] = ms
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError("flexgr triton: no tile configuration runs here:\n" + "\n".join(errors))
    _chosen[key] = best
    return best


def timings() -> dict[Hashable, dict[object, float]]:
    """Median ms of every candidate timed so far, per key (for benchmarks and notes)."""
    return {k: dict(v) for k, v in _timings.items()}


def chosen() -> dict[Hashable, object]:
    """What the tuner picked so far (for benchmarks and notes)."""
    return dict(_chosen)
