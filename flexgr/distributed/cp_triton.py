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
saves only this rank's q, k and v (views of the layer's projection, alive anyway): the backward
gathers K/V again. Otherwise every layer would keep three global-size [T, H, D] tensors
(global-row queries, keys and values) alive until its backward, which cost 35% of the longest
trainable CP sequence on the 2x H200 run. For long sequences it also works in head passes
(``head_passes``): each pass gathers, attends and reduce-scatters only its heads, so a layer's
global-size transients (gathered K/V, global-row queries and output gradients, their gradients)
shrink by the number of passes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from flexgr.distributed.collectives import gather_tokens, reduce_scatter_tokens
from flexgr.distributed.cp_mask import CPMask
from flexgr.distributed.sharding import TokenShard
from flexgr.masks.block import BLOCK_SIZE, HSTUMask
from flexgr.ops.kernel_options import kernel_options
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
    query_rows = shard.local_index
    local_P = torch.zeros(padded, dtype=torch.bool, device=query_rows.device)
    local_P[query_rows] = True
    rule = hstu_mask(layout, max_attn_len=spec.max_attn_len, full_attn_tail=spec.full_attn_tail)
    restricted = and_masks(rule, _rows_of(local_P))
    # Rows of other ranks see nothing: hidden from the candidate search, so only blocks with
    # local rows are evaluated; without contextual rows the rule is causal (half the pairs).
    block_mask = jagged_block_mask(
        restricted,
        torch.where(local_P, layout.seq_id, -1),
        BLOCK_SIZE,
        kv_seq=layout.seq_id,
        causal=layout.contextual_len == 0,
    )
    view = _GlobalView(
        mask=HSTUMask(
            block_mask=block_mask, mask_mod=restricted, layout=layout, spec=spec,
            offsets=shard.offsets,
        ),
        token_slot=shard.slot_of_token,
        query_rows=query_rows,
    )
    _views[mask] = view
    return view


def _at_global_rows(x: Tensor, view: _GlobalView) -> Tensor:
    """[T_r, ...] local rows -> [T, ...] with zeros at the rows of other ranks."""
    T = view.token_slot.shape[0]
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
    q_TH = _at_global_rows(q, view)
    out_TH = hstu_attention_triton(
        q_TH, k_all[view.token_slot], v_all[view.token_slot], view.mask,
        max_seq_len=max_seq_len, alpha=alpha, rab=rab,
    )
    return out_TH[view.query_rows]


def _pass_bytes() -> int:
    """Bytes of gathered K/V (T rows) one pass may hold: past it the heads are attended in
    several passes, each gathering only its heads, so the global-size transients of the longest
    sequences stay a fraction of one layer's activations. ``kernel.cp_pass_mib`` sets it (0: one
    head per pass; negative: no limit, all heads in one pass)."""
    mib = kernel_options().cp_pass_mib
    if mib < 0:
        return 1 << 62
    return int(mib * (1 << 20))


