"""The relative bias as tiles (``kernel.rab_tiles``): per batch the slot tables of the visited
mask blocks, per layer the bias values of every visited block filled by a Triton kernel, so the
attention kernels read a bias sub-tile with plain 2-D loads instead of two per-element table
reads; the backward's per-pair gradient is reduced into the tables by a second kernel
(``rab_tile_kernels``).

Slots: one per visited (query mask-block row r, key mask-block column c) pair, partial and full
lists both, numbered row by row (row r's partial blocks in list order, then its full ones).
``kv_slot`` / ``full_kv_slot`` have the shape of ``kv_idx`` / ``full_kv_idx`` (the kernels index
them with the same row stride); ``q_slot`` / ``full_q_slot`` those of ``q_idx`` / ``full_q_idx``,
found by matching (r, c) with a sort and a binary search (no order of the transposed lists is
assumed). Entries past a row's count hold 0, a valid slot the kernels never read.

The tiles hold no pair indices: the fill and reduce kernels compute rel and bucket from the
per-token tables (``MaskTables.local``, ``ts``, ``next_ts``) with the inline kernels' helper, so
the slot tables depend on the mask's block lists only, not on the bias.

Memory: per batch the four slot tables (int32, the block lists' shapes: 2.3 MiB at 16 x
[2048, 4096] with 128-blocks) and 8 bytes a slot for its (r, c); per visited pair (MBQ x MBKV
elements, 16384 at 128 x 128) the fp32 bias values per layer (64 KiB a pair), and in the
backward the values again plus an fp32 buffer for the bias gradient (128 KiB a pair at the
backward's peak).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flexgr.ops.triton_hstu.rab_tile_kernels import rab_fill_kernel, rab_reduce_kernel
from flexgr.ops.triton_hstu.tuning import interpreting

if TYPE_CHECKING:  # launch imports this module
    from flexgr.ops.triton_hstu.launch import MaskTables

# Elements of the kernels' per-iteration tiles: the fill's [ROWS, MBKV] values, the reduce's
# [ROWS, MBKV] gradients with their running sums and [DIAG_ROWS, DIAG] skewed loads. Not tuned
# on a GPU: chosen from ptxas's report for sm_90a (benchmarks/kernel_registers.py
# --tile-kernels, triton 3.9), 4 warps at 128 x 128 blocks: the fill takes 64 registers, the
# reduce 128; neither spills.
_FILL_ELEMS = 4096
_MAX_NUMEL = 1 << 20
_SCAN_ELEMS = 2048
# Copies of the time-bucket gradient the reduce programs spread their atomics over (slot mod
# copies; summed after the launch). Not tuned on a GPU.
_TS_COPIES = 16
_DIAG_ELEMS = 4096


@dataclass(frozen=True)
class RabTiles:
    kv_slot: Tensor  # like kv_idx, int32: slot of each listed partial block of a query row
    full_kv_slot: Tensor  # like full_kv_idx
    q_slot: Tensor  # like q_idx, int32: slot of each listed partial block of a key column
    full_q_slot: Tensor  # like full_q_idx
    slot_row: Tensor  # [S] int32: query mask-block row of each slot
    slot_col: Tensor  # [S] int32: key mask-block column of each slot

    @property
    def n_slots(self) -> int:
        return int(self.slot_row.shape[0])  # a shape: no sync

    def tensors(self) -> list[Tensor]:
        return [self.kv_slot, self.full_kv_slot, self.q_slot, self.full_q_slot, self.slot_row,
                self.slot_col]


def slot_tables(
    kv_num: Tensor, kv_idx: Tensor, full_kv_num: Tensor, full_kv_idx: Tensor,
    q_num: Tensor, q_idx: Tensor, full_q_num: Tensor, full_q_idx: Tensor,
) -> RabTiles:
    """Slots of the BlockMask's lists (one [rows] count and one [rows, width] index table each,
    as ``MaskTables`` holds them). Reads the number of slots to the host (one sync)."""
    dev = kv_idx.device
    rows, cols = kv_num.numel(), q_num.numel()
    kv_n, fkv_n = kv_num.long(), full_kv_num.long()
    per_row = kv_n + fkv_n
    start = torch.cumsum(per_row, 0) - per_row  # exclusive: first slot of each row
    n_slots = int(per_row.sum())

    def numbered(num: Tensor, width: int, first: Tensor) -> tuple[Tensor, Tensor]:
        e = torch.arange(width, device=dev)
        used = e[None, :] < num[:, None]
        return torch.where(used, first[:, None] + e[None, :], 0), used

    kv_slot, kv_used = numbered(kv_n, kv_idx.shape[1], start)
    fkv_slot, fkv_used = numbered(fkv_n, full_kv_idx.shape[1], start + kv_n)
    # (r, c) of every slot, scattered through a dump slot S for the unused entries (no boolean
    # indexing: nothing else waits for the device).
    key = torch.empty(n_slots + 1, dtype=torch.long, device=dev)
    r = torch.arange(rows, device=dev)[:, None]
    for slot, used, idx in ((kv_slot, kv_used, kv_idx), (fkv_slot, fkv_used, full_kv_idx)):
        at = torch.where(used, slot, n_slots).reshape(-1)
        key.index_put_((at,), (r * cols + idx.long()).expand_as(slot).reshape(-1))
    key = key[:n_slots]

    order = torch.argsort(key)
    sorted_key = key[order]
    c = torch.arange(cols, device=dev)[:, None]

    def matched(num: Tensor, idx: Tensor) -> Tensor:
        e = torch.arange(idx.shape[1], device=dev)
        used = e[None, :] < num.long()[:, None]
        want = idx.long() * cols + c  # (r, c) of each entry of column c's list
        if n_slots == 0:
            return torch.zeros_like(idx, dtype=torch.int32)
        at = torch.searchsorted(sorted_key, want.reshape(-1)).clamp(max=n_slots - 1)
        found = order[at].reshape(want.shape)
        return torch.where(used, found, 0).to(torch.int32).contiguous()

    return RabTiles(
        kv_slot=kv_slot.to(torch.int32).contiguous(),
        full_kv_slot=fkv_slot.to(torch.int32).contiguous(),
        q_slot=matched(q_num, q_idx),
        full_q_slot=matched(full_q_num, full_q_idx),
        slot_row=(key // cols).to(torch.int32),
        slot_col=(key % cols).to(torch.int32),
    )


def build(tab: MaskTables) -> RabTiles:
    """The slot tables of ``tab``'s block lists (one host sync: the number of slots, which sizes
    the tables and the per-layer buffers; it is known only on the device, from the lists'
    counts)."""
    return slot_tables(
        tab.kv_num, tab.kv_idx, tab.full_kv_num, tab.full_kv_idx,
        tab.q_num, tab.q_idx, tab.full_q_num, tab.full_q_idx,
    )


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Iterations per tile under Triton's interpreter, which pays its overhead per operation, not per
# element (the reduce took 2 s a 128 x 128 slot in 64 iterations, ~50 ms a 16 x 16 one in two):
# whole tiles at once, but for tests that set more to run the kernels' loops.
interpreter_iterations = 1


def _rows(block_q: int, per_row: int, budget: int) -> int:
    """Query rows per iteration: a power of two dividing block_q (all three are powers of two),
    at least one."""
    if interpreting():  # within Triton's limit of 2^20 elements a tensor, as on a GPU
        return max(1, min(block_q // interpreter_iterations, _MAX_NUMEL // per_row))
    return min(block_q, max(1, budget // per_row))


def _scalars(tab: MaskTables) -> tuple[int, int, int, float]:
    """What rab_index reads besides the per-token tables (the inline kernels' scalars)."""
    return tab.total_len, tab.rab_n, tab.num_buckets, tab.inv_bucket_div


def fill_bias(
    tiles: RabTiles, tab: MaskTables, pos_w: Tensor, ts_w: Tensor, out: Tensor | None = None
) -> Tensor:
    """[S, MBQ, MBKV] fp32 bias values pos_w[rel] + ts_w[bucket] of every slot (into ``out``
    when given), bit-identical to the inline kernels' (same index helper, the two reads widened
    to fp32 and added). One launch, no host sync."""
    mbq, mbkv = tab.mask_block_q, tab.mask_block_kv
    if out is None:
        out = torch.empty(tiles.n_slots, mbq, mbkv, dtype=torch.float32, device=pos_w.device)
    if tiles.n_slots:
        rab_fill_kernel[(tiles.n_slots,)](
            out, tiles.slot_row, tiles.slot_col, tab.local, tab.ts, tab.next_ts,
            pos_w.contiguous(), ts_w.contiguous(), *_scalars(tab), **fill_meta(mbq, mbkv),
        )
    return out


def fill_meta(mbq: int, mbkv: int) -> dict[str, int]:
    """The fill kernel's constexprs and warps (benchmarks/kernel_registers.py compiles these)."""
    return {"MASK_BLOCK_Q": mbq, "MASK_BLOCK_KV": mbkv, "ROWS": _rows(mbq, mbkv, _FILL_ELEMS),
            "num_warps": 4}


def reduce_meta(mbq: int, mbkv: int) -> dict[str, int]:
    """The reduce kernel's constexprs and warps: DIAG >= the tile's MBQ + MBKV - 1 diagonals."""
    diag = _pow2(mbq + mbkv - 1)
    return {"MASK_BLOCK_Q": mbq, "MASK_BLOCK_KV": mbkv, "ROWS": _rows(mbq, mbkv, _SCAN_ELEMS),
            "DIAG": diag, "DIAG_ROWS": _rows(mbq, diag, _DIAG_ELEMS), "TS_COPIES": _TS_COPIES,
            "num_warps": 4}


def table_grads(
    tiles: RabTiles, tab: MaskTables, dbias: Tensor, n_pos: int, n_ts: int
) -> tuple[Tensor, Tensor]:
    """(dpos_w [n_pos], dts_w [n_ts]) in fp32 from the per-pair bias gradient ``dbias``
    ([S, MBQ, MBKV] fp32): every pair's value added at its rel and bucket (``rab_reduce_kernel``:
    atomics, so not deterministic; exact up to rounding). One launch, no host sync. ``dbias``
    must be zero on pairs of two different sequences and on padding, as the backward kernels
    leave it (they add only where the mask holds): the positions are summed along diagonals,
    where such pairs would land at the wrong rel."""
    if n_pos != 2 * tab.rab_n - 1 or n_ts != tab.num_buckets + 1:
        raise ValueError(
            f"bias tables of {n_pos} / {n_ts} entries, the kernel tables say "
            f"{2 * tab.rab_n - 1} / {tab.num_buckets + 1}"
        )
    dpos = torch.zeros(n_pos, dtype=torch.float32, device=dbias.device)
    # float64 for the kernel's telescoping sums, in copies that spread its atomics
    dts = torch.zeros(_TS_COPIES, n_ts, dtype=torch.float64, device=dbias.device)
    if tiles.n_slots:
        rab_reduce_kernel[(tiles.n_slots,)](
            dbias, tiles.slot_row, tiles.slot_col, tab.seq_id, tab.local, tab.ts, tab.next_ts,
            dpos, dts,
            *_scalars(tab), **reduce_meta(tab.mask_block_q, tab.mask_block_kv),
        )
    return dpos, dts.sum(0).float()
