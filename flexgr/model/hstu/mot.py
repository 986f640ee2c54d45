"""Mixture of transducers (ULTRA-HSTU): separate HSTU stacks over a user's event streams.

The events of one user are split into ``S`` streams by the stream of their item (the model's
``item_stream`` table: item index modulo S by default, or any per-item column such as an
event type or category, set with :meth:`HSTU.set_item_streams`). Stream ``s`` is its own
jagged batch (each user's stream-s events in time order, positions and relative bias inside
the stream) and runs through its own layer stack, so it never attends to another stream's
tokens. The stacks meet only at the fusion, before the heads (the retrieval loss or a task
tower): the state of the user at event t is

- ``sum`` (default): ``h_t = sum_s z_s(last_s(t))``, where ``last_s(t)`` is the user's latest
  stream-s event at or before t and ``z_s`` the stream stack's output there (0 when the user
  has no stream-s event yet). Parameter-free, so one stream is exactly the plain model;
- ``concat``: ``h_t = W [z_0(last_0(t)), ..., z_{S-1}(last_{S-1}(t))]``, one learned
  ``S d -> d`` projection.

Causality holds: every state reads events at or before t only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flexgr.batch import JaggedBatch

if TYPE_CHECKING:
    from flexgr.model.hstu.inputs import HSTUInputs


@dataclass(frozen=True)
class StreamInputs:
    """One stream of a batch: its rows, their prepared inputs, and where each batch row reads."""

    rows: Tensor  # [T_s] rows of the batch in this stream, per sequence in time order
    inputs: HSTUInputs  # prepared for the stream's own jagged batch
    latest: Tensor  # [T] index into ``rows`` of each row's latest stream row (-1: none yet)


@dataclass(frozen=True)
class MixtureInputs:
    """A batch's inputs under a mixture of transducers: one :class:`StreamInputs` per stream."""

    streams: tuple[StreamInputs, ...]


def stream_batch(
    batch: JaggedBatch, stream_of_row: Tensor, stream: int
) -> tuple[Tensor, JaggedBatch, Tensor]:
    """(rows, the stream's jagged batch, latest [T]) of one stream."""
    offsets = batch.offsets.to(torch.int64)
    T = batch.num_tokens
    member = stream_of_row == stream
    rows = member.nonzero().squeeze(1)
    B = offsets.numel() - 1
    seq = torch.repeat_interleave(
        torch.arange(B, device=offsets.device), offsets.diff(), output_size=T
    )
    counts = torch.zeros(B, dtype=torch.int64, device=offsets.device)
    counts.index_add_(0, seq, member.long())
    sub_offsets = torch.cat([torch.zeros_like(offsets[:1]), counts.cumsum(0)])
    cum = member.long().cumsum(0)  # stream rows at or before each batch row
    latest = torch.where(cum > sub_offsets[seq], cum - 1, torch.full_like(cum, -1))
    sub = JaggedBatch(
        batch.item_ids[rows],
        sub_offsets,
        batch.timestamps[rows] if batch.timestamps is not None else None,
        batch.query_time,
        None,
    )
    return rows, sub, latest


def gather_latest(z_TsD: Tensor, latest: Tensor) -> Tensor:
    """[T, d]: each batch row's latest stream state, zeros before the stream's first event."""
    if z_TsD.shape[0] == 0:
        return z_TsD.new_zeros(latest.shape[0], z_TsD.shape[1])
    picked = z_TsD[latest.clamp(min=0)]
    return torch.where((latest >= 0).unsqueeze(1), picked, torch.zeros_like(picked))
