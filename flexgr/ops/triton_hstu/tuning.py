"""Tile configurations: a few candidates per kernel, timed on the first call of a shape bucket.

The key buckets the padded length by octave, so a training run tunes a handful of times (each a
few compiles and ~20 ms of timing per candidate). Choices are kept for the process and on disk
(``FLEXGR_TRITON_TILE_CACHE``, default ``~/.cache/flexgr/triton/tiles.json``; ``0`` turns it off),
keyed by GPU model, torch and triton versions and a hash of the kernel sources: later processes
compile only the chosen tiles and time nothing. Candidates the device cannot run (shared memory,
registers) are skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Callable, Hashable

import torch
import triton

from flexgr.ops.kernel_options import kernel_options


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
# Forward: 128 query rows on 4 warps with 64-key sub-tiles beat every 8-warp tile by 20-25% at
# N = 4096 and 8192 in the 2026-11-23 H100 sweep (BENCHMARKS.md); (64, 64) stays for short rows.
FWD_CANDIDATES = (
    TileConfig(128, 64, 4, 3),
    TileConfig(128, 64, 4, 4),
    TileConfig(64, 64, 4, 3),
)
# Forward with the relative bias: the per-element gathers of the bias tables need registers the
# plain forward's first tile does not have; at 16 x [2048, 4096], D=128 on the H200
# (benchmarks/rab_cost.py, 2026-12-02) it spilled 338 registers and ran 10.0 ms against these
# three's 4.76, 5.17 and 5.12 ms.
FWD_RAB_CANDIDATES = (
    TileConfig(128, 32, 4, 3),
    TileConfig(128, 64, 8, 3),
    TileConfig(64, 32, 4, 3),
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
    return not interpreting() and kernel_options().autotune


def force(kind: str, config: TileConfig | None) -> None:
    """Pin one kernel's tile (tests use it to cover sub-tiling); None unpins."""
    if config is None:
        _forced.pop(kind, None)
    else:
        _forced[kind] = config
    _chosen.clear()


def fits(cfg: TileConfig, mask_block_q: int, mask_block_kv: int) -> bool:
    return mask_block_q % cfg.block_m == 0 and mask_block_kv % cfg.block_n == 0


_POOLS = {"fwd": FWD_CANDIDATES, "fwd_rab": FWD_RAB_CANDIDATES, "dq": DQ_CANDIDATES,
          "dkdv": DKDV_CANDIDATES, "fused": FUSED_CANDIDATES}


# A kind whose tile follows another's pin: the fused backward is a dk/dv kernel, the biased
# forward a forward.
_PINNED_WITH = {"fused": "dkdv", "fwd_rab": "fwd"}


def _pinned(kind: str) -> TileConfig | None:
    partner = _PINNED_WITH.get(kind, "")
    return _forced[partner] if partner in _forced else _forced.get(kind)


def default(kind: str, head_dim: int, mask_block_q: int, mask_block_kv: int) -> TileConfig:
    pinned = _pinned(kind)
    if pinned is not None:
        return pinned
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
    if _pinned(kind) is not None or not autotune_enabled():
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


def device_tag(device: torch.device) -> str:
    """What tuned tiles depend on besides the shape: the GPU model (not its index)."""
    if device.type != "cuda":
        return device.type
    return _cuda_tag(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_tag(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def _cache_path() -> Path | None:
    raw = os.environ.get("FLEXGR_TRITON_TILE_CACHE", "")
    if raw == "0":
        return None
    if raw:
        return Path(raw)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "flexgr" / "triton" / "tiles.json"


@functools.cache
def _fingerprint() -> str:
    """Versions and the kernel sources: a change to any of them makes old choices stale."""
    h = hashlib.sha256(f"{torch.__version__}|{triton.__version__}".encode())
    here = Path(__file__).parent
    for name in ("forward.py", "backward.py", "rules.py", "tuning.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _encode(option: object) -> Any:
    if isinstance(option, TileConfig):
        return list(astuple(option))
    if isinstance(option, tuple):
        return [_encode(o) for o in option]
    return option


def _read_store(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("fingerprint") != _fingerprint():
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def recall(key: Hashable, options: list | tuple) -> object | None:
    """The option stored on disk for ``key``, if it is still one of ``options``."""
    path = _cache_path()
    if path is None:
        return None
    stored = _read_store(path).get(repr(key))
    for option in options:
        if stored is not None and _encode(option) == stored:
            return option
    return None


def remember(key: Hashable, option: object) -> None:
    """Store ``option`` for ``key`` (read, merge, write a temporary file, rename: concurrent
    processes may drop each other's newest entry, never corrupt the file)."""
    path = _cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_store(path)
        entries[repr(key)] = _encode(option)
        data = {"fingerprint": _fingerprint(), "entries": entries}
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home must not stop training; the choice stays in this process


def time_ms(launch: Callable[[], None]) -> float:
    return float(triton.testing.do_bench(launch, warmup=5, rep=20, return_mode="median"))


def _compile_at_once(options: list, launch: Callable[[object], None]) -> None:
    """With ``kernel.tuning_threads`` > 1, launch every candidate once from a thread pool so
    that their compiles overlap; the timing loop then finds them compiled. Failures are left
    for the timing loop to report. The warm-up launches write garbage into the outputs on each
    thread's default stream, so the device is synchronised before anything else runs (the
    timing loop's launches write garbage too; the caller's final launch writes the result)."""
    threads = min(kernel_options().tuning_threads, len(options))
    if threads <= 1 or interpreting() or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()

    def warm(cfg: object) -> None:
        with torch.cuda.device(device):
            try:
                launch(cfg)
            except Exception:  # noqa: BLE001 - the timing loop reports it
                pass

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="flexgr-tile-compile") as pool:
        list(pool.map(warm, options))
    torch.cuda.synchronize(device)


def pick(key: Hashable, options: list, launch: Callable[[object], None]):  # noqa: ANN201
    """Fastest of ``options`` for ``key``; ``launch(cfg)`` runs the kernel once. The kernel
    options that change the timings are part of the key (in this process and on disk)."""
    key = (key, kernel_options().cache_key())
    if key in _chosen:
        return _chosen[key]  # type: ignore[return-value]
    if len(options) == 1:
        _chosen[key] = options[0]
        return options[0]
    stored = recall(key, options)
    if stored is not None:
        _chosen[key] = stored
        return stored
    _compile_at_once(options, launch)
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
    remember(key, best)
    return best


def timings() -> dict[Hashable, dict[object, float]]:
    """Median ms of every candidate timed so far, per key (for benchmarks and notes)."""
    return {k: dict(v) for k, v in _timings.items()}


def chosen() -> dict[Hashable, object]:
    """What the tuner picked so far (for benchmarks and notes)."""
    return dict(_chosen)
