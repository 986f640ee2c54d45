"""Host side: gather the kernels' inputs from an HSTUMask, pick tiles, launch."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from flexgr.masks.block import HSTUMask, MaskSpec
from flexgr.ops.kernel_options import kernel_options
from flexgr.ops.rab import RelativeBias
from flexgr.ops.triton_hstu import rab_tiles as tiles_mod
from flexgr.ops.triton_hstu import tuning
from flexgr.ops.triton_hstu.backward import (
    hstu_bwd_dkdv_kernel,
    hstu_bwd_dq_kernel,
    hstu_bwd_merged_kernel,
)
from flexgr.ops.triton_hstu.forward import hstu_fwd_kernel
from flexgr.ops.triton_hstu.rab_tiles import RabTiles
from flexgr.ops.triton_hstu.tuning import TileConfig


@dataclass(frozen=True)
class MaskTables:
    """Everything per batch that the kernels read besides q, k, v (shared by all heads)."""

    seq_id: Tensor  # [P] int32
    pos_id: Tensor  # [P] int32
    max_id: Tensor  # [P] int32
    local: Tensor  # [P] int32
    ts: Tensor  # [T] int64 (a placeholder without rab)
    next_ts: Tensor  # [T] int64
    kv_num: Tensor  # [P / MBQ] int32, partial KV blocks per query block
    kv_idx: Tensor  # [P / MBQ, P / MBKV] int32
    full_kv_num: Tensor
    full_kv_idx: Tensor
    q_num: Tensor  # [P / MBKV] int32, the transpose, for dk/dv
    q_idx: Tensor
    full_q_num: Tensor
    full_q_idx: Tensor
    mask_block_q: int
    mask_block_kv: int
    total_len: int
    padded_len: int
    spec: MaskSpec
    rab_n: int
    num_buckets: int
    inv_bucket_div: float  # fp32 reciprocal, as torch's CUDA division by a scalar uses
    # The bias as tiles (kernel.rab_tiles): the slot tables, once per batch; None when the
    # tables were built with the option off (or without a bias).
    rab_tiles: RabTiles | None = field(default=None, compare=False)

    def tile_order(self, side: str, block: int) -> Tensor:
        """Launch order of tiles. Forward ("q"): heaviest first (most mask blocks to visit), the
        longest-processing-time rule, so the short tiles of a jagged batch fill in behind the
        long ones (measured 6% faster at 8 x 8192). Split backward kernels ("kv" for dk/dv,
        "q_bwd" for dq): tile order, which measured ~5% faster than heaviest-first in two of
        three runs (docs/triton-kernel.md); kernel.tile_order = "lpt_all" restores LPT there."""
        key = (side, block, kernel_options().tile_order)
        orders = _orders_of(self.kv_num)
        if key not in orders:
            if side in ("q", "q_bwd"):  # query tiles walk KV blocks
                work, mask_block = self.kv_num + self.full_kv_num, self.mask_block_q
            else:
                work, mask_block = self.q_num + self.full_q_num, self.mask_block_kv
            per_tile = work.repeat_interleave(mask_block // block)
            order_rule = kernel_options().tile_order
            lpt = order_rule == "lpt_all" or (order_rule == "lpt" and side == "q")
            if lpt:
                order = torch.argsort(per_tile, descending=True, stable=True)
            else:
                order = torch.arange(per_tile.numel(), device=per_tile.device)
            orders[key] = order.to(torch.int32)
        return orders[key]

    def merged_order(self, kv_block: int, q_block: int) -> Tensor:
        """Virtual program ids of the merged backward launch, heaviest first: ids below the
        number of key tiles are dk/dv programs (4 products per visited element), the rest dq
        programs (3 products)."""
        key = ("merged", kv_block * 1000 + q_block, kernel_options().tile_order)
        orders = _orders_of(self.kv_num)
        if key not in orders:
            kv_work = (self.q_num + self.full_q_num).repeat_interleave(self.mask_block_kv // kv_block)
            q_work = (self.kv_num + self.full_kv_num).repeat_interleave(self.mask_block_q // q_block)
            cost = torch.cat([4 * kv_block * kv_work, 3 * q_block * q_work])
            if kernel_options().tile_order == "natural":
                order = torch.arange(cost.numel(), device=cost.device)
            else:
                order = torch.argsort(cost, descending=True, stable=True)
            orders[key] = order.to(torch.int32)
        return orders[key]


# Tile orders by the id of the tables' kv_num tensor, dropped when it dies. Every MaskTables
# around the same tensors shares them: one with a bias added by dataclasses.replace, and the
# custom op's unpacking, which rebuilds MaskTables on every call and would otherwise sort the
# tiles again each time. (A WeakKeyDictionary cannot hold tensors: it compares keys with ==.)
_orders_by_tables: dict[int, dict] = {}


def _orders_of(kv_num: Tensor) -> dict:
    key = id(kv_num)
    orders = _orders_by_tables.get(key)
    if orders is None:
        orders = _orders_by_tables[key] = {}
        weakref.finalize(kv_num, _orders_by_tables.pop, key, None)
    return orders


def _rows(x: Tensor | None, like: Tensor) -> Tensor:
    if x is None:  # no full blocks at all
        return torch.zeros_like(like)
    return x[0, 0].contiguous()


# One entry per live BlockMask: a model's layers share one mask per batch, so the tables (and the
# tile orders) are prepared once per batch, not once per layer.
_tables_cache: "weakref.WeakKeyDictionary[object, MaskTables]" = weakref.WeakKeyDictionary()


def mask_tables(mask: HSTUMask, rab: RelativeBias | None) -> MaskTables:
    if rab is None:
        return bias_tables(mask)
    return bias_tables(
        mask,
        positions=rab.positions,
        timestamps=rab.timestamps,
        next_timestamps=rab.next_timestamps,
        rab_n=rab.max_len,
        num_buckets=rab.num_buckets,
        bucket_divisor=rab.bucket_divisor,
    )


def bias_tables(
    mask: HSTUMask,
    *,
    positions: Tensor | None = None,
    timestamps: Tensor | None = None,
    next_timestamps: Tensor | None = None,
    rab_n: int = 0,
    num_buckets: int = 0,
    bucket_divisor: float = 1.0,
) -> MaskTables:
    """The kernel's tables for ``mask``, with the relative bias's per-token tables when
    ``timestamps`` is given (``rab_n`` = N of the position table, ``num_buckets`` of the time
    table). Callers that know the bias's sizes ahead of the weights (a model's prepare) use
    this directly."""
    try:
        base = _tables_cache.get(mask.block_mask)
    except TypeError:  # not weak-referenceable
        base = None
    if base is None or base.seq_id is not mask.layout.seq_id:
        base = _mask_only_tables(mask)
        try:
            _tables_cache[mask.block_mask] = base
        except TypeError:
            pass
    if timestamps is None or next_timestamps is None:
        return base
    local = base.local
    if positions is not None:  # e.g. HSTU position ids, so that candidates share a position
        pad = mask.padded_len - mask.total_len
        local = torch.nn.functional.pad(positions.to(torch.int32), (0, pad)).contiguous()
    tab = dataclasses.replace(
        base,
        local=local,
        ts=timestamps.to(torch.int64).contiguous(),
        next_ts=next_timestamps.to(torch.int64).contiguous(),
        rab_n=rab_n,
        num_buckets=num_buckets,
        inv_bucket_div=float(np.float32(1.0) / np.float32(bucket_divisor)),
    )
    if not kernel_options().rab_tiles:
        return tab
    return dataclasses.replace(tab, rab_tiles=_cached_tiles(mask, tab))


# The slot tables of each live BlockMask: the per-call path (``mask_tables`` on every layer)
# would otherwise rebuild them, and pay their host sync, per layer. They depend on the block
# lists only (the fill and reduce kernels read the bias's per-token tables themselves), so the
# bias is no part of the key.
_tiles_cache: "weakref.WeakKeyDictionary[object, tuple[Tensor, RabTiles]]" = (
    weakref.WeakKeyDictionary()
)


def _cached_tiles(mask: HSTUMask, tab: MaskTables) -> RabTiles:
    try:
        entry = _tiles_cache.get(mask.block_mask)
    except TypeError:  # not weak-referenceable
        entry = None
    if entry is not None and entry[0] is tab.kv_num:
        return entry[1]
    built = tiles_mod.build(tab)
    try:
        _tiles_cache[mask.block_mask] = (tab.kv_num, built)
    except TypeError:
        pass
    return built


def rab_tiles_of(tab: MaskTables) -> RabTiles:
    """The tables' slot tables; they are built once per batch with the bias tables
    (``bias_tables``, ``prepare.kernel_tables``) while kernel.rab_tiles is on. Building them
    here instead would cost their host sync (the slot count) on every layer's call."""
    if tab.rab_tiles is None:
        raise ValueError(
            "kernel.rab_tiles is on but these kernel tables were built without it: build them "
            "(launch.bias_tables / prepare.kernel_tables) with the option on"
        )
    return tab.rab_tiles


