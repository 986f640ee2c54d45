"""The jagged batch the loader emits: what a trainer consumes, whichever store it came from.

Sequence ``b`` is ``item_ids[offsets[b]:offsets[b + 1]]`` (oldest first), every event strictly
before ``query_time[b]`` (the request time). Its candidates (the request's impressions, the
targets a ranking or retrieval head scores) are
``candidates[candidate_offsets[b]:candidate_offsets[b + 1]]`` with their action bits in
``labels``. Same field names as ``flexgr.train.batches.TrainBatch`` where they mean the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class JaggedBatch:
    request_ids: Tensor  # [B] int64
    users: Tensor  # [B] int64
    query_time: Tensor  # [B] int64, request_ts
    item_ids: Tensor  # [T] int64
    timestamps: Tensor  # [T] int64
    offsets: Tensor  # [B + 1] int64
    candidates: Tensor  # [C] int64
    candidate_timestamps: Tensor  # [C] int64
    labels: Tensor  # [C] int64 action bits
    candidate_offsets: Tensor  # [B + 1] int64
    actions: Tensor | None = None  # [T] int64, when the tenant reads "actions"
    side: dict[str, Tensor] = field(default_factory=dict)  # [T] each, when it reads "side"

    def __len__(self) -> int:
        return self.request_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.item_ids.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> JaggedBatch:
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = fn(value)
            elif isinstance(value, dict):
                value = {name: fn(tensor) for name, tensor in value.items()}
            values[f.name] = value
        return JaggedBatch(**values)

    def to(self, device: torch.device, non_blocking: bool = False) -> JaggedBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> JaggedBatch:
        return self._map(lambda t: t.pin_memory())

    def sequences(self) -> dict[int, dict[str, np.ndarray]]:
        """Per request id, its arrays (for comparing loaders; not a training path)."""
        out = {}
        off, cand = self.offsets.numpy(), self.candidate_offsets.numpy()
        for b, request in enumerate(self.request_ids.tolist()):
            span, cspan = slice(off[b], off[b + 1]), slice(cand[b], cand[b + 1])
            row = {
                "user": np.array([self.users[b].item()]),
                "query_time": np.array([self.query_time[b].item()]),
                "item_ids": self.item_ids[span].numpy(),
                "timestamps": self.timestamps[span].numpy(),
                "candidates": self.candidates[cspan].numpy(),
                "candidate_timestamps": self.candidate_timestamps[cspan].numpy(),
                "labels": self.labels[cspan].numpy(),
            }
            if self.actions is not None:
                row["actions"] = self.actions[span].numpy()
            row.update({f"side.{name}": t[span].numpy() for name, t in self.side.items()})
            out[request] = row
        return out


def tensor(values: np.ndarray, dtype: np.dtype | type = np.int64) -> Tensor:
    """A torch tensor owning a contiguous copy (Arrow buffers are read-only)."""
    return torch.from_numpy(np.array(values, dtype=dtype, copy=True))


def gather_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], stops[i])`` over i, without a Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    run = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return run + np.arange(total)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets
