"""Context parallelism for the HSTU model, applied from outside the model.

Every rank of a CP group receives the same global jagged batch; :func:`shard_hstu_batch` keeps this
rank's tokens (head-tail) with their GLOBAL position ids and timestamps, and
:class:`ContextParallelHSTU` runs the model's embeddings and layers on them, each layer's attention
going through :func:`context_parallel_attention`. Outputs are this rank's tokens only: a loss that
is a sum over tokens is summed locally and all-reduced (``ParallelContext.all_reduce_sum``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from flexgr.distributed.collectives import all_gather_tokens
from flexgr.distributed.cp_attention import context_parallel_attention, resolve_cp_backend
from flexgr.distributed.cp_mask import CPMask, build_cp_mask
from flexgr.distributed.rng import DropoutRows
from flexgr.distributed.sharding import TokenShard, shard_tokens
from flexgr.masks.layout import JaggedLayout, build_layout
from flexgr.model.hstu import HSTU, HSTUTokens
from flexgr.ops.rab import RelativeBias, next_timestamps


@dataclass(frozen=True)
class HSTUShardBatch:
    """One rank's share of a global HSTU batch.

    Global: offsets [B+1], num_targets [B], query_time [B], layout and the per-token tables
    positions / timestamps / next_ts [T]. Local ([T_r], this rank's tokens in shard order):
    item_ids, positions, timestamps, next_ts. ``take`` shards any other per-token tensor (labels,
    loss weights) the same way.

    Under data parallelism the batch is rows [row_offset, row_offset + T) of the world batch (the
    replicas' batches end to end, ``world_tokens`` rows): draws made for the world batch (dropout
    masks, negatives) are indexed with ``world_rows``.
    """

    shard: TokenShard
    layout: JaggedLayout
    offsets: Tensor
    num_targets: Tensor | None
    query_time: Tensor | None
    global_item_ids: Tensor
    global_positions: Tensor
    global_timestamps: Tensor
    global_next_ts: Tensor
    item_ids: Tensor
    positions: Tensor
    timestamps: Tensor
    next_ts: Tensor
    row_offset: int = 0
    row_total: int | None = None

    def take(self, x_T: Tensor) -> Tensor:
        return self.shard.take(x_T)

    @property
    def world_rows(self) -> Tensor:
        """[T_r] int64: the world-batch row of each local token."""
        return self.shard.local_index + self.row_offset

    @property
    def world_tokens(self) -> int:
        return self.shard.total_len if self.row_total is None else self.row_total

    @property
    def local_offsets(self) -> Tensor:
        return self.shard.local_offsets


def shard_hstu_batch(
    item_ids: Tensor,
    offsets: Tensor,
    *,
    cp_rank: int,
    cp_size: int,
    timestamps: Tensor | None = None,
    query_time: Tensor | None = None,
    num_targets: Tensor | None = None,
    row_offset: int = 0,
    row_total: int | None = None,
) -> HSTUShardBatch:
    """The CP batch sharder: global jagged batch -> this rank's tokens + global index tables.
    Position ids and next timestamps are computed on the global batch (a chunk's last token needs
    the next chunk's first timestamp, which may live on another rank). ``row_offset`` and
    ``row_total`` place the batch in the world batch (see :class:`HSTUShardBatch`)."""
    T = item_ids.shape[0]
    if row_total is not None and not 0 <= row_offset <= row_offset + T <= row_total:
        raise ValueError(
            f"rows [{row_offset}, {row_offset + T}) do not fit a world batch of {row_total}"
        )
    offsets = offsets.to(torch.int64)
    shard = shard_tokens(offsets, cp_size, cp_rank, total_len=T)
    layout = build_layout(offsets, num_targets=num_targets, total_len=T, padded_len=max(T, 1))
    positions = layout.pos_id[:T].long()
    if timestamps is None:
        timestamps = torch.zeros(T, dtype=torch.int64, device=item_ids.device)
    next_ts = next_timestamps(timestamps, offsets, query_time)
    take = shard.take
    return HSTUShardBatch(
        shard=shard,
        layout=layout,
        offsets=offsets,
        num_targets=num_targets,
        query_time=query_time,
        global_item_ids=item_ids,
        global_positions=positions,
        global_timestamps=timestamps,
        global_next_ts=next_ts,
        item_ids=take(item_ids),
        positions=take(positions),
        timestamps=take(timestamps),
        next_ts=take(next_ts),
        row_offset=row_offset,
        row_total=row_total,
    )


class _LayerAttention:
    """The attention a layer calls under CP: same signature as ``hstu_attention``. The layer's
    local offsets, mask and per-token bias tables are replaced by the batch's global ones."""

    def __init__(
        self, mask: CPMask, batch: HSTUShardBatch, group: ProcessGroup, backend: str
    ) -> None:
        self.mask, self.batch, self.group, self.backend = mask, batch, group, backend

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        offsets: Tensor,
        *,
        max_seq_len: int,
        alpha: float,
        rab: RelativeBias | None = None,
        **_: object,
    ) -> Tensor:
        if rab is not None:
            b = self.batch
            rab = dataclasses.replace(
                rab,
                timestamps=b.global_timestamps,
                next_timestamps=b.global_next_ts,
                positions=b.global_positions,
            )
        return context_parallel_attention(
            q,
            k,
            v,
            self.mask,
            self.group,
            max_seq_len=max_seq_len,
            alpha=alpha,
            rab=rab,
            backend=self.backend,
        )


class ContextParallelHSTU(nn.Module):
    """Runs ``model`` on one rank's shard. ``forward(batch)`` returns [T_r, d] for the batch's
    local tokens. With a CP group of one it is the plain model on the whole batch."""

    def __init__(self, model: HSTU, group: ProcessGroup | None, cp_size: int) -> None:
        super().__init__()
        if not isinstance(model, HSTU):
            raise TypeError(
                f"context parallelism supports HSTU models (pointwise attention, partial sums add); "
                f"got {type(model).__name__}"
            )
        if cp_size > 1 and group is None:
            raise ValueError("context parallelism with cp > 1 needs the mesh's cp process group")
        self.model = model
        self.group = group
        self.cp_size = cp_size
        # Set by parallelize(..., replicate_dropout=True): the model's dropouts draw their masks
        # for the world batch and read this rank's rows from here.
        self.dropout_rows: DropoutRows | None = None

    def forward(self, batch: HSTUShardBatch) -> Tensor:
        if batch.shard.cp_size != self.cp_size:
            raise ValueError(
                f"batch was sharded for cp={batch.shard.cp_size}, the model runs cp={self.cp_size}"
            )
        if self.dropout_rows is None:
            return self._forward(batch)
        with self.dropout_rows.bound(batch.world_rows, batch.world_tokens):
            return self._forward(batch)

    def _forward(self, batch: HSTUShardBatch) -> Tensor:
        if self.cp_size == 1:
            return self.model(
                batch.item_ids, batch.offsets, batch.timestamps, batch.query_time, batch.num_targets
            )
        assert self.group is not None
        device = batch.item_ids.device
        backend = resolve_cp_backend(self.model.cfg.backend, device, *self.parameters())
        mask = build_cp_mask(
            batch.shard, layout=batch.layout, with_block_mask=backend == "flex"
        )
        tokens = HSTUTokens(
            offsets=batch.local_offsets,
            positions=batch.positions,
            timestamps=batch.timestamps,
            next_ts=batch.next_ts,
            num_targets=None,
            mask=None,
            backend=backend,
        )
        attention = _LayerAttention(mask, batch, self.group, backend)
        return self.model.encode(batch.item_ids, tokens, attention=attention)


def apply_context_parallel(
    model: HSTU, group: ProcessGroup | None, cp_size: int
) -> ContextParallelHSTU:
    return ContextParallelHSTU(model, group, cp_size)


def gather_tokens(x_local: Tensor, shard: TokenShard, group: ProcessGroup | None) -> Tensor:
    """This CP group's outputs in GLOBAL token order [T, ...], on every rank of the group. Detached:
    for evaluation and inspection; train on local sums (every rank backpropagating a loss of the
    gathered tensor would count each token's gradient C times)."""
    x_local = x_local.detach()
    if shard.cp_size == 1 or group is None:
        return x_local
    with torch.no_grad():
        gathered = all_gather_tokens(shard.pad_to_shard(x_local), group)
    return gathered[shard.slot_of_token]


__all__ = [
    "ContextParallelHSTU",
    "HSTUShardBatch",
    "apply_context_parallel",
    "gather_tokens",
    "shard_hstu_batch",
]