def _mask_only_tables(mask: HSTUMask) -> MaskTables:
    bm = mask.block_mask
    lay = mask.layout
    if bm.kv_indices.shape[0] != 1 or bm.kv_indices.shape[1] != 1:
        raise ValueError("triton backend: the BlockMask must have B = H = 1 (one packed batch)")
    if bm.q_indices is None:
        raise ValueError("triton backend: the BlockMask lacks its transposed q_* blocks")
    mbq, mbkv = bm.BLOCK_SIZE
    if mask.padded_len % mbq or mask.padded_len % mbkv:
        raise ValueError("triton backend: the padded length must be a multiple of the mask blocks")
    kv_num = bm.kv_num_blocks[0, 0].contiguous()
    kv_idx = bm.kv_indices[0, 0].contiguous()
    q_num = bm.q_num_blocks[0, 0].contiguous()
    q_idx = bm.q_indices[0, 0].contiguous()
    ts = next_ts = lay.seq_id.new_zeros(1, dtype=torch.int64)  # replaced when there is a rab
    return MaskTables(
        seq_id=lay.seq_id.to(torch.int32).contiguous(),
        pos_id=lay.pos_id.to(torch.int32).contiguous(),
        max_id=lay.max_id.to(torch.int32).contiguous(),
        local=lay.local.to(torch.int32).contiguous(),
        ts=ts,
        next_ts=next_ts,
        kv_num=kv_num.to(torch.int32),
        kv_idx=kv_idx.to(torch.int32),
        full_kv_num=_rows(bm.full_kv_num_blocks, bm.kv_num_blocks).to(torch.int32),
        full_kv_idx=_rows(bm.full_kv_indices, bm.kv_indices).to(torch.int32),
        q_num=q_num.to(torch.int32),
        q_idx=q_idx.to(torch.int32),
        full_q_num=_rows(bm.full_q_num_blocks, bm.q_num_blocks).to(torch.int32),
        full_q_idx=_rows(bm.full_q_indices, bm.q_indices).to(torch.int32),
        mask_block_q=int(mbq),
        mask_block_kv=int(mbkv),
        total_len=mask.total_len,
        padded_len=mask.padded_len,
        spec=mask.spec,  # type: ignore[arg-type]  # checked by the caller
        rab_n=1,
        num_buckets=0,
        inv_bucket_div=1.0,
    )


