"""The Triton kernel under context parallelism, with no kernel change.

The kernel wants queries and keys on one token axis with one set of per-token tables. So the
rank's queries are placed at their global rows of a zero [T, H, Dqk] tensor, the gathered keys and
values are put back into global order, and the single-device kernel runs over the global batch with
a BlockMask restricted to this rank's query rows. Query blocks that hold none of them are empty and
cost nothing; rows of other ranks inside a partial block are computed and dropped. They cannot
leak into gradients: their output gradient is zero, so their dS, and with it their share of dK,
dV and the bias-table gradients, is zero too. Positions, timestamps and the divisor are global by
construction, and every step is an autograd op, so gradients reach q, k_all, v_all and the tables.

``gather_attend_triton`` does the same with the all-gather inside one autograd function that
saves only this rank's shards: the backward gathers K/V again. Otherwise every layer would keep
three global-size [T, H, D] tensors (global-row queries, keys and values) alive until its
backward, which cost 35% of the longest trainable CP sequence on the 2x H200 run.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from flexgr.distributed.collectives import gather_tokens, reduce_scatter_tokens
from flexgr.distributed.cp_mask import CPMask
from flexgr.masks.block import BLOCK_SIZE, HSTUMask
from flexgr.masks.layout import JaggedLayout, build_layout
from flexgr.masks.mods import MaskMod, and_masks, hstu_mask
from flexgr.masks.sparse import jagged_block_mask
from flexgr.ops.rab import RelativeBias


@dataclass(frozen=True)
class _GlobalView:
    mask: HSTUMask  # the global batch's mask, rows restricted to this rank's queries
    token_slot: Tensor  # [T] gathered slot of each global token
    query_rows: Tensor  # [T_r] global row of each local query


# One entry per live CPMask: a batch's mask is shared by every layer, so the view is built once.
_views: "weakref.WeakKeyDictionary[CPMask, _GlobalView]" = weakref.WeakKeyDictionary()


def _padded_layout(layout: JaggedLayout, offsets: Tensor, padded_len: int) -> JaggedLayout:
    """The global layout again, padded to whole blocks (the kernel reads its tables per block)."""
    num_targets = None
    if layout.has_targets:
        seq = layout.seq_id[: layout.total_len].long()
        num_targets = torch.zeros(offsets.numel() - 1, dtype=torch.int64, device=offsets.device)
        num_targets.index_add_(0, seq, layout.is_target[: layout.total_len].long())
    return build_layout(
        offsets,
        num_targets=num_targets,
        contextual_len=layout.contextual_len,
        total_len=layout.total_len,
        padded_len=padded_len,
    )


def _rows_of(local_P: Tensor) -> MaskMod:
    def mask(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return local_P[q]

    mask.__name__ = "local_rows"
    return mask


def _global_view(mask: CPMask) -> _GlobalView:
    view = _views.get(mask)
    if view is not None:
        return view
    assert mask.spec is not None  # callers fall back to flex for custom mask_mods
    shard, spec = mask.shard, mask.spec
    T = shard.total_len
    padded = max(1, -(-T // BLOCK_SIZE)) * BLOCK_SIZE
    layout = _padded_layout(mask.layout, shard.offsets, padded)
    query_rows = mask.q_index[: shard.local_len]
    local_P = torch.zeros(padded, dtype=torch.bool, device=query_rows.device)
    local_P[query_rows] = True
    rule = hstu_mask(layout, max_attn_len=spec.max_attn_len, full_attn_tail=spec.full_attn_tail)
    restricted = and_masks(rule, _rows_of(local_P))
    block_mask = jagged_block_mask(restricted, layout.seq_id, BLOCK_SIZE)
    slots = torch.nonzero(mask.kv_index >= 0).squeeze(1)
    token_slot = torch.empty(T, dtype=torch.int64, device=slots.device)
    token_slot[mask.kv_index[slots]] = slots
    view = _GlobalView(
        mask=HSTUMask(
            block_mask=block_mask, mask_mod=restricted, layout=layout, spec=spec,
            offsets=shard.offsets,
        ),
        token_slot=token_slot,
        query_rows=query_rows,
    )
    _views[mask] = view
    return view


def _at_global_rows(x: Tensor, view: _GlobalView, T: int) -> Tensor:
    """[T_r, ...] local rows -> [T, ...] with zeros at the rows of other ranks."""
    return x.new_zeros((T,) + tuple(x.shape[1:])).index_copy(0, view.query_rows, x)


def attend_gathered_triton(
    q: Tensor,
    k_all: Tensor,
    v_all: Tensor,
    mask: CPMask,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
) -> Tensor:
    """Local queries [T_r, H, Dqk] against gathered slots [C*S, H, D] through the Triton kernel;
    returns [T_r, H, Dv]. ``rab`` holds the global [T] tables."""
    from flexgr.ops.triton_backend import hstu_attention_triton

    view = _global_view(mask)
    T = mask.shard.total_len
    q_TH = _at_global_rows(q, view, T)
    out_TH = hstu_attention_triton(
        q_TH, k_all[view.token_slot], v_all[view.token_slot], view.mask,
        max_seq_len=max_seq_len, alpha=alpha, rab=rab,
    )
    return out_TH[view.query_rows]


def _global_inputs(
    q: Tensor, kv_SHX: Tensor, dqk: int, view: _GlobalView, T: int, group: ProcessGroup
) -> tuple[Tensor, Tensor, Tensor]:
    kv_TH = gather_tokens(kv_SHX, group)[view.token_slot]
    k_TH, v_TH = kv_TH[..., :dqk].contiguous(), kv_TH[..., dqk:].contiguous()
    return _at_global_rows(q, view, T), k_TH, v_TH


class _GatherAttend(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q, kv_SHX, pos_w, ts_w, dqk, view, tables, T, group, alpha, max_seq_len
    ):
        from flexgr.ops.triton_hstu import launch

        q_TH, k_TH, v_TH = _global_inputs(q, kv_SHX, dqk, view, T, group)
        out_TH = launch.forward(
            q_TH, k_TH, v_TH, tables, alpha=alpha, max_seq_len=max_seq_len, pos_w=pos_w, ts_w=ts_w
        )
        ctx.save_for_backward(q, kv_SHX, pos_w, ts_w)
        ctx.args = (dqk, view, tables, T, group, alpha, max_seq_len)
        return out_TH[view.query_rows]

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        from flexgr.ops.triton_hstu import launch

        q, kv_SHX, pos_w, ts_w = ctx.saved_tensors
        dqk, view, tables, T, group, alpha, max_seq_len = ctx.args
        q_TH, k_TH, v_TH = _global_inputs(q, kv_SHX, dqk, view, T, group)
        dout_TH = _at_global_rows(dout, view, T)
        dq_TH, dk_TH, dv_TH, dpos, dts = launch.backward(
            dout_TH, q_TH, k_TH, v_TH, tables, alpha=alpha, max_seq_len=max_seq_len,
            pos_w=pos_w, ts_w=ts_w,
        )
        dkv_TH = torch.cat([dk_TH, dv_TH], dim=-1)
        dkv_all = dkv_TH.new_zeros(kv_SHX.shape[0] * dist.get_world_size(group), *kv_SHX.shape[1:])
        dkv_all.index_copy_(0, view.token_slot, dkv_TH)  # slots of padding stay zero
        dkv_SHX = reduce_scatter_tokens(dkv_all, group)
        return dq_TH[view.query_rows], dkv_SHX, dpos, dts, *([None] * 7)


def gather_attend_triton(
    q: Tensor,
    kv_SHX: Tensor,
    dqk: int,
    mask: CPMask,
    group: ProcessGroup,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
) -> Tensor | None:
    """All-gather this rank's packed K/V shard ``kv_SHX`` [S, H, Dqk + Dv] and attend its queries
    q [T_r, H, Dqk] through the kernel; returns [T_r, H, Dv], or None when the kernel cannot take
    these tensors (the caller then gathers and falls back)."""
    from flexgr.ops.triton_backend import unsupported_reason

    if unsupported_reason(q, kv_SHX[..., :dqk], kv_SHX[..., dqk:], mask.spec) is not None:
        return None
    from flexgr.ops.triton_hstu import launch

    view = _global_view(mask)
    tables = launch.mask_tables(view.mask, rab)
    pos_w = rab.pos_w if rab is not None else None
    ts_w = rab.ts_w if rab is not None else None
    return _GatherAttend.apply(
        q, kv_SHX, pos_w, ts_w, dqk, view, tables, mask.shard.total_len, group, float(alpha),
        int(max_seq_len),
    )
