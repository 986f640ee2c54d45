"""The relative bias as tiles (``kernel.rab_tiles``): per batch the pair indices of every
visited mask block, per layer the bias values gathered from them in torch, so the kernels read
a bias sub-tile with plain 2-D loads instead of two per-element table reads.

Slots: one per visited (query mask-block row r, key mask-block column c) pair, partial and full
lists both, numbered row by row (row r's partial blocks in list order, then its full ones).
``kv_slot`` / ``full_kv_slot`` have the shape of ``kv_idx`` / ``full_kv_idx`` (the kernels index
them with the same row stride); ``q_slot`` / ``full_q_slot`` those of ``q_idx`` / ``full_q_idx``,
found by matching (r, c) with a sort and a binary search (no order of the transposed lists is
assumed). Entries past a row's count hold 0, a valid slot the kernels never read.

Memory, per visited pair (MBQ x MBKV elements, 16384 at 128 x 128): per batch the indices, 3
bytes an element (int16 rel, uint8 bucket; 8 with int32 for either when N > 16384 or
num_buckets > 255), 48 KiB a pair; per layer the fp32 bias values (64 KiB a pair), and in the
backward a second fp32 buffer for the bias gradient per pair (another 64 KiB a pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flexgr.ops.rab import time_bucket

if TYPE_CHECKING:  # launch imports this module
    from flexgr.ops.triton_hstu.launch import MaskTables

# Elements per chunk of the torch passes: bounds their int64 / fp32 temporaries (~4 of 8 bytes
# an element) to ~0.5 GiB whatever the batch, at a few launches more for long batches.
_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class RabTiles:
    kv_slot: Tensor  # like kv_idx, int32: slot of each listed partial block of a query row
    full_kv_slot: Tensor  # like full_kv_idx
    q_slot: Tensor  # like q_idx, int32: slot of each listed partial block of a key column
    full_q_slot: Tensor  # like full_q_idx
    rel: Tensor  # [S, MBQ, MBKV] int16 (int32 when 2N - 2 > 32767): index into pos_w
    bucket: Tensor  # [S, MBQ, MBKV] uint8 (int32 when num_buckets > 255): index into ts_w

    @property
    def n_slots(self) -> int:
        return int(self.rel.shape[0])

    def tensors(self) -> list[Tensor]:
        return [self.kv_slot, self.full_kv_slot, self.q_slot, self.full_q_slot, self.rel,
                self.bucket]


@dataclass(frozen=True)
class SlotTables:
    kv_slot: Tensor
    full_kv_slot: Tensor
    q_slot: Tensor
    full_q_slot: Tensor
    slot_row: Tensor  # [S] int64 query mask-block row of each slot
    slot_col: Tensor  # [S] int64 key mask-block column of each slot


def slot_tables(
    kv_num: Tensor, kv_idx: Tensor, full_kv_num: Tensor, full_kv_idx: Tensor,
    q_num: Tensor, q_idx: Tensor, full_q_num: Tensor, full_q_idx: Tensor,
) -> SlotTables:
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

    return SlotTables(
        kv_slot=kv_slot.to(torch.int32).contiguous(),
        full_kv_slot=fkv_slot.to(torch.int32).contiguous(),
        q_slot=matched(q_num, q_idx),
        full_q_slot=matched(full_q_num, full_q_idx),
        slot_row=key // cols,
        slot_col=key % cols,
    )


def index_dtypes(rab_n: int, num_buckets: int) -> tuple[torch.dtype, torch.dtype]:
    """The narrowest dtypes of rel (0..2N-2) and bucket (0..num_buckets)."""
    rel_dtype = torch.int16 if 2 * rab_n - 2 <= torch.iinfo(torch.int16).max else torch.int32
    bucket_dtype = torch.uint8 if num_buckets <= 255 else torch.int32
    return rel_dtype, bucket_dtype


def build(tab: MaskTables, bucket_divisor: float) -> RabTiles:
    """The slots of ``tab``'s lists (tables with their bias tables: ts, next_ts, local and the
    sizes) and every slot's pair indices, by the functions of
    ``flexgr.ops.rab`` (the reference's), so buckets match the reference on the same device.
    Padded tokens (index >= T) get timestamp 0 and their padded position: any in-range index
    (their weights are zero)."""
    slots = slot_tables(
        tab.kv_num, tab.kv_idx, tab.full_kv_num, tab.full_kv_idx,
        tab.q_num, tab.q_idx, tab.full_q_num, tab.full_q_idx,
    )
    mbq, mbkv, P, T = tab.mask_block_q, tab.mask_block_kv, tab.padded_len, tab.total_len
    N, nb = tab.rab_n, tab.num_buckets
    dev = tab.kv_idx.device
    local = tab.local.long()
    ts = torch.nn.functional.pad(tab.ts[:T].long(), (0, P - T))
    nxt = torch.nn.functional.pad(tab.next_ts[:T].long(), (0, P - T))
    S = int(slots.slot_row.numel())
    rel_dtype, bucket_dtype = index_dtypes(N, nb)
    rel = torch.empty(S, mbq, mbkv, dtype=rel_dtype, device=dev)
    bucket = torch.empty(S, mbq, mbkv, dtype=bucket_dtype, device=dev)
    step = max(1, _CHUNK_ELEMS // (mbq * mbkv))
    for a in range(0, S, step):
        b = min(S, a + step)
        i = slots.slot_row[a:b, None] * mbq + torch.arange(mbq, device=dev)  # [s, MBQ] queries
        j = slots.slot_col[a:b, None] * mbkv + torch.arange(mbkv, device=dev)  # [s, MBKV] keys
        # As flexgr.ops.rab.dense_bias: rel = N - 1 + pos[j] - pos[i], bucket(next_ts[i] - ts[j]).
        r = (N - 1 + local[j][:, None, :] - local[i][:, :, None]).clamp(0, 2 * N - 2)
        rel[a:b] = r.to(rel_dtype)
        dt = nxt[i][:, :, None] - ts[j][:, None, :]
        bucket[a:b] = time_bucket(dt, nb, bucket_divisor).to(bucket_dtype)
    return RabTiles(
        slots.kv_slot, slots.full_kv_slot, slots.q_slot, slots.full_q_slot, rel, bucket
    )


def gather_bias(tiles: RabTiles, pos_w: Tensor, ts_w: Tensor) -> Tensor:
    """[S, MBQ, MBKV] fp32 bias values pos_w[rel] + ts_w[bucket] (the sum in fp32, as the
    inline path adds the two table reads). torch indexes with int32/int64 only (uint8 would be
    read as a boolean mask), so each chunk's indices are widened to int32 first (a temporary
    of 4 bytes an element per chunk, never the whole batch)."""
    pos_f, ts_f = pos_w.float(), ts_w.float()
    out = torch.empty(tiles.rel.shape, dtype=torch.float32, device=tiles.rel.device)
    flat_out, flat_rel, flat_bucket = out.view(-1), tiles.rel.view(-1), tiles.bucket.view(-1)
    for a in range(0, flat_out.numel(), _CHUNK_ELEMS):
        b = min(flat_out.numel(), a + _CHUNK_ELEMS)
        torch.index_select(pos_f, 0, flat_rel[a:b].int(), out=flat_out[a:b])
        flat_out[a:b] += ts_f[flat_bucket[a:b].int()]
    return out


def table_grads(tiles: RabTiles, dbias: Tensor, n_pos: int, n_ts: int) -> tuple[Tensor, Tensor]:
    """(dpos_w, dts_w) in fp32 from the per-pair bias gradient: a weighted histogram of each
    index table. torch.bincount takes any integer dtype (CPU and CUDA dispatch every integral
    type), so the int16 / uint8 tables need no int64 copy (which would cost 8 bytes an element,
    2.7x the indices themselves); with fp32 weights it returns fp32. On CUDA it reads the
    input's max (and, except for uint8, its min) to the host: one or two syncs per call."""
    w = dbias.view(-1)
    dpos = torch.bincount(tiles.rel.view(-1), weights=w, minlength=n_pos)
    dts = torch.bincount(tiles.bucket.view(-1), weights=w, minlength=n_ts)
    return dpos.float(), dts.float()