def _mask_flags(tab: MaskTables, has_rab: bool) -> dict[str, object]:
    spec = tab.spec
    window = spec.has_window
    return dict(
        HAS_TARGETS=spec.has_targets,
        HAS_CONTEXT=spec.contextual_len > 0,
        HAS_WINDOW=window,
        HAS_TAIL=window and spec.full_attn_tail > 0,
        HAS_GLOBAL=window and spec.global_len > 0,
        HAS_RAB=has_rab,
        # In the flags, so also in the tuning and backward-mode keys (the tiles path's best
        # tile and mode need not be the inline path's).
        RAB_TILES=has_rab and kernel_options().rab_tiles,
    )


def _scalars(tab: MaskTables, alpha: float, out_scale: float) -> tuple[object, ...]:
    spec = tab.spec
    return (
        tab.total_len, float(alpha), float(out_scale), int(spec.max_attn_len),
        int(spec.full_attn_tail), int(spec.global_len), tab.rab_n, tab.num_buckets,
        tab.inv_bucket_div,
    )


def _block_dim(d: int) -> int:
    # Not triton.next_power_of_2: it goes through triton's JIT call wrapper, ~6 us per call.
    return max(16, 1 << (d - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """The products' precision: fp32 inputs follow torch's matmul flag, as cuBLAS does, so a
    run with TF32 matmuls (``train.precision = "tf32"``) gets tensor-core products here too,
    and full fp32 (``"ieee"``, scalar FMAs) only where fp32 matmuls were asked for; 16-bit
    inputs ignore it."""
    if dtype != torch.float32:
        return "tf32"
    # fp32_precision (torch >= 2.9) also reflects the legacy allow_tf32 and
    # set_float32_matmul_precision; reading allow_tf32 itself raises once fp32_precision is set.
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


def _dims(q: Tensor, v: Tensor) -> dict[str, object]:
    dqk, dv = q.shape[2], v.shape[2]
    return dict(
        DQK=dqk, DV=dv,
        BLOCK_DQK=_block_dim(dqk),
        BLOCK_DV=_block_dim(dv),
        DOT_PRECISION=dot_precision(q.dtype),
        FAST=q.dtype != torch.float32 and not tuning.interpreting()
        and kernel_options().fast_silu,
    )


def _key(
    kind: str, tab: MaskTables, q: Tensor, v: Tensor, flags: dict[str, object], max_seq_len: int
) -> tuple:
    """Tiles depend on the total work (padded length) and on how it is cut into sequences: the
    best tile at 64 x 1024 tokens is not the best at 8 x 8192, so both lengths are bucketed by
    octave (max_seq_len is a host int: no device sync)."""
    return (
        kind, tuning.device_tag(q.device), str(q.dtype), dot_precision(q.dtype),
        q.shape[1], q.shape[2], v.shape[2],
        tab.padded_len.bit_length(), int(max_seq_len).bit_length(),
        tab.mask_block_q, tab.mask_block_kv, tuple(sorted(flags.items())),
    )


# Tests set this to NaN-fill every output buffer before the kernels run, so that an element no
# program writes shows up as NaN instead of as leftover memory that happens to be right.
poison_outputs = False


def _empty(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    if poison_outputs:
        out.fill_(float("nan"))
    return out


def _bias_buffer(tiles: RabTiles, tab: MaskTables) -> Tensor:
    """The per-layer fp32 bias values' buffer (NaN under ``poison_outputs``: a pair the fill
    kernel misses shows up)."""
    shape = (tiles.n_slots, tab.mask_block_q, tab.mask_block_kv)
    out = torch.empty(shape, dtype=torch.float32, device=tiles.slot_row.device)
    if poison_outputs:
        out.fill_(float("nan"))
    return out


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _placeholder(w: Tensor | None, like: Tensor) -> Tensor:
    return w.contiguous() if w is not None else like


def _pad_dim(x: Tensor) -> Tensor:
    d = x.shape[-1]
    return x if d == _block_dim(d) else torch.nn.functional.pad(x, (0, _block_dim(d) - d))


def forward(
    q: Tensor, k: Tensor, v: Tensor, tab: MaskTables, *, alpha: float, max_seq_len: int,
    pos_w: Tensor | None, ts_w: Tensor | None,
) -> Tensor:
    """Head dims that are not a power of two (>= 16) are zero-padded to one: the kernels' masked
    head-dim path read out of bounds on the H100 in bf16 with Dqk = 50 and Dv = 25 together
    (illegal memory access; either alone, fp32, or the interpreter were fine), and zero columns
    change neither the scores nor the kept output columns."""
    out = _forward(
        _pad_dim(q), _pad_dim(k), _pad_dim(v), tab, alpha=alpha, max_seq_len=max_seq_len,
        pos_w=pos_w, ts_w=ts_w,
    )
    return out[..., : v.shape[-1]]


def backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, tab: MaskTables, *, alpha: float,
    max_seq_len: int, pos_w: Tensor | None, ts_w: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    dq, dk, dv, dpos, dts = _backward(
        _pad_dim(do), _pad_dim(q), _pad_dim(k), _pad_dim(v), tab, alpha=alpha,
        max_seq_len=max_seq_len, pos_w=pos_w, ts_w=ts_w,
    )
    dqk = q.shape[-1]
    return dq[..., :dqk], dk[..., :dqk], dv[..., : v.shape[-1]], dpos, dts


def _forward(
    q: Tensor, k: Tensor, v: Tensor, tab: MaskTables, *, alpha: float, max_seq_len: int,
    pos_w: Tensor | None, ts_w: Tensor | None,
) -> Tensor:
    out_scale = 1.0 / max_seq_len
    T, H, _ = q.shape
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    out = _empty((T, H, v.shape[2]), v)
    flags = _mask_flags(tab, pos_w is not None)
    dims = _dims(q, v)
    pos_w_ = _placeholder(pos_w, tab.seq_id)
    ts_w_ = _placeholder(ts_w, tab.seq_id)
    # The bias as tiles: this layer's values of every visited pair, one fill launch (never
    # dereferenced otherwise: placeholders).
    bias, kv_slot, full_kv_slot = tab.seq_id, tab.seq_id, tab.seq_id
    if flags["RAB_TILES"]:
        tiles = rab_tiles_of(tab)
        assert pos_w is not None and ts_w is not None
        bias = tiles_mod.fill_bias(tiles, tab, pos_w, ts_w, out=_bias_buffer(tiles, tab))
        kv_slot, full_kv_slot = tiles.kv_slot, tiles.full_kv_slot

    def launch(cfg: TileConfig) -> None:
        grid = (H, tab.padded_len // cfg.block_m)
        hstu_fwd_kernel[grid](
            q, k, v, out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            tab.seq_id, tab.pos_id, tab.max_id, tab.local, tab.ts, tab.next_ts, pos_w_, ts_w_,
            bias, kv_slot, full_kv_slot,
            tab.kv_num, tab.kv_idx, tab.full_kv_num, tab.full_kv_idx, tab.kv_idx.stride(0),
            tab.tile_order("q", cfg.block_m), *_scalars(tab, alpha, out_scale),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            MASK_BLOCK_Q=tab.mask_block_q, MASK_BLOCK_KV=tab.mask_block_kv,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **dims, **flags,
        )

    dmax = max(q.shape[2], v.shape[2])
    kind = "fwd_rab" if pos_w is not None else "fwd"
    options = tuning.candidates(kind, dmax, tab.mask_block_q, tab.mask_block_kv)
    cfg = tuning.pick(_key("fwd", tab, q, v, flags, max_seq_len), options, launch)
    launch(cfg)
    return out


_bwd_modes: dict[tuple, str] = {}
BWD_MODES = ("split", "fused", "merged")


def rab_lanes() -> int:
    """L of the lane copies of the bias-table gradients (``kernel.rab_lanes``, 1 = off): pair
    (key n, query m) adds into positional copy n mod L and time copy (n mod L, m mod L), so one
    atomic instruction never hits one address twice. Long sequences otherwise serialise on a
    few time-bucket addresses (BENCHMARKS.md)."""
    return kernel_options().rab_lanes


def bwd_mode() -> str:
    """'split' (dk/dv kernel, then dq kernel), 'fused' (dq by fp32 atomics in the dk/dv kernel),
    'merged' (dk/dv and dq programs in one launch) or 'auto' (time the three on the first call of
    a shape bucket and keep the fastest)."""
    return kernel_options().backward


def _backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, tab: MaskTables, *, alpha: float,
    max_seq_len: int, pos_w: Tensor | None, ts_w: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    out_scale = 1.0 / max_seq_len
    T, H, _ = q.shape
    q, k, v, do = (_last_dim_contiguous(x) for x in (q, k, v, do))
    dq = _empty(q.shape, q)
    dk = _empty(k.shape, k)
    dv = _empty(v.shape, v)
    has_rab = pos_w is not None
    flags = _mask_flags(tab, has_rab)
    dims = _dims(q, v)
    pos_w_ = _placeholder(pos_w, tab.seq_id)
    ts_w_ = _placeholder(ts_w, tab.seq_id)
    use_tiles = bool(flags["RAB_TILES"])
    lanes = rab_lanes() if has_rab and not use_tiles else 1
    pos_copies, ts_copies = lanes, lanes * lanes
    if has_rab and not use_tiles:
        dpos = torch.zeros(pos_copies * pos_w.numel(), dtype=torch.float32, device=q.device)
        dts = torch.zeros(ts_copies * ts_w.numel(), dtype=torch.float32, device=q.device)
    else:  # never dereferenced
        dpos = dts = tab.seq_id
    # The bias as tiles: the values and the per-pair gradient buffer the dk/dv programs add dS
    # into (placeholders otherwise). The values are recomputed here, not saved by the forward:
    # saving holds 64 KiB per visited block pair per layer from each layer's forward to its
    # backward (~340 MiB a layer, 2.7 GiB over 8 layers at benchmarks/model_step.py's
    # 16 x [2048, 4096]), while the fill is one launch that writes as much as it would keep and
    # reads only the per-token tables; it also keeps the custom op's outputs as they are.
    bias = dbias = q_slot = full_q_slot = kv_slot = full_kv_slot = tab.seq_id
    if use_tiles:
        tiles = rab_tiles_of(tab)
        assert pos_w is not None and ts_w is not None
        bias = tiles_mod.fill_bias(tiles, tab, pos_w, ts_w, out=_bias_buffer(tiles, tab))
        dbias = torch.empty_like(bias)  # zeroed right before the real run below
        q_slot, full_q_slot = tiles.q_slot, tiles.full_q_slot
        kv_slot, full_kv_slot = tiles.kv_slot, tiles.full_kv_slot
    scalars = _scalars(tab, alpha, out_scale)
    P, mbq, mbkv = tab.padded_len, tab.mask_block_q, tab.mask_block_kv
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1),
    )
    side = (tab.seq_id, tab.pos_id, tab.max_id, tab.local, tab.ts, tab.next_ts, pos_w_, ts_w_)
    kv_tiles = (bias, kv_slot, full_kv_slot)  # what the dq programs read of the bias tiles
    q_tiles = (bias, dbias, q_slot, full_q_slot)  # and the dk/dv programs
    q_lists = (tab.q_num, tab.q_idx, tab.full_q_num, tab.full_q_idx, tab.q_idx.stride(0))
    kv_lists = (tab.kv_num, tab.kv_idx, tab.full_kv_num, tab.full_kv_idx, tab.kv_idx.stride(0))
    common = dict(MASK_BLOCK_Q=mbq, MASK_BLOCK_KV=mbkv, **dims, **flags)

    def launch_dkdv(cfg: TileConfig, fuse: bool, dq_acc: Tensor) -> None:
        hstu_bwd_dkdv_kernel[(H, P // cfg.block_n)](
            q, k, v, do, dk, dv, dq_acc, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq_acc.stride(0), dq_acc.stride(1),
            *side, dpos, dts, *q_tiles, *q_lists, tab.tile_order("kv", cfg.block_n), *scalars,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, FUSE_DQ=fuse, RAB_LANES=lanes,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
        )

    def launch_dq(cfg: TileConfig) -> None:
        hstu_bwd_dq_kernel[(H, P // cfg.block_m)](
            q, k, v, do, dq, *strides, dq.stride(0), dq.stride(1),
            *side, *kv_tiles, *kv_lists, tab.tile_order("q_bwd", cfg.block_m), *scalars,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
        )

    def launch_merged(cfgs: tuple[TileConfig, TileConfig]) -> None:
        kv_cfg, q_cfg = cfgs
        n_kv = P // kv_cfg.block_n
        hstu_bwd_merged_kernel[(H, n_kv + P // q_cfg.block_m)](
            q, k, v, do, dk, dv, dq, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq.stride(0), dq.stride(1),
            *side, dpos, dts, *q_tiles, kv_slot, full_kv_slot, *q_lists, *kv_lists,
            tab.merged_order(kv_cfg.block_n, q_cfg.block_m), n_kv, *scalars,
            KV_BLOCK_M=kv_cfg.block_m, KV_BLOCK_N=kv_cfg.block_n,
            Q_BLOCK_M=q_cfg.block_m, Q_BLOCK_N=q_cfg.block_n, RAB_LANES=lanes,
            num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages, **common,
        )

    acc_holder: list[Tensor] = []

    def fused_acc() -> Tensor:
        if not acc_holder:
            acc_holder.append(torch.zeros(q.shape, dtype=torch.float32, device=q.device))
        return acc_holder[0]

    dmax = max(q.shape[2], v.shape[2])

    def key(kind: str) -> tuple:
        return _key(kind, tab, q, v, flags, max_seq_len)

    # Each mode's best tiles; tuning launches write garbage into dq/dk/dv and the atomic
    # buffers, which the real launch below overwrites or re-zeroes.
    def plan(mode: str) -> Callable[[], None]:
        if mode == "split":
            dkdv_cfg = tuning.pick(key("dkdv"), tuning.candidates("dkdv", dmax, mbq, mbkv),
                                   lambda c: launch_dkdv(c, False, dq))
            dq_cfg = tuning.pick(key("dq"), tuning.candidates("dq", dmax, mbq, mbkv), launch_dq)
            return lambda: (launch_dkdv(dkdv_cfg, False, dq), launch_dq(dq_cfg))  # type: ignore[return-value]
        if mode == "fused":
            def run_fused(cfg: TileConfig) -> None:
                acc = fused_acc()
                acc.zero_()
                launch_dkdv(cfg, True, acc)
                dq.copy_(acc)

            fcfg = tuning.pick(key("fused"), tuning.candidates("fused", dmax, mbq, mbkv), run_fused)
            return lambda: run_fused(fcfg)
        mcfg = tuning.pick(key("merged"), tuning.merged_candidates(dmax, mbq, mbkv), launch_merged)
        return lambda: launch_merged(mcfg)

    mode = bwd_mode()
    if mode == "auto":
        # The options that change the timings are part of the key, as in tuning.pick: a mode
        # chosen under one rab_lanes / tile_order / fast_silu is not reused under another.
        mode_key = (key("bwd_mode"), kernel_options().cache_key())
        mode = _bwd_modes.get(mode_key, "")
        if not mode:
            if tuning.autotune_enabled():
                mode = str(tuning.recall(mode_key, BWD_MODES) or "")
                if not mode:
                    runs = {m: plan(m) for m in BWD_MODES}
                    mode = min(runs, key=lambda m: tuning.time_ms(runs[m]))
                    tuning.remember(mode_key, mode)
            else:  # measured fastest untuned (benchmarks/rab_cost.py; docs/triton-kernel.md)
                mode = "fused" if has_rab else "split"
            _bwd_modes[mode_key] = mode
    run = plan(mode)
    if use_tiles:
        dbias.zero_()
        run()
        dpos, dts = tiles_mod.table_grads(tiles, tab, dbias, pos_w.numel(), ts_w.numel())
    else:
        if has_rab:
            dpos.zero_()
            dts.zero_()
        run()
        if has_rab and ts_copies > 1:
            dpos, dts = dpos.view(pos_copies, -1).sum(0), dts.view(ts_copies, -1).sum(0)
    dpos_w = dpos.to(pos_w.dtype) if pos_w is not None else None
    dts_w = dts.to(ts_w.dtype) if ts_w is not None else None
    return dq, dk, dv, dpos_w, dts_w


def bwd_choices() -> dict[tuple, str]:
    return dict(_bwd_modes)
