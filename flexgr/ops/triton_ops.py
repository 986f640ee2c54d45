"""The Triton HSTU kernels as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque
op per call (with fake implementations for shapes) instead of tracing the launch code.

``flexgr::hstu_attention_fwd`` and ``flexgr::hstu_attention_bwd`` take the kernel's per-batch
tables flattened into a tensor list and an int list (:func:`pack` / :func:`unpack`); autograd
is registered on the forward.

:func:`attention` is what callers use: under ``torch.compile`` it emits the custom op; in eager
mode it runs the same launch code through a plain ``autograd.Function`` that keeps the
``MaskTables`` object. The custom op's dispatch, its checks on 17 inputs and the unpacking
cost ~0.3 ms of host time per call (measured with a stub kernel), more than a short or sparse
kernel's device time, and unpacking also dropped the tile orders cached on the tables.
"""

# No ``from __future__ import annotations``: custom_op reads the signature's real types.
from typing import Optional

import torch
from torch import Tensor

from flexgr.masks.block import MaskSpec

TABLE_TENSORS = (
    "seq_id", "pos_id", "max_id", "local", "ts", "next_ts", "kv_num", "kv_idx", "full_kv_num",
    "full_kv_idx", "q_num", "q_idx", "full_q_num", "full_q_idx",
)


def pack(tab) -> tuple[list[Tensor], list[int], float]:  # noqa: ANN001 - launch.MaskTables
    """(tensors, ints, inverse bucket divisor) of a ``MaskTables``."""
    spec = tab.spec
    ints = [
        tab.mask_block_q, tab.mask_block_kv, tab.total_len, tab.padded_len, tab.rab_n,
        tab.num_buckets, spec.contextual_len, spec.max_attn_len, spec.full_attn_tail,
        int(spec.has_targets), int(spec.semi_local), spec.global_len,
    ]
    tensors = [getattr(tab, name) for name in TABLE_TENSORS]
    if tab.rab_tiles is not None:  # kernel.rab_tiles: the tiles travel after the tables
        tensors += tab.rab_tiles.tensors()
    return tensors, ints, float(tab.inv_bucket_div)


def unpack(tensors: list[Tensor], ints: list[int], inv_bucket_div: float):  # noqa: ANN201
    from flexgr.ops.triton_hstu.launch import MaskTables
    from flexgr.ops.triton_hstu.rab_tiles import RabTiles

    n = len(TABLE_TENSORS)
    tiles = RabTiles(*tensors[n:]) if len(tensors) > n else None
    tensors = tensors[:n]
    mbq, mbkv, total, padded, rab_n, buckets, ctx, window, tail, targets, sla, glob = ints
    spec = MaskSpec(
        contextual_len=ctx, max_attn_len=window, full_attn_tail=tail, has_targets=bool(targets),
        semi_local=bool(sla), global_len=glob,
    )
    return MaskTables(
        **dict(zip(TABLE_TENSORS, tensors, strict=True)),
        mask_block_q=mbq, mask_block_kv=mbkv, total_len=total, padded_len=padded, spec=spec,
        rab_n=rab_n, num_buckets=buckets, inv_bucket_div=inv_bucket_div, rab_tiles=tiles,
    )


@torch.library.custom_op("flexgr::hstu_attention_fwd", mutates_args=())
def hstu_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, pos_w: Optional[Tensor], ts_w: Optional[Tensor],
    tables: list[Tensor], ints: list[int], inv_bucket_div: float, alpha: float,
    max_seq_len: int,
) -> Tensor:
    from flexgr.ops.triton_hstu import launch

    out = launch.forward(
        q, k, v, unpack(tables, ints, inv_bucket_div), alpha=alpha, max_seq_len=max_seq_len,
        pos_w=pos_w, ts_w=ts_w,
    )
    return out.contiguous()


@hstu_attention_fwd.register_fake
def _(q, k, v, pos_w, ts_w, tables, ints, inv_bucket_div, alpha, max_seq_len):  # noqa: ANN001, ANN202
    return v.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op("flexgr::hstu_attention_bwd", mutates_args=())
def hstu_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pos_w: Optional[Tensor],
    ts_w: Optional[Tensor], tables: list[Tensor], ints: list[int], inv_bucket_div: float,
    alpha: float, max_seq_len: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dpos_w, dts_w); the last two are empty without a relative bias."""
    from flexgr.ops.triton_hstu import launch

    dq, dk, dv, dpos, dts = launch.backward(
        dout, q, k, v, unpack(tables, ints, inv_bucket_div), alpha=alpha,
        max_seq_len=max_seq_len, pos_w=pos_w, ts_w=ts_w,
    )
    if dpos is None or dts is None:  # two tensors: outputs may not alias each other
        dpos, dts = q.new_zeros(0, dtype=torch.float32), q.new_zeros(0, dtype=torch.float32)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dpos.contiguous(), dts.contiguous()


@hstu_attention_bwd.register_fake
def _(dout, q, k, v, pos_w, ts_w, tables, ints, inv_bucket_div, alpha, max_seq_len):  # noqa: ANN001, ANN202
    if pos_w is None or ts_w is None:
        dpos, dts = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    else:
        dpos, dts = torch.empty_like(pos_w), torch.empty_like(ts_w)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpos, dts


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, pos_w, ts_w, tables, ints, inv_bucket_div, alpha, max_seq_len = inputs
    ctx.has_rab = pos_w is not None and ts_w is not None
    weights = (pos_w, ts_w) if ctx.has_rab else ()
    ctx.save_for_backward(q, k, v, *weights, *tables)
    ctx.scalars = (list(ints), inv_bucket_div, alpha, max_seq_len)


def _backward(ctx, dout: Tensor):  # noqa: ANN001, ANN202
    saved = ctx.saved_tensors
    q, k, v = saved[:3]
    pos_w, ts_w = saved[3:5] if ctx.has_rab else (None, None)
    tables = list(saved[5:] if ctx.has_rab else saved[3:])
    ints, inv_bucket_div, alpha, max_seq_len = ctx.scalars
    dq, dk, dv, dpos, dts = hstu_attention_bwd(
        dout, q, k, v, pos_w, ts_w, tables, ints, inv_bucket_div, alpha, max_seq_len
    )
    if not ctx.has_rab:
        dpos = dts = None
    else:
        dpos, dts = dpos.to(pos_w.dtype), dts.to(ts_w.dtype)
    # One entry per input, the table list's as a list.
    return dq, dk, dv, dpos, dts, [None] * len(tables), None, None, None, None


hstu_attention_fwd.register_autograd(_backward, setup_context=_setup)


class _EagerAttention(torch.autograd.Function):
    """The custom op's forward and backward without the dispatcher (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, pos_w, ts_w, tab, alpha, max_seq_len):  # noqa: ANN001, ANN205
        from flexgr.ops.triton_hstu import launch

        ctx.save_for_backward(q, k, v, pos_w, ts_w)
        ctx.tab, ctx.alpha, ctx.max_seq_len = tab, alpha, max_seq_len
        return launch.forward(
            q, k, v, tab, alpha=alpha, max_seq_len=max_seq_len, pos_w=pos_w, ts_w=ts_w
        ).contiguous()

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        from flexgr.ops.triton_hstu import launch

        q, k, v, pos_w, ts_w = ctx.saved_tensors
        dq, dk, dv, dpos, dts = launch.backward(
            dout, q, k, v, ctx.tab, alpha=ctx.alpha, max_seq_len=ctx.max_seq_len,
            pos_w=pos_w, ts_w=ts_w,
        )
        return dq, dk, dv, dpos, dts, None, None, None


def attention(
    q: Tensor, k: Tensor, v: Tensor, pos_w: Optional[Tensor], ts_w: Optional[Tensor],
    tab,  # noqa: ANN001 - launch.MaskTables
    alpha: float, max_seq_len: int,
) -> Tensor:
    """The Triton HSTU attention of one layer: the custom op under torch.compile, the same
    kernels through :class:`_EagerAttention` otherwise."""
    if torch.compiler.is_compiling():
        tensors, ints, inv_bucket_div = pack(tab)
        return hstu_attention_fwd(
            q, k, v, pos_w, ts_w, tensors, ints, inv_bucket_div, alpha, max_seq_len
        )
    return _EagerAttention.apply(q, k, v, pos_w, ts_w, tab, alpha, max_seq_len)
