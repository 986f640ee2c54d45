"""The one batch type every model reads: packed (jagged) sequences, values plus offsets.

Training, evaluation, export and context parallelism all hand models a :class:`JaggedBatch`; a
model's spec turns it into the model's per-batch inputs once, outside the forward
(:mod:`flexgr.model.spec`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class JaggedBatch:
    """B sequences packed into T tokens: sequence b is tokens ``[offsets[b], offsets[b + 1])``.

    ``query_time`` [B] is the time each sequence's prediction is made for (HSTU's time bias reads
    it as the last token's "next timestamp"). ``num_targets`` [B] marks the last tokens of each
    sequence as targets (candidates) for target-aware masks. ``actions`` [T, A] is room for
    per-event action features (ranking); no model reads it yet.
    """

    item_ids: Tensor  # [T] int64
    offsets: Tensor  # [B + 1] int64
    timestamps: Tensor | None = None  # [T] int64
    query_time: Tensor | None = None  # [B] int64
    num_targets: Tensor | None = None  # [B] int64
    actions: Tensor | None = None  # [T, A] int64

    @property
    def num_tokens(self) -> int:
        return self.item_ids.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def device(self) -> torch.device:
        return self.item_ids.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> JaggedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        return replace(self, **moved)

    def pin_memory(self) -> JaggedBatch:
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        return replace(self, **pinned)
