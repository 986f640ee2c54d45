"""Context parallelism for HSTU: the same inputs, restricted to one rank's tokens.

Every rank of a CP group receives the same global jagged batch. :func:`prepare_sharded` keeps
this rank's tokens (head-tail shards, :mod:`flexgr.distributed.sharding`) and prepares
:class:`~flexgr.model.hstu.inputs.HSTUInputs` for them: their GLOBAL position ids, and an
attention call that all-gathers keys and values over the group and evaluates the batch's global
mask and bias tables (:func:`flexgr.distributed.context_parallel_attention`). The model's
forward is unchanged; outputs are this rank's tokens only, so a loss that is a sum over tokens
is summed locally and all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from flexgr.batch import JaggedBatch
from flexgr.distributed.cp_attention import context_parallel_attention, resolve_cp_backend
from flexgr.distributed.cp_mask import CPMask, build_cp_mask
from flexgr.distributed.mesh import ParallelContext
from flexgr.distributed.sharding import shard_tokens
from flexgr.masks.registry import BUILTIN_RULE
from flexgr.model.hstu.inputs import (
    BiasTables,
    BiasWeights,
    HSTUInputs,
    batch_layout,
    bias_tables,
    custom_mask_mod,
    prepare,
)
from flexgr.model.hstu.model import HSTU
from flexgr.model.spec import ShardedInputs


@dataclass(frozen=True)
class ContextParallelAttention:
    """Attention of this rank's tokens against the whole group's keys (a collective: every rank
    of ``group`` calls it with the same batch, layer after layer)."""

    mask: CPMask
    group: ProcessGroup
    backend: str
    tables: BiasTables  # of the GLOBAL batch

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, max_seq_len: int, alpha: float,
        bias: BiasWeights | None,
    ) -> Tensor:
        return context_parallel_attention(
            q, k, v, self.mask, self.group,
            max_seq_len=max_seq_len, alpha=alpha, rab=self.tables.bias(bias),
            backend=self.backend,
        )


def prepare_sharded(
    model: HSTU, batch: JaggedBatch, ctx: ParallelContext, row_offset: int = 0,
    row_total: int | None = None,
) -> ShardedInputs:
    """This rank's share of ``batch`` (the replica's global batch) and its inputs.

    Position ids and next timestamps are computed on the global batch (a chunk's last token
    needs the next chunk's first timestamp, which may live on another rank). ``row_offset`` and
    ``row_total`` place the replica's batch in the world batch (see :class:`ShardedInputs`).
    """
    if model.cfg.mot_streams > 1:
        raise ValueError("a mixture of transducers runs in one process (model.mot_streams = 1)")
    if model.cfg.attention != "silu" and ctx.cp_size > 1:
        raise ValueError("context parallelism sums partial attention: model.attention must be silu")
    T = batch.num_tokens
    row_total = T if row_total is None else row_total
    if not 0 <= row_offset <= row_offset + T <= row_total:
        raise ValueError(
            f"rows [{row_offset}, {row_offset + T}) do not fit a world batch of {row_total}"
        )
    offsets = batch.offsets.to(torch.int64)
    shard = shard_tokens(offsets, ctx.cp_size, ctx.cp_rank, total_len=T)
    world_rows = shard.local_index + row_offset
    if ctx.cp_size == 1:
        return ShardedInputs(
            batch.item_ids, prepare(model, batch), shard.take, world_rows, row_total, shard
        )
    if ctx.cp_group is None:
        raise ValueError("context parallelism with cp > 1 needs the mesh's cp process group")
    cfg = model.cfg
    backend = resolve_cp_backend(cfg.backend, batch.device, *model.parameters())
    layout = batch_layout(cfg, batch)
    custom = custom_mask_mod(cfg, layout) if cfg.mask != BUILTIN_RULE else None
    mask = build_cp_mask(
        shard,
        max_attn_len=cfg.max_attn_len,
        full_attn_tail=cfg.full_attn_tail,
        mask_mod=custom,
        layout=layout,
        with_block_mask=backend == "flex",
    )
    positions = layout.pos_id[:T].long()
    tables = bias_tables(batch, positions)
    attention = ContextParallelAttention(mask, ctx.cp_group, backend, tables)
    inputs = HSTUInputs(positions=shard.take(positions), attention=attention)
    return ShardedInputs(
        shard.take(batch.item_ids), inputs, shard.take, world_rows, row_total, shard
    )