def head_passes(T: int, H: int, width: int, elem_size: int) -> list[slice]:
    """Head ranges attended one after another; ``width`` = Dqk + Dv."""
    per_head = max(1, T * width * elem_size)
    step = max(1, min(H, _pass_bytes() // per_head))
    return [slice(h, min(h + step, H)) for h in range(0, H, step)]


@dataclass(frozen=True)
class _Plan:
    view: _GlobalView
    tables: object  # launch.MaskTables of the global view
    shard: TokenShard
    passes: list[slice]  # head ranges attended one after another (head_passes)
    group: ProcessGroup
    alpha: float
    max_seq_len: int


def _gather_heads(q: Tensor, k: Tensor, v: Tensor, h: slice, plan: _Plan) -> tuple[Tensor, ...]:
    """Heads ``h`` of the global-row queries and of the gathered keys and values in global order.
    K and V travel in one collective; k and v stay views of it (the kernel takes strides)."""
    kv_SHX = plan.shard.pad_to_shard(torch.cat([k[:, h], v[:, h]], dim=-1))
    kv_TH = gather_tokens(kv_SHX, plan.group)[plan.view.token_slot]
    dqk = k.shape[-1]
    return _at_global_rows(q[:, h], plan.view), kv_TH[..., :dqk], kv_TH[..., dqk:]


class _GatherAttend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_w, ts_w, plan):  # type: ignore[override]
        from flexgr.ops.triton_hstu import launch

        out = v.new_empty(q.shape[0], v.shape[1], v.shape[2])
        for h in plan.passes:
            q_TH, k_TH, v_TH = _gather_heads(q, k, v, h, plan)
            out_TH = launch.forward(
                q_TH, k_TH, v_TH, plan.tables, alpha=plan.alpha, max_seq_len=plan.max_seq_len,
                pos_w=pos_w, ts_w=ts_w,
            )
            out[:, h] = out_TH[plan.view.query_rows]
        # Only this rank's tensors are kept (q, k, v are usually views of the layer's
        # projection, alive anyway); the backward gathers again.
        ctx.save_for_backward(q, k, v, pos_w, ts_w)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        from flexgr.ops.triton_hstu import launch

        q, k, v, pos_w, ts_w = ctx.saved_tensors
        plan: _Plan = ctx.plan
        view, dqk = plan.view, k.shape[-1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dpos = dts = None
        width = k.shape[-1] + v.shape[-1]
        for h in plan.passes:
            q_TH, k_TH, v_TH = _gather_heads(q, k, v, h, plan)
            dout_TH = _at_global_rows(dout[:, h], view)
            dq_TH, dk_TH, dv_TH, dp, dt = launch.backward(
                dout_TH, q_TH, k_TH, v_TH, plan.tables, alpha=plan.alpha,
                max_seq_len=plan.max_seq_len, pos_w=pos_w, ts_w=ts_w,
            )
            del q_TH, k_TH, v_TH, dout_TH
            dq[:, h] = dq_TH[view.query_rows]
            dkv_all = dk_TH.new_zeros(plan.shard.gathered_len, dk_TH.shape[1], width)
            dkv_all[..., :dqk].index_copy_(0, view.token_slot, dk_TH)  # padding slots stay 0
            dkv_all[..., dqk:].index_copy_(0, view.token_slot, dv_TH)
            del dk_TH, dv_TH
            dkv_SHX = reduce_scatter_tokens(dkv_all, plan.group)[: q.shape[0]]
            dk[:, h], dv[:, h] = dkv_SHX[..., :dqk], dkv_SHX[..., dqk:]
            if dp is not None:
                dpos = dp if dpos is None else dpos + dp
                dts = dt if dts is None else dts + dt
        return dq, dk, dv, dpos, dts, None


def gather_attend_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: CPMask,
    group: ProcessGroup,
    *,
    max_seq_len: int,
    alpha: float,
    rab: RelativeBias | None = None,
) -> Tensor | None:
    """All-gather this rank's K/V shards (k [T_r, H, Dqk], v [T_r, H, Dv]) and attend its queries
    q [T_r, H, Dqk] through the kernel; returns [T_r, H, Dv], or None when the kernel cannot take
    these tensors (the caller then gathers and falls back)."""
    from flexgr.ops.triton_backend import unsupported_reason

    if unsupported_reason(q, k, v, mask.spec) is not None:
        return None
    from flexgr.ops.triton_hstu import launch

    view = _global_view(mask)
    plan = _Plan(
        view=view,
        tables=launch.mask_tables(view.mask, rab),
        shard=mask.shard,
        passes=head_passes(
            mask.shard.total_len, q.shape[1], k.shape[-1] + v.shape[-1], k.element_size()
        ),
        group=group,
        alpha=float(alpha),
        max_seq_len=int(max_seq_len),
    )
    pos_w = rab.pos_w if rab is not None else None
    ts_w = rab.ts_w if rab is not None else None
    return _GatherAttend.apply(q, k, v, pos_w, ts_w, plan)
